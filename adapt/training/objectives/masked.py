"""Full-attention masked diffusion (LLaDA, DiffuLLaMA): one noise level per sequence, bidirectional.

Each sample draws t ~ U(eps, 1), every maskable token is masked with probability t, and the model sees
the noisy sequence with (after optional DiffuLLaMA annealing) fully bidirectional attention; packed
documents see only themselves. The loss is 1/t-weighted cross-entropy on the masked tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adapt.core.attention import MaskStyle, position_ids_from_mask
from adapt.core.checkpoint import DiffusionSettings
from adapt.core.diffusion import (
    annealing_allowed,
    build_attention_mask,
    complementary_mask,
    mask_tokens,
    maskable_positions,
    sample_t,
)
from adapt.training.config import DiffusionConfig

Inputs = dict[str, Any]  # tensors, the attention argument (dense, BlockMask or placeholder), a PairLayout


@dataclass
class MaskedDiffusion:
    """The full-attention objective (`diffusion.block_size` unset)."""

    config: DiffusionConfig
    settings: DiffusionSettings
    name: str = "masked"

    def inputs(
        self,
        batch: dict[str, torch.Tensor],
        step: int | None,
        generator: torch.Generator,
        style: MaskStyle | torch.dtype,
    ) -> Inputs:
        """`TokenLoss` inputs for a clean batch, its mask in `style`; step None is the final setting
        (annealing done)."""
        final = max(self.config.anneal_steps, 0) if step is None else step
        return noise_batch(batch, final, generator, self.config, self.settings, style)

    def step_metrics(self, step: int, batch: dict[str, torch.Tensor], inputs: Inputs) -> dict[str, float]:
        """Share of future edges open (attention annealing)."""
        return {"attention_open": open_fraction(inputs["attention_mask"], batch["attention_mask"])}

    def record(self, settings: DiffusionSettings) -> DiffusionSettings:
        """Full attention: the export records no block size."""
        return settings.with_block_size(None)


def noise_batch(
    batch: dict[str, torch.Tensor],
    step: int,
    generator: torch.Generator,
    d: DiffusionConfig,
    settings: DiffusionSettings,
    style: MaskStyle | torch.dtype,
) -> Inputs:
    """A clean batch -> the inputs of `TokenLoss` (both views with complementary masking).

    batch: input_ids, attention_mask [b, l], optional prompt_mask, segment_ids, position_ids [b, l].
    """
    shift, mask_id = settings.shift, settings.mask_token_id
    ids, am = batch["input_ids"], batch["attention_mask"]  # [b, l]
    prompt = batch.get("prompt_mask")
    maskable = maskable_positions(am, shift, prompt, d.train_on_padding)  # [b, l]
    t = sample_t(ids.shape[0], d.eps, d.low_discrepancy, generator, ids.device)  # [b]
    noisy, masked = mask_tokens(ids, t, mask_id, maskable, generator)
    if d.complementary_masking:
        other = complementary_mask(masked, maskable)
        noisy = torch.cat([noisy, ids.masked_fill(other, mask_id)])  # [2b, l]
        masked, t = torch.cat([masked, other]), torch.cat([t, (1.0 - t).clamp(min=d.eps)])
        ids, am, maskable = ids.repeat(2, 1), am.repeat(2, 1), maskable.repeat(2, 1)
        prompt = None if prompt is None else prompt.repeat(2, 1)
    # SFT normalises by the response length, pretraining by the sequence length
    norm = maskable.sum(-1).clamp(min=1).float() if prompt is not None else torch.full_like(t, ids.shape[1])
    attn = full_mask(batch, am, MaskStyle.of(style), step, d, generator)
    position_ids = batch.get("position_ids")
    if position_ids is None and not bool(am.all()):
        position_ids = position_ids_from_mask(am)
    elif position_ids is not None and d.complementary_masking:
        position_ids = position_ids.repeat(2, 1)
    rows, cols = masked.nonzero(as_tuple=True)  # [n], [n]
    weights = 1.0 / (t[rows] * norm[rows] * ids.shape[0])  # [n]: 1/t, per-sample normaliser, batch mean
    return {
        "input_ids": noisy,
        "attention_mask": attn,
        "position_ids": position_ids,
        "rows": rows,
        "cols": cols - 1 if shift else cols,
        "targets": ids[rows, cols],
        "weights": weights,
    }


def full_mask(
    batch: dict[str, torch.Tensor],
    am: torch.Tensor,
    style: MaskStyle,
    step: int,
    d: DiffusionConfig,
    generator: torch.Generator,
) -> Any:
    """The attention argument for the (possibly doubled) padding mask `am` [b', l]: the 2D mask, a dense
    mask in `style`, or a FlexAttention BlockMask; annealing draws its pattern from `generator` either way."""
    repeat = am.shape[0] // batch["input_ids"].shape[0]
    if style.kind != "flex":
        segments = segment_allowed(batch, repeat)
        return build_attention_mask(am, style, step, d.anneal_steps, segments, generator)
    from adapt.core.flex import block_mask, full_mask_mod

    annealed = annealing_allowed(step, d.anneal_steps, am.shape[1], generator, am.device)
    docs = batch.get("segment_ids")
    docs = None if docs is None else docs.repeat(repeat, 1)
    return block_mask(full_mask_mod(am, docs, annealed), am.shape[0], am.shape[1], am.device)


def segment_allowed(batch: dict[str, torch.Tensor], repeat: int = 1) -> torch.Tensor | None:
    """Block-diagonal document pattern [b, 1, l, l] for packed batches that carry document ids."""
    docs = batch.get("segment_ids")
    if docs is None:
        return None
    from adapt.training.data import document_mask

    allowed = document_mask(docs)
    return allowed.repeat(repeat, 1, 1, 1) if repeat > 1 else allowed


def open_fraction(attention_mask: Any, real: torch.Tensor) -> float:
    """Share of future edges between real tokens that are open, over the batch; 1.0 for a 2D mask.

    attention_mask: the model's mask ([b, l], additive or bool [b, 1, l, l], or a BlockMask); real: [b, l].
    """
    if not isinstance(attention_mask, torch.Tensor):  # a FlexAttention BlockMask of `full_mask_mod`
        attention_mask = attention_mask.mask_mod.dense()  # None: bidirectional over padding, as a 2D mask
    if attention_mask is None or attention_mask.ndim == 2:
        return 1.0
    mask = attention_mask[:, 0]  # [b', l, l]; b' = 2b with complementary masking
    opened = mask if mask.dtype == torch.bool else mask == 0
    real = real.bool().repeat(opened.shape[0] // real.shape[0], 1)
    pairs = real[:, :, None] & real[:, None, :] & torch.ones_like(opened[0]).triu(1)  # [b, l, l]
    return float((opened & pairs).sum() / pairs.sum().clamp(min=1))
