"""Exact attention over the block pair [x_t ; x_0] without computing the pairs it never uses.

sdpa with a dense mask computes all (2l)^2 scores, but in the block pair clean queries never see noisy
keys, a noisy query sees the clean keys before its block and the noisy keys of its own block, and a clean
query the clean keys up to its own block's end. So a tile of T query columns [a, a + T) of either half
sees nothing outside clean columns [0, a + T + B) and, for noisy queries, noisy columns
[a - B, a + T + B) (a block spans at most B contiguous columns, whatever the padding or packing). Running
sdpa per tile over those keys only, with the same boolean mask sliced, gives the same attention with about
(l^2 + 3lT) scores instead of 4 l^2: on a CPU, where sdpa skips no masked tile, the block objective's
attention then costs about twice the AR step's causal attention instead of about seven times.

It is registered with transformers' `AttentionInterface` (and the sdpa mask builder, so 2D masks work as
under sdpa) as `adapt_pair_sdpa`; the objective passes `adapt_pair=(l, B)` through the model's forward
kwargs. Anything else (no `adapt_pair`, no boolean 4D mask) is plain transformers sdpa.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

NAME = "adapt_pair_sdpa"
TILE = 512


@dataclass(frozen=True)
class PairLayout:
    """The block pair a forward pass runs on: l, B, and (for the tiled kernel without a dense mask) the
    pattern's mask function (`adapt.core.attention.pair_mask_mod`), asked per tile."""

    length: int
    block: int
    mask_mod: Callable[..., torch.Tensor] | None = None
    causal_clean: bool = False
    """The clean half is plainly causal (causal clean attention, no padding, one document per row): it runs
    as one causal sdpa call, which skips the masked half of its tiles."""


def no_dense_mask(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The `attention_mask` argument when the tiled kernel asks `PairLayout.mask_mod` instead: a 4D
    boolean tensor that holds one element (stride 0), so transformers passes it through as a prepared
    mask; the kernel refuses it without its layout."""
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device).expand(batch, 1, length, length)


def is_placeholder(mask: torch.Tensor | None) -> bool:
    """Whether `mask` is `no_dense_mask`'s one element seen as many."""
    if mask is None or mask.ndim != 4 or mask.numel() == 1 or mask.dtype != torch.bool:
        return False
    return all(stride == 0 for stride, size in zip(mask.stride(), mask.shape, strict=True) if size > 1)


def register() -> None:
    """Make `NAME` an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, pair_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_pair_sdpa(model: Any) -> None:
    """Switch an sdpa model (a transformers causal LM) to the tiled pair kernel."""
    register()
    model.set_attn_implementation(NAME)


def pair_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    adapt_pair: PairLayout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [b, h, 2l, d], key/value [b, kv, 2l, d], the pair's boolean
    mask [b or 1, 1, 2l, 2l] (or `no_dense_mask` with the layout's mask function) -> ([b, 2l, h, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    layout = adapt_pair
    if layout is None or layout.mask_mod is None and is_placeholder(attention_mask):
        if is_placeholder(attention_mask):
            raise RuntimeError("the tiled pair kernel got a placeholder mask without the pair's layout")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    dense = layout.mask_mod is None and (attention_mask is None or attention_mask.dtype != torch.bool)
    if dense or query.shape[2] != 2 * layout.length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    length, block = layout.length, layout.block
    tile = max(block, TILE // block * block)
    outs = []
    for half in (0, 1):  # noisy queries, then clean ones
        if half == 1 and layout.causal_clean:
            clean = slice(length, 2 * length)
            q, k, v = query[:, :, clean], key[:, :, clean], value[:, :, clean]
            out, _ = sdpa_attention_forward(module, q, k, v, None, dropout, scaling, is_causal=True, **kwargs)
            outs.append(out)
            break
        for a in range(0, length, tile):
            end = min(length, a + tile)
            # noisy queries: clean keys before their block (< end) and their block's noisy keys; clean
            # queries: clean keys to their block's end
            cols = [slice(length, length + min(length, end + block * half))]
            if half == 0:
                cols.insert(0, slice(max(0, a - block), min(length, end + block)))
            rows = slice(half * length + a, half * length + end)
            k = torch.cat([key[:, :, c] for c in cols], dim=2)
            v = torch.cat([value[:, :, c] for c in cols], dim=2)
            m = tile_mask(layout, attention_mask, rows, cols, query.shape[0])
            out, _ = sdpa_attention_forward(module, query[:, :, rows], k, v, m, dropout, scaling, **kwargs)
            outs.append(out)  # [b, tile, h, d]
    return torch.cat(outs, dim=1), None


def tile_mask(
    layout: PairLayout, mask: torch.Tensor | None, rows: slice, cols: list[slice], batch: int
) -> torch.Tensor:
    """The boolean mask of one tile's queries over its keys: [b or 1, 1, rows, keys]."""
    if layout.mask_mod is None:
        assert mask is not None
        return torch.cat([mask[:, :, rows, c] for c in cols], dim=-1)
    device = mask.device if mask is not None else None
    q = torch.arange(rows.start, rows.stop, device=device)[None, :, None]
    k = torch.cat([torch.arange(c.start, c.stop, device=device) for c in cols])[None, None, :]
    b = torch.arange(batch, device=device)[:, None, None]
    return layout.mask_mod(b, 0, q, k)[:, None]  # [b, 1, rows, keys]
