"""FlexAttention block masks: the training patterns as mask functions, and their BlockMasks.

A dense mask costs one entry per (query, key) pair: [b, 1, 2l, 2l] for the block objective's pair, 2 GiB
in fp32 at l = 4096, b = 8. A FlexAttention `BlockMask` holds, per 128 x 128 tile, whether the tile is
empty, full or partial, and a mask function that answers for single (query, key) indices from [b, l]
tensors (positions, blocks, documents, padding); the kernel skips empty tiles (about 70% of the block
pair). transformers passes a 4D `BlockMask` unchanged to its flex-attention integration
(`attn_implementation="flex_attention"`), so no modeling code is involved.

The block pair's mask function is `adapt.core.attention.pair_mask_mod` (its dense mask is that function
written out); `full_mask_mod` here answers what `adapt.core.diffusion.build_attention_mask` builds (tests
compare them pair by pair), including the diagonal that builder keeps so that no row is empty.
"""

from __future__ import annotations

from typing import Any

import torch

from adapt.core.attention import MaskMod, dense_of
from adapt.core.errors import AdaptError


def flex_unavailable() -> str | None:
    """Why this torch cannot run FlexAttention, or None when it can."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (torch >= 2.5 has it)"
    return None


def flex_cannot_train(device: torch.device | str) -> str | None:
    """Why FlexAttention cannot train (run a backward) on `device` with this torch, or None when it can.

    Asked of torch itself: a tiny call with gradients (torch 2.13 has no CPU backward and says so)."""
    reason = flex_unavailable()
    if reason is not None:
        return reason
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros(1, 1, 1, 16, device=device, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except (NotImplementedError, RuntimeError) as e:
        return f"torch {torch.__version__}: {str(e).splitlines()[0]}"
    return None


def check_flex_architecture(config: Any) -> None:
    """Refuse, naming the choices, a model whose transformers class does not take flex_attention."""
    import transformers
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_class is not None and not getattr(model_class, "_supports_flex_attn", False):
        raise AdaptError(
            f"{model_class.__name__} (model_type {config.model_type!r}) does not take flex_attention in "
            f"transformers {transformers.__version__}; use attn_implementation sdpa or eager"
        )


def full_mask_mod(
    attention_mask: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    annealed: torch.Tensor | None = None,
) -> MaskMod:
    """`build_attention_mask`'s pattern as a mask function: real keys, own document, the annealing
    pattern (bool [1, 1, l, l], shared by the batch) where one is drawn.

    With neither documents nor annealing it is the model's own bidirectional mask over a 2D padding mask
    (padding keys hidden, no diagonal); otherwise every query also keeps its own key, as the dense builder.
    """
    real = attention_mask.bool()
    plain = segment_ids is None and annealed is None
    pattern = None if annealed is None else annealed[0, 0]

    def mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        allowed = real[b, k]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[b, q] == segment_ids[b, k])
        if pattern is not None:
            allowed = allowed & pattern[q, k]
        return allowed if plain else allowed | (q == k)

    batch, length = real.shape
    dense = lambda: None if plain else dense_of(mod, batch, length, length, real.device)  # noqa: E731
    mod.dense = dense  # type: ignore[attr-defined]
    return mod


def block_mask(mod: MaskMod, batch: int, length: int, device: torch.device, tile: int | None = None) -> Any:
    """The `BlockMask` of `mod` over [batch, length, length] (one pattern for all heads).

    Built by the compiled builder on CUDA (which never materialises the pattern) and by the eager one
    elsewhere; `tile` overrides FlexAttention's 128 x 128 tiles (tests use small ones).
    """
    reason = flex_unavailable()
    if reason is not None:
        raise AdaptError(f"flex_attention cannot run: {reason}")
    from torch.nn.attention.flex_attention import create_block_mask

    kwargs: dict[str, Any] = {} if tile is None else {"BLOCK_SIZE": tile}
    compiled = torch.device(device).type == "cuda"
    return create_block_mask(mod, batch, None, length, length, device=device, _compile=compiled, **kwargs)


def dense_pattern(mask: Any) -> torch.Tensor:
    """What a `BlockMask` lets through, pair by pair: bool [b, 1, q, k] (its tiles and its mask function
    together; the tiles it marks empty are never asked). For tests and checks, never for training."""
    from torch.nn.attention.flex_attention import create_mask

    batch = mask.kv_num_blocks.shape[0]
    q_len, kv_len = mask.seq_lengths
    tq, tk = mask.BLOCK_SIZE
    tiles = mask.to_dense()[:, :1].bool()  # [b, 1, nq, nk]
    tiles = tiles.repeat_interleave(tq, -2).repeat_interleave(tk, -1)[..., :q_len, :kv_len]
    device = mask.kv_num_blocks.device
    return tiles & create_mask(mask.mask_mod, batch, 1, q_len, kv_len, device=device)
