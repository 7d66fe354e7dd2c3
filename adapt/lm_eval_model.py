"""An lm-evaluation-harness model for diffusion checkpoints, registered as model type `adapt`.

    pip install 'adapt[eval]'
    python -m adapt.lm_eval_model --model adapt --model_args pretrained=CKPT,mc_samples=32 \
        --tasks hellaswag --device cpu

`python -m adapt.lm_eval_model` is lm-eval's own command line with this model registered; in Python,
`import adapt.lm_eval_model` registers it for `lm_eval.simple_evaluate(model="adapt", ...)`.
Model args: pretrained, mc_samples, batch_size, max_length, gen_steps, gen_strategy, max_gen_toks,
dtype, device, seed.

- `loglikelihood`: Monte Carlo ELBO of the continuation given the context (LLaDA-style): only
  continuation tokens are masked and scored, `mc_samples` stratified t values per request; the
  returned log-likelihood is a lower bound estimate. `is_greedy` is whether one forward pass with the
  whole continuation masked predicts every continuation token by argmax.
- `loglikelihood_rolling`: the same bound over lm-eval's rolling windows of the whole text.
- `generate_until`: adapt's sampler, cut at the first stop token (EOS, every id of
  `generation_config.eos_token_id`, the chat template's end-of-turn token) or stop string.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from adapt.checkpoint import load_diffusion_model
from adapt.evaluate import elbo_samples

log = logging.getLogger(__name__)


@register_model("adapt")
class AdaptLM(LM):
    """A diffusion checkpoint scored by Monte Carlo ELBO and sampled with adapt's sampler."""

    def __init__(
        self,
        pretrained: str,
        mc_samples: int = 32,
        batch_size: int | str = 32,
        max_length: int | None = None,
        gen_steps: int | None = None,
        gen_strategy: str = "low_confidence",
        max_gen_toks: int = 128,
        dtype: str = "float32",
        device: str | None = None,
        seed: int = 0,
        **_: Any,
    ) -> None:
        super().__init__()
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s requested (lm-eval's default) but CUDA is unavailable; using cpu", device)
            device = "cpu"
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer, self.settings = load_diffusion_model(pretrained, dtype, device)
        self.mc_samples = int(mc_samples)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32
        positions = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length or positions)
        self.gen_steps = int(gen_steps) if gen_steps else None
        self.gen_strategy = gen_strategy
        self.max_gen_toks = int(max_gen_toks)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.prefix_id = self.tokenizer.bos_token_id
        if self.prefix_id is None:
            self.prefix_id = self.tokenizer.eos_token_id

    # ------------------------------------------------------------ likelihoods

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def split_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, tokenized together (spaces move to the continuation)."""
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        ctx = [self.prefix_id, *self.encode(stripped)] if stripped else [self.prefix_id]
        whole = (
            [self.prefix_id, *self.encode(stripped + continuation)]
            if stripped
            else [
                self.prefix_id,
                *self.encode(continuation),
            ]
        )
        if whole[: len(ctx)] != ctx:  # the tokenizer merged across the boundary
            return ctx, self.encode(continuation)
        return ctx, whole[len(ctx) :]

    def continuation_nll(self, ctx: list[int], cont: list[int]) -> float:
        """ELBO estimate of -log p(cont | ctx), in nats (left-truncated to max_length)."""
        ids = (ctx + cont)[-self.max_length :]
        n_ctx = len(ids) - len(cont)
        window = torch.tensor([ids])  # [1, l]
        prompt = torch.zeros_like(window, dtype=torch.bool)
        prompt[:, :n_ctx] = True
        est, tokens = elbo_samples(
            self.model, window, self.settings, self.mc_samples, self.batch_size,
            generator=self.generator, prompt_mask=prompt,
        )  # fmt: skip
        return float(est.mean()) * int(tokens[0])

    @torch.no_grad()
    def greedy_matches(self, ctx: list[int], cont: list[int]) -> bool:
        ids = (ctx + cont)[-self.max_length :]
        n_ctx = len(ids) - len(cont)
        x = torch.tensor([ids[:n_ctx] + [self.settings.mask_token_id] * len(cont)])
        logits = self.model(input_ids=x.to(self.model.device)).logits[0]  # [l, V]
        cols = torch.arange(n_ctx, len(ids)) - (1 if self.settings.shift else 0)
        return logits[cols].argmax(-1).cpu().tolist() == ids[n_ctx:]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self.split_pair(context, continuation)
            if not cont:
                out.append((0.0, True))
                continue
            out.append((-self.continuation_nll(ctx, cont), self.greedy_matches(ctx, cont)))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = get_rolling_token_windows(self.encode(text), self.prefix_id, self.max_length, 1)
            total = 0.0
            for ctx, cont in map(make_disjoint_window, windows):
                total -= self.continuation_nll(list(ctx), list(cont))
            out.append(total)
        return out

    # ------------------------------------------------------------ generation

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from adapt.sampling import SamplingConfig, generate

        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            length = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            config = SamplingConfig(
                gen_length=length,
                steps=self.gen_steps or length,
                strategy=self.gen_strategy,  # type: ignore[arg-type]
                temperature=float(kwargs.get("temperature", 0.0) or 0.0),
                stop=tuple(until),
            )
            text = generate(self.model, self.tokenizer, [context], config, self.settings).texts[0]
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
