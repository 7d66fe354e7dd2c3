"""Attention masks and positions that reach any architecture through transformers' 4D-mask path.

A `(batch, 1, q, k)` mask is passed through unchanged by the stock mask builders, so causal, annealed
and padded patterns need no modeling code. The patterns here are boolean (True where a query may attend
to a key); `MaskStyle` gives them to a kernel as it takes them: boolean for sdpa, additive (0 or the
dtype's minimum) for eager, or as mask functions (`adapt.core.flex`) where no dense mask is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

MaskKind = Literal["additive", "bool", "tiled", "flex"]


@dataclass(frozen=True)
class MaskStyle:
    """How a training pattern reaches the attention kernel: an additive float mask in `dtype` (eager),
    a boolean mask (sdpa: 1 byte per pair instead of 2-4), a mask function the tiled pair kernel asks per
    tile (`adapt.core.pair_attention`; dense patterns other than the pair are boolean), or a FlexAttention
    `BlockMask` (`adapt.core.flex`). The last two hold no [q, k] mask at all."""

    kind: MaskKind = "additive"
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, style: MaskStyle | torch.dtype) -> MaskStyle:
        """A style, or a dtype: torch.bool for the boolean mask, a float dtype for its additive mask."""
        if isinstance(style, MaskStyle):
            return style
        return cls("bool") if style == torch.bool else cls("additive", style)

    @classmethod
    def for_model(cls, model: object, dtype: torch.dtype) -> MaskStyle:
        """The style the model's attention implementation takes (additive in `dtype` for eager and others)."""
        config = getattr(model, "config", None)
        implementation = getattr(config, "_attn_implementation", None)
        kinds: dict[str | None, MaskKind] = {
            "sdpa": "bool",
            "adapt_pair_sdpa": "tiled",
            "flex_attention": "flex",
        }
        return cls(kinds.get(implementation, "additive"), dtype)

    def dense(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean pattern [b, 1, q, k] in this style's dense form."""
        if self.kind == "flex":
            raise ValueError("a flex style builds a BlockMask, not a dense mask")
        return allowed if self.kind in ("bool", "tiled") else to_additive(allowed, self.dtype)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them. [b, l] -> [b, l]"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def to_additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean `allowed` [b, 1, q, k] -> additive float mask in `dtype`."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def causal_allowed(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Lower-triangular [1, 1, l, l] boolean pattern: query i sees keys 0..i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]


def key_padding_allowed(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, l] 0/1 padding mask -> [b, 1, 1, l] boolean pattern over keys."""
    return attention_mask.bool()[:, None, None, :]


def causal_mask_4d(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask with padding for a [b, l] attention mask: [b, 1, l, l]."""
    length = attention_mask.shape[-1]
    allowed = causal_allowed(length, attention_mask.device) & key_padding_allowed(attention_mask)
    return to_additive(_keep_diagonal(allowed), dtype)


def _keep_diagonal(allowed: torch.Tensor) -> torch.Tensor:
    # A padding query with every key blocked would give NaN under sdpa; letting every query see
    # itself keeps rows finite and changes nothing for real tokens.
    eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    return allowed | eye


def block_ids(positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block of every token: its position // block_size, so blocks follow positions, not columns. [b, l]"""
    return torch.div(positions, block_size, rounding_mode="floor")


def block_causal_allowed(
    positions: torch.Tensor,
    block_size: int,
    attention_mask: torch.Tensor | None = None,
    causal_before: int | None = None,
) -> torch.Tensor:
    """Block-causal pattern of one sequence: query block b sees key blocks <= b. -> bool [b, 1, l, l]

    Inside a block attention is bidirectional; `attention_mask` [b, l] (0/1) hides padding keys.
    This is how a block-diffusion model runs at sampling time: committed blocks and the block being
    denoised, never the (masked) blocks after it. `causal_before` (a checkpoint whose clean tokens attend
    causally): queries at positions before it are committed tokens and see only the positions <= theirs.
    """
    blocks = block_ids(positions, block_size)  # [b, l]
    allowed = blocks[:, None, :] <= blocks[:, :, None]  # [b, q, k]
    if causal_before is not None:
        q, k = positions[:, :, None], positions[:, None, :]
        allowed = torch.where(q < causal_before, k <= q, allowed)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    return _keep_diagonal(allowed[:, None])


def block_pair_allowed(
    positions: torch.Tensor,
    block_size: int,
    attention_mask: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    clean: str = "block",
) -> torch.Tensor:
    """BD3-LM's training pattern over the pair [x_t ; x_0] (length 2l). -> bool [b, 1, 2l, 2l]

    Noisy block b sees noisy block b and clean blocks < b; clean block b sees clean blocks <= b (`clean`
    "block"), or each clean token sees the clean tokens up to itself (`clean` "causal": the AR source's
    own pattern); clean tokens never see noisy ones. positions, attention_mask (0/1 padding) and
    segment_ids (packed documents: tokens see their own document only) are [b, l], shared by both halves.
    """
    blocks = block_ids(positions, block_size)  # [b, l]
    q, k = blocks[:, :, None], blocks[:, None, :]  # [b, l, 1], [b, 1, l]
    same = (
        torch.ones_like(q == k) if segment_ids is None else segment_ids[:, :, None] == segment_ids[:, None, :]
    )
    noisy = torch.cat([(q == k) & same, (k < q) & same], dim=-1)  # [b, l, 2l] noisy queries
    if clean == "causal":  # columns: within a document they follow positions, and padding is hidden
        cols = torch.arange(blocks.shape[1], device=blocks.device)
        sees = (cols[None, :] <= cols[:, None])[None]  # [1, l, l]
    else:
        sees = k <= q
    clean_q = torch.cat([torch.zeros_like(same), sees & same], dim=-1)  # [b, l, 2l] clean queries
    real = attention_mask.bool().repeat(1, 2)[:, None, :]  # [b, 1, 2l] keys
    return _keep_diagonal((torch.cat([noisy, clean_q], dim=1) & real)[:, None])
