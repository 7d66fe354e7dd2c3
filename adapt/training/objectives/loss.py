"""The loss every objective shares: the model's prediction at chosen positions, weighted cross-entropy.

An objective (`adapt.training.objectives`) decides what the model sees (noisy tokens, attention mask,
positions) and where each target's prediction is read (rows, cols, already shifted); `TokenLoss` runs the
model once and scores those positions. It wraps a (converted, possibly peft) causal LM so that Accelerate
can prepare it as a whole (DDP/FSDP see one forward). Its fast path runs the decoder for hidden states
and applies the LM head only at the masked positions, which is where the loss lives; computing the
full [b, l, V] logits is the dominant cost of a small model's step. Architectures whose head is more
than a linear layer (logit soft-capping, scaling) are handled, and a model whose fast path does not
reproduce its own logits falls back to the full forward (checked once in `check_fast_path`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapt.core.errors import AdaptError
from adapt.core.pair_attention import NAME as PAIR_KERNEL
from adapt.core.pair_attention import PairLayout


class TokenLoss(nn.Module):
    """Weighted cross-entropy of the model's predictions at chosen positions (the masked ones)."""

    def __init__(self, model: nn.Module, fast: bool = True) -> None:
        super().__init__()
        self.model = model
        self.fast = fast

    @property
    def _no_split_modules(self) -> Any:
        """The wrapped model's own decoder-layer class names (a set or list; None when it declares none):
        Accelerate reads them from the object it prepares to wrap one FSDP unit per layer."""
        return getattr(causal_lm_of(self.model), "_no_split_modules", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        rows: torch.Tensor,
        cols: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        ar: torch.Tensor | None = None,
        pair: PairLayout | None = None,
        soft_targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids [b, l] (noisy), attention_mask [b, l], a 4D mask [b, 1, l, l] or a BlockMask, rows/cols
        [n] (where the prediction is read: already shifted), targets [n], weights [n], ar [n] (which entries
        are the joint objective's AR term; only the metrics read it), pair: the block objective's layout of
        its [x_t ; x_0] input (read by the tiled pair kernel only), soft_targets [m, V] (a teacher's
        distributions for the last m entries, scored by KL(teacher || model) instead of their targets)
        -> (loss [], nll [n], correct [n])."""
        lm = causal_lm_of(self.model)
        most = agreed_rows(len(rows), lm, rows.device) if self.fast else 0
        if most * head_rows(lm) > 2 * chunk_elements():
            hidden = self.hidden_at(input_ids, attention_mask, position_ids, rows, cols, pair)  # [n, h]
            nll, correct = chunked_scores(lm, hidden, targets, soft_targets, most)
        else:
            logits = self.logits_at(input_ids, attention_mask, position_ids, rows, cols, pair)  # [n, V]
            nll, correct = scores(logits, targets, soft_targets)
        return (nll * weights).sum(), nll.detach(), correct

    def logits_at(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        rows: torch.Tensor,
        cols: torch.Tensor,
        pair: PairLayout | None = None,
    ) -> torch.Tensor:
        """Logits at (rows, cols) only. -> [n, V]"""
        if not self.fast:
            kwargs = self.model_kwargs(attention_mask, position_ids, pair)
            return self.model(input_ids=input_ids, **kwargs).logits[rows, cols]
        hidden = self.hidden_at(input_ids, attention_mask, position_ids, rows, cols, pair)
        return head_logits(causal_lm_of(self.model), hidden)  # [n, V]

    def hidden_at(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        rows: torch.Tensor,
        cols: torch.Tensor,
        pair: PairLayout | None = None,
    ) -> torch.Tensor:
        """The decoder's last hidden states at (rows, cols) (the fast path's). -> [n, h]"""
        kwargs = self.model_kwargs(attention_mask, position_ids, pair)
        lm = causal_lm_of(self.model)
        return lm.get_decoder()(input_ids=input_ids, **kwargs).last_hidden_state[rows, cols]

    def model_kwargs(
        self, attention_mask: torch.Tensor, position_ids: torch.Tensor | None, pair: PairLayout | None
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if pair is not None and causal_lm_of(self.model).config._attn_implementation == PAIR_KERNEL:
            kwargs["adapt_pair"] = pair
        return kwargs


CHUNK_ENV = "ADAPT_LOGITS_CHUNK"
CHUNK_ELEMENTS = 1 << 26
"""Logits computed at once when a step's would be over twice this (float32: 256 MiB a chunk); the
environment's ADAPT_LOGITS_CHUNK sets another."""


def chunk_elements() -> int:
    """Logits computed at once: ADAPT_LOGITS_CHUNK, else CHUNK_ELEMENTS; refused in one line unless a
    positive whole number."""
    raw = os.environ.get(CHUNK_ENV)
    if raw is None:
        return CHUNK_ELEMENTS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise AdaptError(
            f"{CHUNK_ENV}={raw!r} is not a positive whole number of logits (the default is {CHUNK_ELEMENTS})"
        )
    return value


def scores(
    logits: torch.Tensor, targets: torch.Tensor, soft: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the cross-entropy to its target, or, for the last len(soft) rows, the KL from the soft
    targets (a teacher's distributions); and whether the argmax is the target. -> (nll [n], correct [n])"""
    hard = len(targets) - (len(soft) if soft is not None else 0)
    nll = F.cross_entropy(logits[:hard].float(), targets[:hard], reduction="none")  # [hard]
    if soft is not None and len(soft):
        nll = torch.cat([nll, kl_divergence(soft, logits[hard:])])  # [n]
    return nll, logits.detach().argmax(-1) == targets


def chunked_scores(
    lm: Any, hidden: torch.Tensor, targets: torch.Tensor, soft: torch.Tensor | None, most: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores` of head_logits(lm, hidden) over `chunk_spans`, each chunk's logits recomputed in the
    backward pass (activation checkpointing) instead of kept: the [n, V] logits, their float32 copy and
    their gradient never exist at once (the joint objective at 4k tokens reads them at 2L rows)."""
    from torch.utils.checkpoint import checkpoint

    n = len(targets)
    hard = n - (len(soft) if soft is not None else 0)

    def part(h: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return scores(head_logits(lm, h), t, s)

    nll, correct = [], []
    for a, b in chunk_spans(n, most, lm):
        s = soft[max(a - hard, 0) : max(b - hard, 0)] if soft is not None else None
        args = (hidden[a:b], targets[a:b], s)
        if torch.is_grad_enabled():
            out = checkpoint(part, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            out = part(*args)
        nll.append(out[0])
        correct.append(out[1])
    return torch.cat(nll), torch.cat(correct)


def agreed_rows(n: int, lm: Any, device: torch.device) -> int:
    """The rows of logits to plan chunks for: under ZeRO-3 (a partitioned head) the most any process reads
    in this forward, so that every rank calls the head equally often (ZeRO-3 gathers its weight at each
    call, a collective every rank must join); elsewhere this process's own n (no collective)."""
    import torch.distributed as dist

    partitioned = hasattr(lm.get_output_embeddings().weight, "ds_id")
    if not (partitioned and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return n
    most = torch.tensor([n], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())


def chunk_spans(n: int, most: int, lm: Any) -> list[tuple[int, int]]:
    """Row spans [a, b) of `chunk_rows` rows covering `most` rows, clipped to this process's n (the last
    ones empty where it has fewer)."""
    chunk = chunk_rows(lm)
    return [(min(a, n), min(a + chunk, n)) for a in range(0, most, chunk)]


def chunk_rows(lm: Any) -> int:
    """Rows of logits computed at once: `chunk_elements` over the head's width."""
    return max(1, chunk_elements() // head_rows(lm))


def head_rows(lm: Any) -> int:
    """Rows of the LM head's weight: the width of its logits (ZeRO-3 partitions keep their whole shape in
    ds_shape)."""
    weight = lm.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def kl_divergence(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(logits)) per row: [m, V] probabilities and logits -> [m]."""
    logq = F.log_softmax(logits.float(), dim=-1)
    return (torch.xlogy(p, p) - p * logq).sum(-1)


def causal_lm_of(model: nn.Module) -> Any:
    """The transformers causal LM inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_blocks(lm: Any) -> list[Any]:
    """The blocks of a causal LM's decoder: its `layers`/`h`/`blocks` list (empty if it has none)."""
    decoder = lm.get_decoder()
    for attr in ("layers", "h", "blocks"):
        blocks = getattr(decoder, attr, None)
        if blocks is not None and len(blocks):
            return list(blocks)
    return []


def head_logits(lm: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head applied to selected hidden states [n, h] -> [n, V], with the config's logit transforms."""
    logits = lm.get_output_embeddings()(hidden)
    config = lm.config
    scaling = getattr(config, "logits_scaling", None)  # granite divides its logits
    if scaling:
        logits = logits / scaling
    scale = getattr(config, "logit_scale", None)  # cohere multiplies them
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)  # gemma2-style soft-capping
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def check_fast_path(model: nn.Module, vocab_ids: list[int], length: int = 8) -> bool:
    """Whether decoder + head at chosen positions reproduces the model's own logits on a probe."""
    causal_lm = causal_lm_of(model)
    if causal_lm.get_output_embeddings() is None or causal_lm.get_decoder() is causal_lm:
        return False
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([vocab_ids[i % len(vocab_ids)] for i in range(2 * length)]).view(2, length)
        ids = ids.to(next(model.parameters()).device)
        mask = torch.ones_like(ids)
        rows = torch.tensor([0, 0, 1, 1], device=ids.device)
        cols = torch.tensor([0, length - 1, 1, length // 2], device=ids.device)
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, cols]
        fast = TokenLoss(model).logits_at(ids, mask, None, rows, cols)
        return bool(torch.allclose(full.float(), fast.float(), atol=1e-4, rtol=1e-3))
    except (AttributeError, TypeError, NotImplementedError):
        return False
    finally:
        model.train(was_training)
