"""An lm-evaluation-harness model for diffusion checkpoints, registered as model type `adapt`.

    pip install 'adapt[eval]'
    adapt lm-eval --model_args pretrained=CKPT,mc_samples=32 --tasks hellaswag --batch_size 8
    accelerate launch -m adapt.lm_eval_model --model_args pretrained=CKPT --tasks hellaswag

`adapt lm-eval` and `python -m adapt.lm_eval_model` (the entry point adapt/lm_eval_model.py) are
lm-eval's own command line with this model registered and `--model adapt` the default; in Python,
importing this module (or `adapt.lm_eval_model`) registers it for `lm_eval.simple_evaluate(model="adapt",
...)`. Model args: pretrained (a directory or Hub id), revision, mc_samples, seed, eps, batch_size
(requests per forward pass), max_length, max_gen_toks, dtype, device, and the sampler's options
(`SAMPLER_ARGS`: steps, block_length, strategy, step_schedule, threshold, temperature, confidence, cache,
...); chat templates come from lm-eval's own `--apply_chat_template`.

- `loglikelihood`: Monte Carlo ELBO of the continuation given the context (LLaDA-style): only
  continuation tokens are masked and scored, `mc_samples` stratified t values per request (per block
  for block-diffusion checkpoints: the bound `adapt eval` reports); the returned log-likelihood is a
  lower bound estimate. Each request draws its noise from its own generator, seeded by (seed, its
  tokens), so a score does not depend on the batch or the process it lands in. `is_greedy` is whether
  the continuation, all masked, is every token's argmax (for a block checkpoint: each block's, given
  the clean blocks before it).
- `loglikelihood_rolling`: the same bound over lm-eval's rolling windows of the whole text.
- `generate_until`: adapt's sampler on batches of prompts that share generation arguments, cut at the
  first stop token (EOS, every id of `generation_config.eos_token_id`, the chat template's end of turn)
  or stop string. Greedy decoding (temperature 0, lm-eval's usual setting) gives each prompt the same
  text in any batch; sampled decoding draws one generator per batch, so it changes with the batch size.
Under `accelerate launch`, lm-eval gives each process its share of the documents (rank, world size);
results are gathered on rank 0, which alone writes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from adapt.core.diffusion import maskable_positions
from adapt.core.errors import AdaptError
from adapt.evaluation.evaluate import elbo_noise, masked_nll_sums
from adapt.loading.model import load_diffusion_model
from adapt.sampling.config import SamplingConfig

log = logging.getLogger(__name__)

# SamplingConfig fields a user sets through --model_args; the rest come from each request.
SAMPLER_ARGS = tuple(
    f.name for f in dataclasses.fields(SamplingConfig) if f.name not in ("gen_length", "stop", "chat", "seed")
)
ALIASES = {"gen_steps": "steps", "gen_strategy": "strategy"}  # the model args' earlier names

Pair = tuple[list[int], list[int]]  # context and continuation token ids
Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids, masked (bool), t: each [rows, l]


class AdaptLM(LM):
    """A diffusion checkpoint scored by Monte Carlo ELBO and sampled with adapt's sampler."""

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        mc_samples: int = 32,
        seed: int = 0,
        eps: float = 1e-3,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lm-eval passes it for --batch_size auto, which is refused
        max_length: int | None = None,
        max_gen_toks: int = 128,
        dtype: str = "float32",
        device: str | None = None,
        **sampler: Any,
    ) -> None:
        super().__init__()
        if int(mc_samples) < 1:
            raise AdaptError(f"mc_samples must be at least 1, not {mc_samples}")
        self.sampler = sampler_options(sampler)
        self.batch_size = requests_per_batch(batch_size)
        self.accelerator = start_processes()
        if self.accelerator is not None:
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = str(self.accelerator.device)
        self.model, self.tokenizer, self.settings = load_diffusion_model(
            pretrained, dtype, usable(device), revision=revision
        )
        self._device = self.model.device
        self.pretrained = pretrained
        self.mc_samples, self.seed, self.eps = int(mc_samples), int(seed), float(eps)
        positions = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length or positions)
        self.max_gen_toks = int(max_gen_toks)
        self.sampling_config({})  # sampler options checked before the first request
        self.prefix_id = self.tokenizer.bos_token_id
        if self.prefix_id is None:
            self.prefix_id = self.tokenizer.eos_token_id

    # ------------------------------------------------------------ lm-eval hooks

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.accelerator is None:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if not self.tokenizer.chat_template:
            raise AdaptError(
                f"--apply_chat_template: the tokenizer of {self.pretrained} has no chat template"
            )
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )  # fmt: skip

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in the results' `config`: what a score depends on beyond the model args given."""
        from adapt.core.version import __version__

        return {
            "adapt": {
                "version": __version__,
                "pretrained": self.pretrained,
                "mc_samples": self.mc_samples,
                "seed": self.seed,
                "eps": self.eps,
                "batch_size": self.batch_size,
                "max_length": self.max_length,
                "world_size": self.world_size,
                "diffusion": self.settings.to_dict(),
                "sampler": {k: v for k, v in dataclasses.asdict(self.sampling_config({})).items()
                            if k in SAMPLER_ARGS},
            }
        }  # fmt: skip

    # ------------------------------------------------------------ likelihoods

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def split_pair(self, context: str, continuation: str) -> Pair:
        """Token ids of context and continuation, tokenized together (spaces move to the continuation)."""
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        ctx = [self.prefix_id, *self.encode(stripped)] if stripped else [self.prefix_id]
        whole = [self.prefix_id, *self.encode(stripped + continuation)] if stripped else None
        if whole is None or whole[: len(ctx)] != ctx:  # no context, or the tokenizer merged across it
            return ctx, self.encode(continuation)
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.split_pair(*req.args) for req in requests]
        return self.score_pairs(pairs, "loglikelihood", disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[Pair] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            (text,) = req.args
            rolling = get_rolling_token_windows(self.encode(text), self.prefix_id, self.max_length, 1)
            for ctx, cont in map(make_disjoint_window, rolling):
                windows.append((list(ctx), list(cont)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(
            owner, self.score_pairs(windows, "loglikelihood_rolling", disable_tqdm), strict=True
        ):
            totals[i] += ll
        return totals

    def score_pairs(self, pairs: list[Pair], what: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(ELBO log-likelihood, is greedy) per (context, continuation), `batch_size` requests a batch."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # an empty continuation
        bar = tqdm(total=len(pairs), desc=what, disable=disable_tqdm or self.rank != 0)
        for chunk in batches([i for i in order if pairs[i][1]], self.batch_size):
            for i, result in zip(chunk, self.score_batch([pairs[i] for i in chunk]), strict=True):
                out[i] = result
            bar.update(len(chunk))
        bar.close()
        return out

    def score_batch(self, pairs: list[Pair]) -> list[tuple[float, bool]]:
        """One forward over the mc_samples noisy copies of every pair, one over the greedy rows."""
        k = self.mc_samples
        noisy, greedy = zip(*(self.request_rows(ctx, cont) for ctx, cont in pairs), strict=True)
        ids, masked, t, am = right_pad(noisy)
        sums = masked_nll_sums(self.model, ids, masked, t, self.settings, ids.shape[0], attention_mask=am)
        ids, masked, t, am = right_pad(greedy)
        hits = masked_nll_sums(
            self.model, ids, masked, t, self.settings, ids.shape[0], hits=True, attention_mask=am
        )
        scored = masked.sum(-1)
        nll = sums.view(len(pairs), k).mean(-1)  # [requests] nats
        return [(-float(nll[i]), bool(hits[i] == scored[i])) for i in range(len(pairs))]

    def request_rows(self, ctx: list[int], cont: list[int]) -> tuple[Rows, Rows]:
        """The noisy rows of one request (its own generator) and its greedy row (continuation masked)."""
        ids = (ctx + cont)[-self.max_length :]
        window = torch.tensor([ids])  # [1, l]
        prompt = torch.zeros_like(window, dtype=torch.bool)
        prompt[:, : max(len(ids) - len(cont), 1)] = True  # a continuation past max_length: its tail
        gen = torch.Generator().manual_seed(request_seed(self.seed, ctx, cont))
        noisy = elbo_noise(window, self.settings, self.mc_samples, self.eps, gen, prompt)[:3]
        scored = maskable_positions(torch.ones_like(window), self.settings.shift, prompt)
        return noisy, (window, scored, torch.ones(window.shape))

    # ------------------------------------------------------------ generation

    def sampling_config(self, kwargs: dict[str, Any]) -> SamplingConfig:
        """The sampler for one request's generation arguments (max_gen_toks, until, temperature)."""
        options = dict(self.sampler)
        length = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        if options.get("block_length"):
            length = -(-length // options["block_length"]) * options["block_length"]
        if "temperature" in kwargs:
            options["temperature"] = float(kwargs["temperature"] or 0.0)
        if kwargs.get("do_sample") is False:
            options["temperature"] = 0.0
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        return SamplingConfig(gen_length=length, stop=tuple(until), seed=self.seed, **options)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from adapt.sampling import generate

        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or self.rank != 0)
        for chunk in generation_batches(requests, self.batch_size):
            config = self.sampling_config(requests[chunk[0]].args[1])
            contexts = [requests[i].args[0] for i in chunk]
            texts = generate(self.model, self.tokenizer, contexts, config, self.settings).texts
            for i, text in zip(chunk, texts, strict=True):
                for stop in config.stop:
                    text = text.split(stop)[0]
                out[i] = text
            bar.update(len(chunk))
        bar.close()
        return out


def right_pad(parts: tuple[Rows, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of different lengths stacked with right padding: (ids, masked, t, attention_mask) [rows, L]."""
    length = max(p[0].shape[1] for p in parts)

    def pad(x: torch.Tensor, value: float | bool) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)

    ids = torch.cat([pad(p[0], 0) for p in parts])
    masked = torch.cat([pad(p[1], False) for p in parts])
    t = torch.cat([pad(p[2], 1.0) for p in parts])
    am = torch.cat([pad(torch.ones_like(p[0]), 0) for p in parts])
    return ids, masked, t, am


def request_seed(seed: int, ctx: list[int], cont: list[int]) -> int:
    """A generator seed from the run's seed and the request's tokens: the same wherever it is scored."""
    digest = hashlib.sha256(json.dumps([seed, ctx, cont]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def batches(items: list[int], size: int) -> Iterator[list[int]]:
    for s in range(0, len(items), size):
        yield items[s : s + size]


def generation_batches(requests: list[Any], size: int) -> Iterator[list[int]]:
    """Indices of requests in batches of `size` that share generation arguments, longest prompts first."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    for members in groups.values():
        members.sort(key=lambda i: -len(requests[i].args[0]))
        yield from batches(members, size)


def sampler_options(args: dict[str, Any]) -> dict[str, Any]:
    """The sampler's model args (earlier names mapped); an unknown model arg is an error."""
    options = {ALIASES.get(k, k): v for k, v in args.items() if k != "trust_remote_code"}
    unknown = sorted(set(options) - set(SAMPLER_ARGS))
    if "chat" in unknown:
        raise AdaptError("model arg chat: use lm-eval's --apply_chat_template to apply the chat template")
    if unknown:
        valid = ["pretrained", "mc_samples", "seed", "eps", "batch_size", "max_length", "max_gen_toks",
                 "dtype", "device", *SAMPLER_ARGS]  # fmt: skip
        raise AdaptError(f"unknown model arg(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return options


def requests_per_batch(batch_size: int | str) -> int:
    if not str(batch_size).isdigit() or int(batch_size) < 1:
        raise AdaptError(f"--batch_size {batch_size}: the adapt model takes a positive number of requests")
    return int(batch_size)


def usable(device: str | None) -> str | None:
    """lm-eval's default device is cuda; on a machine without one, the cpu."""
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested (lm-eval's default) but CUDA is unavailable; using cpu", device)
        return "cpu"
    return device


def start_processes() -> Any:
    """An Accelerator when launched as several processes (`accelerate launch`), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])


def end_processes() -> None:
    """After a sharded run: every rank done, then the process group taken down before the interpreter exits
    (left to exit, gloo's threads sometimes abort a rank that had finished: "terminate called without an
    active exception", and the launcher reports the run failed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- command line

SUBCOMMANDS = ("run", "ls", "validate")


def with_default_model(argv: list[str]) -> list[str]:
    """lm-eval's arguments with `--model adapt` added to a run that names no model."""
    if argv and argv[0] in SUBCOMMANDS[1:]:
        return argv
    named = any(a in ("--model", "-M") or a.startswith("--model=") for a in argv)
    return argv if named else [*argv, "--model", "adapt"]


def run_cli(argv: list[str]) -> None:
    """lm-eval's command line on `argv`; what lm-eval rejects becomes one line (AdaptError)."""
    import contextlib
    import io

    from lm_eval.__main__ import cli_evaluate

    saved, sys.argv = sys.argv, ["lm-eval", *with_default_model(argv)]
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parsing = parse_only()
        if parsing:  # parsed and checked: the run itself keeps lm-eval's own output
            cli_evaluate()
            end_processes()
    except SystemExit as e:
        if e.code in (0, None):
            raise
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        raise AdaptError(f"lm-eval: {lines[-1].split('error: ', 1)[-1] if lines else e.code}") from None
    except (ValueError, TypeError, FileNotFoundError) as e:
        if not raised_by_lm_eval_cli(e):
            raise
        raise AdaptError(f"lm-eval: {e}".splitlines()[0]) from None
    finally:
        sys.argv = saved


def parse_only() -> bool:
    """Parse sys.argv as lm-eval does (argparse exits 2 on a bad argument, 0 after --help)."""
    from lm_eval._cli import HarnessCLI

    HarnessCLI().parse_args()
    return True


def raised_by_lm_eval_cli(e: BaseException) -> bool:
    """Whether lm-eval's own argument and task checks raised `e` (user input), not the model or a library
    under lm-eval: the innermost frame is lm-eval's command line, config or evaluator entry."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    name = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return name.startswith(("lm_eval.config", "lm_eval._cli", "lm_eval.__main__", "lm_eval.evaluator"))


register_model("adapt")(AdaptLM)
