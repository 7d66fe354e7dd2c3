"""Block diffusion (BD3-LM): autoregressive over blocks of B tokens, masked diffusion inside a block.

One forward pass trains every block at once. The input is the pair [x_t ; x_0] (length 2l) with the
position ids repeated, under `adapt.core.attention.block_pair_allowed`: noisy block b sees itself and the
clean blocks < b, clean block b sees the clean blocks <= b (`diffusion.clean_attention: causal`: each
clean token sees the clean tokens before it, the AR source's own attention). Each block draws its own t;
the loss is 1/t-weighted cross-entropy on the masked tokens of x_t, normalised like the full-attention
objective (sequence length for pretraining, response length for SFT).

Blocks follow positions (position // B), so left padding and packed documents (whose positions restart)
keep their blocks, and a block never spans two documents. With `shift` the prediction for token j is
read from j - 1; for the first token of a block that is the last token of the previous block, read from
the clean half (the noisy copy of the previous block does not exist for this block's queries).

B = 1 with shift is the AR model's own loss; B = l is the full-attention objective. A block-size
schedule (LLaDA2) moves from the first towards the second during adaptation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from adapt.core.attention import (
    MaskStyle,
    block_ids,
    block_pair_allowed,
    pair_mask_mod,
    position_ids_from_mask,
)
from adapt.core.checkpoint import DiffusionSettings
from adapt.core.diffusion import complementary_mask, maskable_positions, sample_t
from adapt.core.errors import AdaptError
from adapt.core.flex import block_mask
from adapt.core.pair_attention import PairLayout, no_dense_mask
from adapt.training.config import DiffusionConfig
from adapt.training.objectives.teacher import Teacher

Inputs = dict[str, Any]  # tensors, the attention argument (dense, BlockMask or placeholder), a PairLayout


@dataclass
class BlockDiffusion:
    """The block-diffusion objective (`diffusion.block_size` set), with its block-size schedule."""

    config: DiffusionConfig
    settings: DiffusionSettings
    name: str = "block"
    teacher: Teacher | None = None
    """`diffusion.ar_teacher` loaded: training steps match its next-token distributions (KL)."""

    def __post_init__(self) -> None:
        if self.config.ar_loss_weight and not self.settings.shift:
            raise AdaptError(
                "diffusion.ar_loss_weight needs a checkpoint with shift (logits at i predict token i + 1, "
                "the AR head's meaning); this one reads each prediction at its own position"
            )

    def block_size_at(self, step: int | None) -> int:
        """The schedule's block size at `step`; None (evaluation) is the target `diffusion.block_size`."""
        size = self.config.block_size
        assert size is not None
        if step is None:
            return size
        for start, scheduled in self.config.block_schedule or []:
            if step >= start:
                size = scheduled
        return size

    def inputs(
        self,
        batch: dict[str, torch.Tensor],
        step: int | None,
        generator: torch.Generator,
        style: MaskStyle | torch.dtype,
    ) -> Inputs:
        """`TokenLoss` inputs for a clean batch at the block size of `step`, its mask in `style`."""
        d = self.config
        ids, am = batch["input_ids"], batch["attention_mask"]  # [b, l]
        positions = token_positions(batch)
        segments = batch.get("segment_ids")
        size = self.block_size_at(step)
        maskable = maskable_positions(am, self.settings.shift, batch.get("prompt_mask"), d.train_on_padding)
        if d.full_mask:  # TiDAR: every block wholly masked (t = 1), as the verify sampler's mask blocks
            t, masked = torch.ones(ids.shape, device=ids.device), maskable.clone()
        else:
            t = block_noise_levels(positions, segments, size, d.eps, d.low_discrepancy, generator)  # [b, l]
            masked = (torch.rand(ids.shape, generator=generator, device=ids.device) < t) & maskable
        sft = batch.get("prompt_mask") is not None
        views = [(masked, t)]
        if d.complementary_masking:
            views.append((complementary_mask(masked, maskable), (1.0 - t).clamp(min=d.eps)))
        settings = self.record(self.settings)  # the recipe's block settings, not the loaded checkpoint's
        style = MaskStyle.of(style)
        shared = style.kind in ("flex", "tiled") and len(views) > 1  # one mask function over stacked views
        each = None if shared else style
        parts = [
            pair_inputs(ids, am, positions, segments, m, level, maskable, size, settings, sft, each)
            for m, level in views
        ]
        out = concat_views(parts, ids.shape[1])
        if shared:
            n = len(views)
            docs = None if segments is None else segments.repeat(n, 1)
            rows = (positions.repeat(n, 1), size, am.repeat(n, 1), docs, settings.clean_attention)
            out["attention_mask"], out["pair"] = pair_attention(*rows, style)
        if d.ar_loss_weight:
            ar = ar_term(ids, positions, maskable, d.ar_loss_weight)
            if self.teacher is not None and step is not None:  # evaluation: the tokens' cross-entropy
                clean = ar["cols"] - ids.shape[1]
                ar["soft_targets"] = self.teacher.probabilities(batch, positions, ar["rows"], clean)
            out = with_ar_term(out, ar)
        return out

    def step_metrics(self, step: int, batch: dict[str, torch.Tensor], inputs: Inputs) -> dict[str, float]:
        return {"block_size": float(self.block_size_at(step))}

    def record(self, settings: DiffusionSettings) -> DiffusionSettings:
        """The export records the target block size, how clean tokens attend, the AR term's weight and
        whether blocks were wholly masked; samplers decode with them."""
        d = self.config
        recorded = settings.with_block_size(d.block_size, d.clean_attention)
        return replace(recorded, ar_loss_weight=d.ar_loss_weight, full_mask=d.full_mask)


def token_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Position ids of a batch: given (packed documents), else counted over real tokens. [b, l]"""
    given = batch.get("position_ids")
    return given if given is not None else position_ids_from_mask(batch["attention_mask"])


def block_index(positions: torch.Tensor, segments: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """A distinct index for every (document piece, block) of each row, counted from 0 along the row. [b, l]

    A block starts where position % B == 0 (positions restart at every document) or the document changes.
    """
    starts = positions % block_size == 0  # [b, l]
    starts[:, 0] = True
    if segments is not None:
        starts[:, 1:] |= segments[:, 1:] != segments[:, :-1]
    return starts.long().cumsum(-1) - 1


def block_noise_levels(
    positions: torch.Tensor,
    segments: torch.Tensor | None,
    block_size: int,
    eps: float,
    low_discrepancy: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """t ~ U(eps, 1) drawn once per block and spread over its tokens. -> [b, l]

    With `low_discrepancy` the draws of all (row, block) pairs are stratified together.
    """
    index = block_index(positions, segments, block_size)  # [b, l]
    per_row = int(index.max()) + 1
    t = sample_t(positions.shape[0] * per_row, eps, low_discrepancy, generator, positions.device)
    return t.view(-1, per_row).gather(1, index)  # [b, l]


def pair_inputs(
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    segments: torch.Tensor | None,
    masked: torch.Tensor,
    t: torch.Tensor,
    maskable: torch.Tensor,
    block_size: int,
    settings: DiffusionSettings,
    sft: bool,
    style: MaskStyle | torch.dtype | None,
) -> Inputs:
    """One view: the pair [x_t ; x_0] and where each masked token's prediction is read.

    ids, attention_mask, positions, segments, masked (bool), t (per token), maskable: [b, l].
    Weights are 1/t over the row's normaliser (maskable tokens for SFT, else l) over the batch size. The
    mask is in `style` (`MaskStyle`, or a float dtype for an additive mask); None leaves it to the caller.
    """
    batch, length = ids.shape
    noisy = ids.masked_fill(masked, settings.mask_token_id)
    clean = settings.clean_attention
    mask, layout = (None, None)
    if style is not None:
        mask, layout = pair_attention(positions, block_size, attention_mask, segments, clean, style)
    rows, cols = masked.nonzero(as_tuple=True)  # [n]
    source = cols
    if settings.shift:
        first = block_ids(positions, block_size)[rows, cols] * block_size == positions[rows, cols]  # [n]
        source = torch.where(first, length + cols - 1, cols - 1)  # the previous block's last clean token
    norm = maskable.sum(-1).clamp(min=1).float() if sft else torch.full((batch,), float(length))
    norm = norm.to(ids.device)
    return {
        "input_ids": torch.cat([noisy, ids], dim=1),  # [b, 2l]
        "attention_mask": mask,
        "position_ids": positions.repeat(1, 2),
        "rows": rows,
        "cols": source,
        "targets": ids[rows, cols],
        "weights": 1.0 / (t[rows, cols].float() * norm[rows] * batch),
        "pair": layout,  # for the tiled pair kernel (`adapt.core.pair_attention`)
    }


def pair_attention(
    positions: torch.Tensor,
    block_size: int,
    attention_mask: torch.Tensor,
    segments: torch.Tensor | None,
    clean: str,
    style: MaskStyle | torch.dtype,
) -> tuple[Any, PairLayout]:
    """The pair's attention in `style`: (the model's attention_mask argument: a dense [b, 1, 2l, 2l] mask,
    a BlockMask, or for the tiled kernel a one-element placeholder; the pair's layout)."""
    style = MaskStyle.of(style)
    batch, length = positions.shape
    if style.kind in ("bool", "additive"):
        dense = block_pair_allowed(positions, block_size, attention_mask, segments, clean)
        return style.dense(dense), PairLayout(length, block_size)
    mod = pair_mask_mod(positions, block_size, attention_mask, segments, clean)
    if style.kind == "tiled":
        plain = clean == "causal" and segments is None and bool(attention_mask.all())
        layout = PairLayout(length, block_size, mod, causal_clean=plain)
        return no_dense_mask(batch, 2 * length, positions.device), layout
    return block_mask(mod, batch, 2 * length, positions.device), PairLayout(length, block_size)


def concat_views(parts: list[Inputs], length: int) -> Inputs:
    """Stack the views of complementary masking as extra rows; each view keeps its batch-mean weight."""
    if len(parts) == 1:
        return parts[0]
    out: Inputs = {}
    offset = 0
    rows = []
    for p in parts:
        assert p["rows"] is not None and p["input_ids"] is not None
        rows.append(p["rows"] + offset)
        offset += p["input_ids"].shape[0]
    for key in ("input_ids", "attention_mask", "position_ids", "cols", "targets", "weights"):
        values = [p[key] for p in parts]
        out[key] = None if values[0] is None else torch.cat(values)  # type: ignore[arg-type]
    out["rows"] = torch.cat(rows)
    out["pair"] = parts[0]["pair"]
    out["weights"] = out["weights"] / len(parts)  # type: ignore[operator]
    return out


def ar_term(ids: torch.Tensor, positions: torch.Tensor, maskable: torch.Tensor, weight: float) -> Inputs:
    """The joint objective's AR term: token j predicted by clean column l + j - 1 (clean attention causal,
    so that column sees tokens < j only: the AR source's own next-token prediction).

    Targets are the maskable tokens (real, not prompt, not a row's first) that are not a document's first
    (position 0); each weighs `weight` over their count, so with weight 1 the term is the batch's mean
    next-token cross-entropy, the AR source's own causal-LM loss. ids, positions, maskable: [b, l].
    """
    targets = maskable & (positions > 0)
    targets[:, 0] = False
    rows, cols = targets.nonzero(as_tuple=True)  # [n]
    n = max(rows.numel(), 1)
    return {
        "rows": rows,
        "cols": ids.shape[1] + cols - 1,
        "targets": ids[rows, cols],
        "weights": torch.full((rows.numel(),), weight / n, device=ids.device),
    }


def with_ar_term(inputs: Inputs, ar: Inputs) -> Inputs:
    """The diffusion entries followed by the AR term's (over the first view's rows); `ar` [n] marks which
    entries are the AR term, for the metrics."""
    out = dict(inputs)
    for key in ("rows", "cols", "targets", "weights"):
        out[key] = torch.cat([inputs[key], ar[key]])  # type: ignore[list-item]
    if "soft_targets" in ar:  # the teacher's distributions for the last entries
        out["soft_targets"] = ar["soft_targets"]
    diffusion = inputs["rows"].numel()  # type: ignore[union-attr]
    out["ar"] = torch.arange(out["rows"].numel(), device=out["rows"].device) >= diffusion  # type: ignore[union-attr]
    return out
