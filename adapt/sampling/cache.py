"""Forward passes of the denoiser, with or without Fast-dLLM's approximate KV cache.

Uses transformers' own `DynamicCache` and the stock model forward. A full pass over the canvas fills
the cache; later passes inside the block feed only the query columns and attend to the cached keys:
- prefix: cache columns [0, lo), query [lo, l);
- dual: cache columns [0, lo) and [hi, l) (the masked suffix), query [lo, hi).
For a bidirectional model the cached keys go stale as the block is unmasked (they saw the old tokens),
so the cache is an approximation; `refresh_every` trades speed for accuracy. Keys are stored after the
rotary embedding, so their order in the cache does not matter; the 2D attention mask is reordered to
match (prefix, suffix, query), and `position_ids` of the query keep its true positions.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def forward_signature(model: Any) -> tuple[str, bool]:
    """(the keyword `forward` takes a KV cache by, whether it takes `logits_to_keep`)."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def logits_kept(model: Any, can_keep: bool, keep: torch.Tensor, **inputs: Any) -> tuple[torch.Tensor, Any]:
    """`model(**inputs)` with the logits of columns `keep` only (through `logits_to_keep` where the model
    takes it, so the LM head runs on those columns alone): (logits [b, len(keep), V], the output)."""
    if can_keep:
        inputs["logits_to_keep"] = keep
    out = model(**inputs)
    return (out.logits if can_keep else out.logits[:, keep]), out


class Denoiser:
    """Runs the model on the canvas and returns logits for a range of columns."""

    def __init__(self, model: Any, mode: str = "none", refresh_every: int = 0) -> None:
        self.model = model
        self.mode = mode
        self.refresh_every = refresh_every
        self._cache_kw, self._can_keep = forward_signature(model)
        self.cache: Any = None
        self.lo = self.hi = 0
        self.since_refresh = 0
        self.nfe = 0

    def start_block(self, lo: int, hi: int) -> None:
        """Query columns [lo, hi) for the coming block; the next call refreshes the cache."""
        self.lo, self.hi = lo, hi
        self.cache = None

    def logits(
        self, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Logits [b, k, V] of the canvas columns `keep` [k] (sorted), which must lie inside [lo, hi).

        The LM head runs only on those columns (`logits_to_keep`), which matters with a large vocabulary.
        """
        self.nfe += 1
        if self.mode == "none":
            return self._forward(ids, attention, positions, keep, use_cache=False)
        due = self.refresh_every and self.since_refresh >= self.refresh_every
        if self.cache is None or due:
            return self._refresh(ids, attention, positions, keep)
        self.since_refresh += 1
        return self._cached(ids, attention, positions, keep)

    def _forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        keep: torch.Tensor,
        use_cache: bool,
        **kw: Any,
    ) -> Any:
        inputs = {"input_ids": ids, "attention_mask": attention_mask, "position_ids": position_ids}
        logits, out = logits_kept(self.model, self._can_keep, keep, use_cache=use_cache, **inputs, **kw)
        if use_cache:
            self._last_cache = out["cache"] if "cache" in out else out["past_key_values"]
        return logits

    def _refresh(
        self, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        logits = self._forward(ids, attention, positions, keep, use_cache=True)
        cache = self._last_cache
        length = ids.shape[1]
        if self.mode == "prefix":
            cache.crop(-(length - self.lo))
        else:
            for layer in cache.layers:  # keep prefix [0, lo) and suffix [hi, l), in that order
                layer.keys = torch.cat([layer.keys[..., : self.lo, :], layer.keys[..., self.hi :, :]], dim=-2)
                layer.values = torch.cat(
                    [layer.values[..., : self.lo, :], layer.values[..., self.hi :, :]], dim=-2
                )
        self.cache = cache
        self.since_refresh = 1
        return logits

    def _cached(
        self, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        lo, hi = self.lo, (ids.shape[1] if self.mode == "prefix" else self.hi)
        order = [attention[:, :lo], attention[:, hi:], attention[:, lo:hi]]
        mask = torch.cat(order if self.mode == "dual" else [order[0], order[2]], dim=-1)
        kw = {self._cache_kw: self.cache}
        logits = self._forward(ids[:, lo:hi], mask, positions[:, lo:hi], keep - lo, use_cache=True, **kw)
        self.cache.crop(-(hi - lo))  # drop the query's keys; the cache is as it was
        return logits


class BlockDenoiser:
    """Forward passes of a block-diffusion checkpoint, block-causal, with or without its exact KV cache.

    The canvas is decoded in model blocks of `block_size` columns (rows are right-padded so that column
    = position). A query in block c sees blocks <= c, never the masked blocks after it.
    - uncached (the reference): every step recomputes columns [0, hi) under the block-causal mask (with
      `clean` "causal" the committed columns before the block attend causally, as in training).
    - cached: committed blocks never change, so their keys/values are exact. A block's first step feeds
      the columns not yet cached (the block just committed, clean, and the new block) and keeps the
      committed ones in the cache; later steps feed the block alone. With shift, the prediction for the
      block's first token comes from the previous block's last column, computed in that first step.
    - cached, `clean` "causal": a committed token's keys depend on the tokens before it only, so every
      step also feeds, clean, the columns committed since the last step (the longest committed run of
      the block, over all rows) and caches them: the next block starts with the few columns its
      predecessor committed last instead of the whole block. The block's own queries never see these
      clean copies of their block (`_causal_mask`), as in training.
    """

    def __init__(
        self, model: Any, block_size: int, cached: bool, clean: str = "block", mask_id: int = -1
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.cached = cached
        self.clean = clean
        self.mask_id = mask_id  # tells committed columns from open ones ("causal" only)
        self._cache_kw, self._can_keep = forward_signature(model)
        self.cache: Any = None
        self.committed = 0  # columns [0, committed) are in the cache
        self.lo = self.hi = 0
        self.first_step = True
        self.earlier: dict[int, torch.Tensor] = {}  # logits [b, V] of committed columns, from the first step
        self.nfe = 0
        self.fed = 0  # tokens fed to the model, over all steps (per row)

    def start_block(self, lo: int, hi: int) -> None:
        """The coming steps denoise columns up to `hi` of the model block that holds column hi - 1."""
        self.hi = hi
        self.lo = (hi - 1) // self.block_size * self.block_size
        carried = self.earlier.get(self.lo - 1) if self.clean == "causal" else None
        self.first_step, self.earlier = True, {}
        if carried is not None:  # computed when the previous block's last column was cached
            self.earlier[self.lo - 1] = carried

    def logits(
        self, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Logits [b, k, V] of the canvas columns `keep` [k] (sorted, < hi)."""
        self.nfe += 1
        if not self.cached:
            return self._forward(ids, attention, positions, 0, keep)
        if self.clean == "causal":
            return self._causal_step(ids, attention, positions, keep)
        # the first step also feeds the committed columns not cached yet; later steps the block alone
        first = self.committed if self.first_step else self.lo
        self.first_step = False
        fresh = keep[keep >= first]
        logits = self._forward(ids, attention, positions, first, fresh)  # [b, f, V]
        self.cache.crop(-(self.hi - self.lo))  # drop the block: the cache holds the committed columns
        self.committed = self.lo
        return self._gather(logits, {c: i for i, c in enumerate(fresh.tolist())}, keep)

    def _gather(self, logits: torch.Tensor, index: dict[int, int], keep: torch.Tensor) -> torch.Tensor:
        """Logits of `keep` from this step's (`index`: column -> row of `logits`) or the block's first."""
        for c, i in index.items():
            if c < self.lo:  # committed: what it predicts never changes within the block
                self.earlier[c] = logits[:, i]
        parts = [self.earlier[c] if c < self.lo else logits[:, index[c]] for c in keep.tolist()]
        return torch.stack(parts, dim=1)

    def _forward(
        self,
        ids: torch.Tensor,
        attention: torch.Tensor,
        positions: torch.Tensor,
        first: int,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """Logits at `keep` of queries [first, hi) attending block-causally to columns [0, hi)."""
        from adapt.core.attention import block_causal_allowed, to_additive

        dtype = next(self.model.parameters()).dtype
        hi = self.hi
        causal_before = self.lo if self.clean == "causal" else None
        allowed = block_causal_allowed(positions[:, :hi], self.block_size, attention[:, :hi], causal_before)
        inputs = {"input_ids": ids[:, first:hi], "position_ids": positions[:, first:hi]}
        return self._run(inputs, to_additive(allowed[:, :, first:hi], dtype), keep - first)

    def _run(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        kw: dict[str, Any] = {"attention_mask": mask}
        if self.cached:
            if self.cache is None:
                self.cache = DynamicCache(config=self.model.config)
            kw[self._cache_kw] = self.cache
        self.fed += inputs["input_ids"].shape[1]
        return logits_kept(self.model, self._can_keep, keep, use_cache=self.cached, **inputs, **kw)[0]

    def _causal_step(
        self, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """One step of a causal-clean checkpoint: clean columns [committed, upto), then the block [lo, hi)."""
        lo, hi, start = self.lo, self.hi, self.committed
        upto = self._committed_run(ids)
        device = ids.device
        columns = torch.cat([torch.arange(start, upto, device=device), torch.arange(lo, hi, device=device)])
        inputs = {"input_ids": ids[:, columns], "position_ids": positions[:, columns]}
        wanted = keep.tolist()
        clean = [c for c in wanted if start <= c < lo]  # (columns before `start`: from `earlier`)
        if upto == hi > start:  # the block's last column, just cached, predicts the next block's first
            clean.append(hi - 1)
        block = [c for c in wanted if c >= lo]
        rows = [c - start for c in clean] + [upto - start + c - lo for c in block]
        logits = self._run(
            inputs,
            self._causal_mask(attention, upto),
            torch.tensor(rows, dtype=torch.long, device=device),
        )
        self.cache.crop(-(hi - lo))  # the block's noisy columns; its clean copies stay
        self.committed = upto
        for i, c in enumerate(clean):
            self.earlier[c] = logits[:, i]  # committed columns: what they predict never changes
        index = {c: len(clean) + i for i, c in enumerate(block)}
        return torch.stack([logits[:, index[c]] if c >= lo else self.earlier[c] for c in wanted], dim=1)

    def _committed_run(self, ids: torch.Tensor) -> int:
        """The end of the committed columns: every column before the block, then the block's columns up to
        the first one still masked in any row (a clean copy is exact only when all before it are final).
        Never behind `committed`: a cached column was final, and final columns are never masked again."""
        open_ = (ids[:, self.lo : self.hi] == self.mask_id).any(0)  # [w]
        first_open = int(open_.nonzero()[0]) if bool(open_.any()) else self.hi - self.lo
        return self.lo + first_open

    def _causal_mask(self, attention: torch.Tensor, upto: int) -> torch.Tensor:
        """Additive mask of the queries [clean committed..upto ; block lo..hi) over keys [0, upto) + block.

        Clean queries see the keys at or before their column; block queries see the keys before the
        block and the whole block (padding keys hidden; every query sees itself)."""
        from adapt.core.attention import to_additive

        lo, hi, start = self.lo, self.hi, self.committed
        device = attention.device
        key_cols = torch.cat([torch.arange(upto, device=device), torch.arange(lo, hi, device=device)])
        query_cols = key_cols[start:]
        in_block = torch.arange(len(key_cols), device=device) >= upto  # [k] noisy keys
        q_block = in_block[start:]  # [q]
        clean_q = (key_cols[None, :] <= query_cols[:, None]) & ~in_block[None, :]
        block_q = (key_cols[None, :] < lo) & ~in_block[None, :] | in_block[None, :]
        allowed = torch.where(q_block[:, None], block_q, clean_q)  # [q, k]
        allowed = allowed[None] & attention[:, key_cols].bool()[:, None, :]  # [b, q, k]
        eye = torch.zeros_like(allowed[0])
        eye[torch.arange(len(query_cols)), torch.arange(start, len(key_cols))] = True
        allowed = allowed | eye
        dtype = next(self.model.parameters()).dtype
        return to_additive(allowed[:, None], dtype)
