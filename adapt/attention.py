"""Attention masks and positions that reach any architecture through transformers' 4D-mask path.

A `(batch, 1, q, k)` float mask is passed through unchanged by the stock mask builders, so causal,
annealed and padded patterns need no modeling code. Masks here are additive: 0 where a query may
attend to a key, the dtype's minimum where it may not.
"""

from __future__ import annotations

import torch


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
