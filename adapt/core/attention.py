"""Attention masks and positions that reach any architecture through transformers' 4D-mask path.

A `(batch, 1, q, k)` mask is passed through unchanged by the stock mask builders, so causal, annealed
and padded patterns need no modeling code. The patterns here are boolean (True where a query may attend
to a key); `MaskStyle` gives them to a kernel as it takes them: boolean for sdpa, additive (0 or the
dtype's minimum) for eager, or as mask functions (`adapt.core.flex`) where no dense mask is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

MaskKind = Literal["additive", "bool", "tiled", "flex"]
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""FlexAttention's mask function: (batch, head, query, key) indices -> may the query see the key."""


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


def causal_documents_allowed(attention_mask: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """The AR pattern over packed documents: causal, real keys, own document. -> bool [b, 1, l, l]"""
    length = attention_mask.shape[-1]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    allowed = causal_allowed(length, attention_mask.device) & key_padding_allowed(attention_mask) & same
    return _keep_diagonal(allowed)


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
    batch, length = positions.shape
    mod = pair_mask_mod(positions, block_size, attention_mask, segment_ids, clean)
    return dense_of(mod, batch, 2 * length, 2 * length, positions.device)


def pair_mask_mod(
    positions: torch.Tensor,
    block_size: int,
    attention_mask: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    clean: str = "block",
) -> MaskMod:
    """The block pair's pattern as a mask function over [x_t ; x_0] (indices 0..2l-1), in FlexAttention's
    signature; it takes broadcast index tensors too (`dense_of`, the tiled pair kernel).

    Noisy query (index < l) of block b: noisy keys of block b, clean keys of blocks < b. Clean query:
    clean keys of blocks <= b ("block"), or of columns <= its own ("causal"). Same document, real keys.
    positions, attention_mask (0/1), segment_ids: [b, l].
    """
    length = positions.shape[1]
    blocks = block_ids(positions, block_size)
    real = attention_mask.bool()
    docs = torch.zeros_like(positions) if segment_ids is None else segment_ids
    causal = clean == "causal"

    def mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q_noisy, k_noisy = q < length, k < length
        qc = torch.where(q_noisy, q, q - length)  # column within the half
        kc = torch.where(k_noisy, k, k - length)
        bq, bk = blocks[b, qc], blocks[b, kc]
        noisy_rule = torch.where(k_noisy, bq == bk, bk < bq)
        clean_rule = ~k_noisy & ((kc <= qc) if causal else (bk <= bq))
        rule = torch.where(q_noisy, noisy_rule, clean_rule)
        return (rule & (docs[b, qc] == docs[b, kc]) & real[b, kc]) | (q == k)

    return mod


def dense_of(mod: MaskMod, batch: int, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """A mask function written out over every (row, query, key): bool [b, 1, q, k]."""
    b = torch.arange(batch, device=device)[:, None, None]
    q = torch.arange(q_len, device=device)[None, :, None]
    k = torch.arange(k_len, device=device)[None, None, :]
    return mod(b, torch.zeros((), dtype=torch.long), q, k).expand(batch, q_len, k_len)[:, None]
