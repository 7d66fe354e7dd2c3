"""Checks that a converted model really is a correct bidirectional version of its source.

Each check raises `AdaptError` naming itself; conversion refuses an architecture that fails any.
`checkpoint_checks` runs the checks that need no source model on a saved checkpoint (`adapt verify`),
with the block-diffusion ones (block causality, exact KV cache) when the checkpoint records a block size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adapt.core.attention import block_causal_allowed, causal_mask_4d, position_ids_from_mask, to_additive
from adapt.core.checkpoint import DiffusionSettings
from adapt.core.errors import AdaptError


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


def ordinary_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Ids of ordinary tokens: in both tokenizer and embedding matrix, not special."""
    rows = model.get_input_embeddings().num_embeddings
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(min(len(tokenizer), rows)) if i not in special]
    if len(ids) < 2:
        raise AdaptError("the tokenizer has fewer than two ordinary tokens")
    return ids


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
        why = (
            "config.json sets is_causal to true"
            if getattr(model.config, "is_causal", None) is True
            else "this architecture ignores config.is_causal=False"
        )
        raise AdaptError(
            "check 'bidirectional attention' failed: changing a future token did not change the logits at "
            f"position 0, so {why}"
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


# ---------------------------------------------------------------- a saved checkpoint (`adapt verify`)


def check_settings(
    settings: DiffusionSettings,
    embedding_rows: int,
    special_ids: dict[str, int | None],
    context: int | None,
    config_mask_id: int | None = None,
) -> None:
    """The recorded settings are usable: the mask token is a row of the embeddings and no special token
    (`special_ids`: name -> id, e.g. eos, pad, bos), and the block size is None or 1 <= B < context."""
    mask_id = settings.mask_token_id
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < embedding_rows:
        raise AdaptError(
            f"check 'settings' failed: mask_token_id {mask_id!r} is outside the embedding matrix "
            f"({embedding_rows} rows)"
        )
    if config_mask_id is not None and config_mask_id != mask_id:
        raise AdaptError(
            f"check 'settings' failed: config.json's mask_token_id {config_mask_id} differs from the "
            f"diffusion settings' {mask_id}"
        )
    clash = [name for name, i in special_ids.items() if i is not None and i == mask_id]
    if clash:
        raise AdaptError(
            f"check 'settings' failed: mask_token_id {mask_id} is also the {' and '.join(clash)} token"
        )
    block = settings.block_size
    if block is None:
        return
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise AdaptError(
            f"check 'settings' failed: block_size must be null or an integer >= 1, not {block!r}"
        )
    if context is not None and block >= context:
        raise AdaptError(
            f"check 'settings' failed: block_size {block} is not smaller than the model's context of "
            f"{context} tokens"
        )


def probe_length(block_size: int | None, context: int | None) -> int:
    """12 tokens, or 3 blocks for a block checkpoint, capped by the model's context."""
    length = max(12, 3 * block_size) if block_size else 12
    return min(length, context) if context else length


def check_block_causality(model, probe: Probe, block_size: int) -> None:
    """Under `block_causal_allowed`: a block never moves the logits of earlier blocks, every position of a
    block sees the block's last token, and the next block sees it too."""
    dtype = next(model.parameters()).dtype
    ids, spare = probe.long[:1], probe.long[1:].flatten()
    length = ids.shape[1]
    positions = _positions(ids)
    mask = to_additive(block_causal_allowed(positions, block_size), dtype)

    def logits(x: torch.Tensor) -> torch.Tensor:  # [L, V]
        return forward_logits(model, x, attention_mask=mask, position_ids=positions)[0]

    base = logits(ids)
    for lo in range(block_size, length, block_size):
        later = ids.clone()  # every token of block lo // B changed
        for c in range(lo, min(lo + block_size, length)):
            later[0, c] = _different(int(ids[0, c]), spare)
        err = rel_diff(logits(later)[:lo], base[:lo])
        if err > tolerance(dtype):
            raise AdaptError(
                f"check 'block causality' failed: changing block {lo // block_size} changed the logits of "
                f"earlier blocks (relative error {err:.2e}); the model does not honour the block-causal mask"
            )
    for lo in range(0, length, block_size):
        last = min(lo + block_size, length) - 1
        changed = ids.clone()
        changed[0, last] = _different(int(ids[0, last]), spare)
        moved = (logits(changed) - base).abs().amax(-1)  # [L]
        if not moved[lo] > 0:
            raise AdaptError(
                f"check 'block causality' failed: changing the last token of block {lo // block_size} did "
                "not change the logits at its first position; attention inside a block is not bidirectional"
            )
        if last + 1 < length and not moved[last + 1] > 0:
            raise AdaptError(
                f"check 'block causality' failed: block {lo // block_size + 1} does not see block "
                f"{lo // block_size} (changing its last token did not move the next block's logits)"
            )


@torch.no_grad()
def check_exact_cache(model, tokenizer, settings: DiffusionSettings, probe: Probe, steps: int = 3) -> None:
    """`BlockDenoiser` with its KV cache gives the logits of block-causal recomputation at every step.

    Two right-padded rows (prompts of different lengths, so blocks start mid-prompt and one row ends
    early) are decoded block by block: a few steps unmasking some positions, then the block is filled.
    """
    from adapt.sampling.cache import BlockDenoiser
    from adapt.sampling.canvas import build_canvas

    block = settings.block_size
    assert block, "check_exact_cache is for block-diffusion checkpoints"
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    length = probe.long.shape[1]
    first = min(block // 2 + 1, length - 1)
    prompts = [probe.long[0, :first].tolist(), probe.long[1, :1].tolist()]
    canvas = build_canvas(prompts, tokenizer, settings, length - first, False, None, device, "right")
    ids = canvas.ids.clone()
    clean, mask_id = settings.clean_attention, settings.mask_token_id
    cached = BlockDenoiser(model, block, cached=True, clean=clean, mask_id=mask_id)
    plain = BlockDenoiser(model, block, cached=False, clean=clean, mask_id=mask_id)
    gen = torch.Generator().manual_seed(0)
    end = int(canvas.end.max())
    for lo in range(int(canvas.start.min()) // block * block, end, block):
        hi = min(lo + block, end)
        for d in (cached, plain):
            d.start_block(lo, hi)
        keep = torch.arange(max(lo - 1, 0), hi, device=device)  # with the previous block's last column
        for step in range(steps):
            a = cached.logits(ids, canvas.attention_mask, canvas.position_ids, keep).float().cpu()
            b = plain.logits(ids, canvas.attention_mask, canvas.position_ids, keep).float().cpu()
            err = rel_diff(a, b)
            if err > tolerance(dtype):
                raise AdaptError(
                    f"check 'exact KV cache' failed: at block {lo // block}, step {step + 1} the cached "
                    f"logits differ from block-causal recomputation (relative error {err:.2e})"
                )
            pred = a[:, -(hi - lo) :].argmax(-1).to(device)
            masked = ids[:, lo:hi] == settings.mask_token_id
            fill = masked & (torch.rand(masked.shape, generator=gen) < 0.4).to(device)
            if step == steps - 1:
                fill = masked  # commit the block: later blocks see it clean
            ids[:, lo:hi] = torch.where(fill, pred, ids[:, lo:hi])


def checkpoint_checks(model, tokenizer, settings: DiffusionSettings) -> Iterator[str]:
    """Run the checks of a saved diffusion checkpoint, yielding each one's name as it passes.

    Every checkpoint: settings, bidirectional attention, padding and batch invariance. Block checkpoints
    also: block causality under the block-causal mask and the exact KV cache, on a probe of >= 3 blocks.
    The first failure raises `AdaptError` naming the check.
    """
    from adapt.sampling.canvas import pad_id
    from adapt.sampling.engine import context_length

    context = context_length(model.config)
    special = {"EOS": tokenizer.eos_token_id, "PAD": tokenizer.pad_token_id, "BOS": tokenizer.bos_token_id}
    rows = model.get_input_embeddings().num_embeddings
    check_settings(settings, rows, special, context, getattr(model.config, "mask_token_id", None))
    yield "settings"
    length = probe_length(settings.block_size, context)
    probe = make_probe(ordinary_token_ids(model, tokenizer), length=length, short=min(7, length - 1))
    was_training = model.training
    model.eval()
    try:
        check_bidirectional(model, probe)
        yield "bidirectional attention"
        check_padding_invariance(model, probe, pad_id(tokenizer))
        yield "padding invariance"
        check_batch_invariance(model, probe)
        yield "batch invariance"
        if settings.block_size:
            check_block_causality(model, probe, settings.block_size)
            yield "block causality"
            check_exact_cache(model, tokenizer, settings, probe)
            yield "exact KV cache"
    finally:
        model.train(was_training)


def load_checkpoint(
    path: str | os.PathLike, revision: str | None = None
) -> tuple[Any, Any, DiffusionSettings]:
    """A diffusion checkpoint (directory or Hub id at `revision`, full or LoRA adapter export) on the CPU
    in float32, with load failures as one-line `AdaptError`s.

    A missing directory or a non-diffusion checkpoint gets `load_settings`' own error.
    """
    from adapt.core.errors import first_line
    from adapt.loading.model import load_diffusion_model

    try:
        return load_diffusion_model(path, device="cpu", revision=revision)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise AdaptError(f"cannot load the checkpoint {path}: {first_line(e)}") from e


def describe(settings: DiffusionSettings) -> str:
    """How a checkpoint attends: 'full attention' or 'block diffusion, block size B' (+ causal clean)."""
    if settings.block_size:
        causal = ", causal clean attention" if settings.clean_attention == "causal" else ""
        return f"block diffusion, block size {settings.block_size}{causal}"
    return "full attention"


def _different(token: int, candidates: torch.Tensor) -> int:
    """The first of `candidates` that is not `token`."""
    for c in candidates.tolist():
        if c != token:
            return int(c)
    raise AdaptError("the probe holds a single distinct token; the vocabulary is too small to verify")


def _positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1])[None].expand_as(ids)
