"""Checks that a converted model really is a correct bidirectional version of its source.

Each check raises `AdaptError` naming itself; conversion refuses an architecture that fails any.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapt.attention import causal_mask_4d, position_ids_from_mask
from adapt.errors import AdaptError


@dataclass
class Probe:
    """Fixed random token sequences used by every check, and the source model's logits on them."""

    long: torch.Tensor  # [2, L] two sequences of equal length
    short: torch.Tensor  # [1, S] S < L, for padding checks
    source_logits: torch.Tensor | None = None  # [2, L, V_src] of the unconverted model on `long`


def make_probe(token_ids: Sequence[int], length: int = 12, short: int = 7, seed: int = 0) -> Probe:
    """Random sequences drawn from `token_ids` (ordinary tokens: no specials, no mask)."""
    pool = torch.tensor(sorted(set(token_ids)))
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(pool), (3, length), generator=gen)
    ids = pool[pick]
    return Probe(long=ids[:2].clone(), short=ids[2:, :short].clone())


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance on logits for computations that should agree up to kernel rounding."""
    return 1e-4 if dtype == torch.float32 else 5e-2


@torch.no_grad()
def forward_logits(
    model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw
) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        kw.setdefault("position_ids", position_ids_from_mask(attention_mask))
    return model(input_ids=ids, attention_mask=attention_mask, **kw).logits.float().cpu()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()


@torch.no_grad()
def record_source(model, probe: Probe) -> None:
    """Store the unconverted (causal) model's logits on the probe; call before converting."""
    probe.source_logits = forward_logits(model, probe.long)


def future_token_effect(model, probe: Probe) -> float:
    """How much changing the last token moves the logits at position 0 (exactly 0 for a causal model)."""
    ids = probe.long[:1]
    changed = ids.clone()
    changed[0, -1] = probe.long[1, -1] if probe.long[1, -1] != ids[0, -1] else probe.long[1, 0]
    return (forward_logits(model, ids)[0, 0] - forward_logits(model, changed)[0, 0]).abs().max().item()


def check_source_is_causal(model, probe: Probe) -> None:
    """The source must be causal: a future token must not reach position 0."""
    if future_token_effect(model, probe) > 0:
        raise AdaptError("check 'source is causal' failed: the source model already attends to future tokens")


def check_bidirectional(model, probe: Probe) -> None:
    """Changing the last token must change the logits at position 0."""
    if not future_token_effect(model, probe) > 0:
        raise AdaptError(
            "check 'bidirectional attention' failed: changing a future token did not change the logits at "
            "position 0, so this architecture ignores config.is_causal=False"
        )


def check_causal_parity(model, probe: Probe, vocab: Sequence[int]) -> None:
    """Under an explicit 4D causal mask, logits over the source vocabulary equal the source model's."""
    assert probe.source_logits is not None, "record_source() must run before conversion"
    ids = probe.long
    dtype = next(model.parameters()).dtype
    mask = causal_mask_4d(torch.ones_like(ids), dtype)
    cols = torch.tensor(list(vocab))
    got = forward_logits(model, ids, attention_mask=mask, position_ids=_positions(ids))[..., cols]
    err = rel_diff(got, probe.source_logits[..., cols])
    if err > tolerance(dtype):
        raise AdaptError(
            f"check 'causal parity' failed: with the causal mask restored the logits differ from the source "
            f"model's (relative error {err:.2e}); this architecture does not honour 4D attention masks"
        )


def check_padding_invariance(model, probe: Probe, pad_id: int) -> None:
    """Left and right padding give the same logits on real tokens as the unpadded sequence."""
    dtype = next(model.parameters()).dtype
    long, short = probe.long[:1], probe.short
    alone = forward_logits(model, short)[0]
    n, length = short.shape[1], long.shape[1]
    for side in ("left", "right"):
        ids = torch.full((2, length), pad_id, dtype=long.dtype)
        mask = torch.zeros(2, length, dtype=torch.long)
        ids[0], mask[0] = long[0], 1
        span = slice(length - n, length) if side == "left" else slice(0, n)
        ids[1, span], mask[1, span] = short[0], 1
        got = forward_logits(model, ids, attention_mask=mask)[1, span]
        err = rel_diff(got, alone)
        if err > tolerance(dtype):
            raise AdaptError(
                f"check 'padding invariance' failed: {side} padding changes the logits of real tokens "
                f"(relative error {err:.2e})"
            )


def check_batch_invariance(model, probe: Probe) -> None:
    """A batch of two sequences gives each the logits it gets alone."""
    dtype = next(model.parameters()).dtype
    batch = forward_logits(model, probe.long)
    for i in range(probe.long.shape[0]):
        err = rel_diff(batch[i], forward_logits(model, probe.long[i : i + 1])[0])
        if err > tolerance(dtype):
            raise AdaptError(
                f"check 'batch invariance' failed: sequence {i} gets different logits inside a batch "
                f"(relative error {err:.2e})"
            )


def verify_converted(model, probe: Probe, vocab: Sequence[int], pad_id: int) -> list[str]:
    """Run every check; return the names of those that passed (all, or an error is raised)."""
    was_training = model.training
    model.eval()
    try:
        check_bidirectional(model, probe)
        check_causal_parity(model, probe, vocab)
        check_padding_invariance(model, probe, pad_id)
        check_batch_invariance(model, probe)
    finally:
        model.train(was_training)
    return ["bidirectional attention", "causal parity", "padding invariance", "batch invariance"]


def _positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1])[None].expand_as(ids)
