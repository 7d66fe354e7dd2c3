"""AR and self-speculative decoding of a block checkpoint with causal clean attention (TiDAR-style).

Such a checkpoint holds an AR model: its clean stream attends causally and, with shift, the logits at a
clean token predict the next one (trained with `diffusion.ar_loss_weight`). One loop serves both decoders:
- `ar`: every pass feeds the committed tokens not yet cached (the prompt, then one token) and commits the
  AR prediction: plain KV-cached left-to-right decoding.
- `verify`: every pass feeds, clean and causal, the uncached committed tokens and the drafts, followed by a
  block of B masks that sees the cache and everything fed before it. The AR logits accept the longest draft
  prefix the AR model agrees with, plus one token of its own; the mask block's predictions (mask k predicts
  the token after it) are the next drafts. A mask block may be shorter than B (`mask_block`): fewer
  tokens per pass, fewer drafts. Greedy output equals `ar` token for token. At temperature > 0 a
  draft x is accepted with probability min(1, p(x) / q(x)) and the first rejected one is replaced by a
  sample of norm(max(0, p - q)) (speculative sampling), so samples follow the AR distribution p.
  With `redraft`, a pass holds one mask block per possible number of accepted drafts (block i sees the
  first i drafts), so the next pass has drafts whatever was rejected; without it, the pass after a rejection
  has no drafts and only drafts anew.
  With `candidates` k > 1 the draft is a one-level tree: k alternatives for the next token sit at the same
  position, each seeing the committed tokens and itself; the AR logits before them accept the one they
  agree with (sampling: SpecInfer's rule for k draws from q, each rejection leaving norm(max(0, p - q))),
  the accepted candidate's own AR logits give the token after it, and each candidate (and, with redraft,
  the miss) has its own mask block.

Cache columns are shared by the batch; `key_valid` [b, C] says which hold a row's accepted tokens (rows
accept different numbers of drafts; rejected columns stay, hidden, and are cropped when no row needs them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from adapt.core.attention import to_additive
from adapt.core.bounds import context_length
from adapt.sampling.cache import forward_signature
from adapt.sampling.canvas import Canvas
from adapt.sampling.config import SamplingConfig
from adapt.sampling.strategies import model_logits, sampling_logits


@dataclass
class Decoded:
    """What the loop leaves: the canvas with committed tokens, and its counters."""

    ids: torch.Tensor  # [b, l]
    passes: int = 0
    tokens: int = 0
    drafted: list[int] = field(default_factory=list)  # drafts verified, by draft position
    accepted: list[int] = field(default_factory=list)  # drafts accepted, by draft position


@dataclass
class Row:
    """One row's state between passes."""

    fresh: list[int]  # committed tokens not in the cache yet (the prompt, then the last AR token)
    cached: int = 0  # the row's tokens in the cache (= the position of fresh[0])
    generated: int = 0  # tokens committed after the prompt
    drafts: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None  # [d, V] the distributions the drafts were drawn from (temperature > 0)
    done: bool = False


class SpeculativeDecoder:
    """The shared loop of `ar` (no drafts) and `verify` (drafts from mask blocks, verified by the AR head)."""

    def __init__(
        self,
        model: Any,
        config: SamplingConfig,
        mask_id: int,
        mask_block: int,
        draft_length: int,
        vocab: int,
        eos_ids: list[int],
        generator: torch.Generator,
    ) -> None:
        self.model, self.config = model, config
        self.mask_id, self.block = mask_id, mask_block  # masks per mask block
        self.draft_length = draft_length if config.strategy == "verify" else 0
        self.candidates = config.candidates if self.draft_length else 1  # > 1: drafts are alternatives
        self.redraft = config.redraft
        self.vocab, self.eos_ids, self.generator = vocab, eos_ids, generator
        self._cache_kw, self._can_keep = forward_signature(model)
        self.dtype = next(model.parameters()).dtype
        self.limit = context_length(model.config)

    # ------------------------------------------------------------------ the loop

    def decode(
        self,
        canvas: Canvas,
        stopped: Callable[[list[int]], bool],
        notify: Callable[[torch.Tensor, int], None] | None = None,
    ) -> Decoded:
        """Fill each row's generated region [start, end) of `canvas` (right-padded: column = position)."""
        from transformers import DynamicCache

        ids = canvas.ids.clone()
        out = Decoded(ids, drafted=[0] * self.draft_length, accepted=[0] * self.draft_length)
        starts, ends = canvas.start.tolist(), canvas.end.tolist()
        rows = [Row(fresh=ids[r, : starts[r]].tolist()) for r in range(ids.shape[0])]
        self.cache = DynamicCache(config=self.model.config)
        self.key_valid = torch.zeros(len(rows), 0, dtype=torch.bool, device=ids.device)
        while not all(row.done for row in rows):
            logits, layout = self.forward(rows, ids.device)
            out.passes += 1
            accepted = self.verify(rows, logits, layout, out)
            for r, row in enumerate(rows):
                if row.done:
                    continue
                new = self.cut(accepted[r][: ends[r] - starts[r] - row.generated])
                ids[r, starts[r] + row.generated : starts[r] + row.generated + len(new)] = torch.tensor(new)
                row.generated += len(new)
                out.tokens += len(new)
                row.done = row.generated >= ends[r] - starts[r] or stopped(
                    ids[r, starts[r] : starts[r] + row.generated].tolist()
                )
            if notify is not None:
                notify(ids, out.passes)
        return out

    def cut(self, tokens: list[int]) -> list[int]:
        """Tokens up to and including the first stop token (with stop_at_eos): nothing is decoded past it."""
        if self.config.stop_at_eos:
            for i, t in enumerate(tokens):
                if t in self.eos_ids:
                    return tokens[: i + 1]
        return tokens

    # ------------------------------------------------------------------ one pass

    def forward(self, rows: list[Row], device: torch.device) -> tuple[Logits, Layout]:
        """One model pass over every row's fed tokens and mask blocks; the LM head runs only on the columns
        read (the AR predictions from each row's last committed token on, and the mask blocks)."""
        layout = Layout.of(rows, self.block, self.draft_length > 0, self.redraft, self.candidates > 1)
        ids, positions = layout.inputs(rows, self.mask_id, device)
        positions = positions.clamp(max=self.limit - 1) if self.limit else positions
        allowed = layout.allowed(rows, self.key_valid, device)  # [b, 1, n, C + n]
        keep = layout.read_columns(rows).to(device)
        kw: dict[str, Any] = {self._cache_kw: self.cache}
        if self._can_keep:
            kw["logits_to_keep"] = keep
        logits = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=to_additive(allowed, self.dtype),
            use_cache=True,
            **kw,
        ).logits
        return Logits(logits if self._can_keep else logits[:, keep], keep), layout

    def verify(self, rows: list[Row], logits: Logits, layout: Layout, out: Decoded) -> list[list[int]]:
        """Accept drafts, pick each row's next AR token, keep the accepted keys, draw the next drafts.
        -> per row, the tokens committed by this pass."""
        b = len(rows)
        device = logits.values.device
        # p: the AR distributions at the fed slots u - 1 + i, i = 0..d (the last one gives the bonus token)
        ar = self.scores(logits.at(layout.ar_columns(rows).to(device)))  # [b, D+1, V]
        committed: list[list[int]] = []
        kept = torch.zeros(b, layout.width, dtype=torch.bool, device=device)
        for r, row in enumerate(rows):
            if row.done:
                committed.append([])
                continue
            a, bonus = self.accept(row, ar[r])
            chain = row.drafts[:a] if not layout.branching else row.drafts[a - 1 : a]  # the accepted drafts
            for i in range(min(len(row.drafts), len(out.drafted))):
                out.drafted[i] += 1
                out.accepted[i] += int(i < len(chain))
            kept[r, : len(row.fresh)] = True
            kept[r, layout.accepted_slots(row, a)] = True
            committed.append([*chain, bonus])
            nxt = layout.block_for(row, a)
            row.cached += len(row.fresh) + len(chain)
            row.fresh = [bonus]
            row.drafts, row.q = self.next_drafts(logits, r, layout, nxt, row.generated + len(chain) + 1)
        self.keep_columns(kept)
        return committed

    def accept(self, row: Row, p: torch.Tensor) -> tuple[int, int]:
        """(drafts accepted, the token after them) from the row's AR distributions p [D+1, V]; with
        candidates, (1 + the accepted candidate's index, or 0 for none, the token after it)."""
        if self.candidates > 1:
            return self.accept_candidate(row, p)
        d = len(row.drafts)
        if self.config.temperature == 0:
            target = p.argmax(-1).tolist()
            a = 0
            while a < d and row.drafts[a] == target[a]:
                a += 1
            return a, target[a]
        assert row.q is not None or d == 0
        for i in range(d):
            x = row.drafts[i]
            ratio = float(p[i, x]) / max(float(row.q[i, x]), 1e-30)  # type: ignore[index]
            if float(torch.rand((), generator=self.generator, device=p.device)) >= min(1.0, ratio):
                residual = (p[i] - row.q[i]).clamp(min=0)  # type: ignore[index]
                dist = residual if float(residual.sum()) > 0 else p[i]
                return i, int(torch.multinomial(dist, 1, generator=self.generator))
        return d, int(torch.multinomial(p[d], 1, generator=self.generator))

    def accept_candidate(self, row: Row, p: torch.Tensor) -> tuple[int, int]:
        """One-level tree: p[0] judges every candidate, p[1 + j] is the AR prediction after candidate j."""
        if self.config.temperature == 0:
            target = int(p[0].argmax())
            if target in row.drafts:
                j = row.drafts.index(target)
                return 1 + j, int(p[1 + j].argmax())
            return 0, target
        assert row.q is not None or not row.drafts
        left = p[0]
        for j, x in enumerate(row.drafts):  # k draws from q: SpecInfer's multi-draft speculative sampling
            q = row.q[0]  # type: ignore[index]
            ratio = float(left[x]) / max(float(q[x]), 1e-30)
            if float(torch.rand((), generator=self.generator, device=p.device)) < min(1.0, ratio):
                return 1 + j, int(torch.multinomial(p[1 + j], 1, generator=self.generator))
            residual = (left - q).clamp(min=0)
            left = residual / residual.sum() if float(residual.sum()) > 0 else left
        return 0, int(torch.multinomial(left, 1, generator=self.generator))

    def next_drafts(
        self, logits: Logits, r: int, layout: Layout, block: int | None, generated: int
    ) -> tuple[list[int], torch.Tensor | None]:
        """The drafts the mask block `block` (None: no valid block) gives for the tokens after the bonus
        (no more than the next pass can still commit beside its own AR token, with `generated` done)."""
        if block is None:
            return [], None
        n = min(self.draft_length, self.config.gen_length - generated - 1)
        if n <= 0:
            return [], None
        lo = layout.width + block * self.block  # mask k (k = 0..) predicts the token after the bonus + k
        columns = torch.arange(lo, lo + n, device=logits.values.device)
        q = self.scores(logits.at(columns[None], rows=[r]))[0]  # [n, V]
        k = self.candidates  # > 1: n is 1 and the drafts are k alternatives for that token
        if self.config.temperature == 0:
            return (q[0].topk(k).indices.tolist() if k > 1 else q.argmax(-1).tolist()), None
        if k > 1:
            return torch.multinomial(q[0], k, replacement=True, generator=self.generator).tolist(), q
        return torch.multinomial(q, 1, generator=self.generator)[:, 0].tolist(), q

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What tokens are chosen from: processed logits at temperature 0, else probabilities. [.., V]"""
        logits = model_logits(logits, self.config, self.mask_id, self.eos_ids, self.vocab)
        if self.config.temperature == 0:
            return logits
        return sampling_logits(logits, self.config).softmax(-1)

    def keep_columns(self, kept: torch.Tensor) -> None:
        """Drop the mask blocks and the fed columns no row accepted from the cache; mark the rest."""
        valid = torch.cat([self.key_valid, kept], dim=1)  # [b, C + w]
        used = valid.any(0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 0
        drop = self.cache.get_seq_length() - length
        if drop:
            self.cache.crop(-drop)
        self.key_valid = valid[:, :length]


@dataclass
class Logits:
    """The logits of the columns `keep` [k] (sorted) of one pass: values [b, k, V]."""

    values: torch.Tensor
    keep: torch.Tensor

    def at(self, columns: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """Logits [r, c, V] of `columns` [r, c] (pass columns, all kept) of `rows` (default: all)."""
        values = self.values if rows is None else self.values[rows]
        index = torch.searchsorted(self.keep, columns)  # [r, c]
        return values[torch.arange(values.shape[0], device=index.device)[:, None], index]


@dataclass
class Layout:
    """Where each row's tokens sit in one pass: fed slots [0, width), then `blocks` mask blocks of B."""

    width: int  # fed slots (the longest row's uncached tokens + drafts)
    blocks: int  # mask blocks
    block: int
    redraft: bool
    most: int  # the most drafts any row has
    branching: bool = False  # the drafts are alternatives for one token (candidates), not a chain

    @classmethod
    def of(
        cls, rows: list[Row], block: int, drafting: bool, redraft: bool, branching: bool = False
    ) -> Layout:
        live = [r for r in rows if not r.done]
        most = max(len(r.drafts) for r in live)
        width = max(len(r.fresh) + len(r.drafts) for r in live)
        if not drafting:
            blocks = 0
        elif branching:  # one block per candidate (+ the miss's; without candidates, the miss's alone)
            blocks = most + 1 if redraft else max(most, 1)
        else:
            blocks = most + 1 if redraft else 1
        return cls(width, blocks, block, redraft, most, branching)

    def block_for(self, row: Row, accepted: int) -> int | None:
        """The mask block whose drafts follow `accepted` accepted drafts of `row` (None: none does; one
        block drafts only past all of the row's drafts). Branching: `accepted` is 1 + the candidate's
        index, 0 for none."""
        if not self.blocks:
            return None
        if self.branching:
            if self.redraft:
                return accepted
            return accepted - 1 if accepted else (0 if not row.drafts else None)
        if self.redraft:
            return accepted
        return 0 if accepted == len(row.drafts) else None

    def block_sees(self, row: Row, i: int) -> list[int]:
        """The fed slots mask block i sees beside itself: the committed tokens and the drafts it follows."""
        fresh = list(range(len(row.fresh)))
        if self.branching:
            j = i - int(self.redraft)  # the candidate it follows (-1: the miss's block)
            return fresh + ([len(row.fresh) + j] if 0 <= j < len(row.drafts) else [])
        follows = i if self.redraft else len(row.drafts)
        return list(range(len(row.fresh) + follows))

    def base(self, row: Row, i: int) -> int:
        """Position of mask block i's first mask: the bonus token's position when i drafts are accepted
        (redraft), or when all are (one block); branching: after its candidate, if it follows one."""
        return row.cached + len(self.block_sees(row, i))

    def accepted_slots(self, row: Row, accepted: int) -> list[int]:
        """The fed slots of the drafts `accept` took (beside the committed tokens)."""
        u = len(row.fresh)
        if self.branching:
            return [u + accepted - 1] if accepted else []
        return list(range(u, u + accepted))

    def slot_position(self, row: Row) -> torch.Tensor:
        """Position of each fed slot [width]: consecutive, or every candidate at the next token's."""
        offsets = torch.arange(self.width)
        if self.branching:
            offsets = offsets.clamp(max=len(row.fresh))
        return row.cached + offsets

    def block_used(self, row: Row, i: int) -> bool:
        """Whether mask block i drafts for `row` (a row with fewer drafts leaves the last blocks unused)."""
        if self.redraft:  # block i follows i accepted drafts, or the (i - 1)-th candidate
            return i <= len(row.drafts)
        return not self.branching or i < max(len(row.drafts), 1)

    def ar_columns(self, rows: list[Row]) -> torch.Tensor:
        """[b, most + 1]: each row's fed slots u - 1 + i, whose AR logits check draft i (i = d: the token
        after the drafts); rows with fewer drafts repeat their last (unread) slot."""
        return torch.tensor(
            [[min(max(len(r.fresh) - 1 + i, 0), self.width - 1) for i in range(self.most + 1)] for r in rows]
        )

    def read_columns(self, rows: list[Row]) -> torch.Tensor:
        """The pass columns whose logits are read: every row's AR columns and the mask blocks. [k] sorted"""
        n = self.width + self.blocks * self.block
        ar = self.ar_columns(rows).flatten()
        return torch.cat([ar, torch.arange(self.width, n)]).unique()

    def inputs(
        self, rows: list[Row], mask_id: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and position_ids [b, width + blocks * B]."""
        n = self.width + self.blocks * self.block
        ids = torch.full((len(rows), n), mask_id, dtype=torch.long)
        pos = torch.zeros((len(rows), n), dtype=torch.long)
        for r, row in enumerate(rows):
            fed = row.fresh + row.drafts if not row.done else []
            ids[r, : len(fed)] = torch.tensor(fed, dtype=torch.long)
            pos[r, : self.width] = self.slot_position(row)
            for i in range(self.blocks):
                lo = self.width + i * self.block
                pos[r, lo : lo + self.block] = self.base(row, i) + torch.arange(self.block)
        return ids.to(device), pos.to(device)

    def allowed(self, rows: list[Row], key_valid: torch.Tensor, device: torch.device) -> torch.Tensor:
        """[b, 1, n, C + n]: fed slot j sees the row's cache and fed slots <= j; mask block i sees the cache,
        the fed slots before its bonus position and itself; a slot the row does not use sees itself."""
        b, cached = key_valid.shape
        n = self.width + self.blocks * self.block
        allowed = torch.zeros(b, n, cached + n, dtype=torch.bool)
        slot = torch.arange(self.width)
        for r, row in enumerate(rows):
            fed = 0 if row.done else len(row.fresh) + len(row.drafts)
            valid_cache = key_valid[r].cpu()
            allowed[r, :fed, :cached] = valid_cache
            causal = slot[None, :] <= slot[:, None]
            if self.branching:  # a candidate sees the committed tokens and itself, never its rivals
                causal &= (slot[None, :] < len(row.fresh)) | (slot[None, :] == slot[:, None])
            allowed[r, :fed, cached : cached + self.width] = causal[:fed] & (slot[None, :] < fed)
            for i in range(self.blocks):
                if row.done or not self.block_used(row, i):
                    continue
                lo = self.width + i * self.block
                allowed[r, lo : lo + self.block, :cached] = valid_cache
                allowed[r, lo : lo + self.block, [cached + s for s in self.block_sees(row, i)]] = True
                allowed[r, lo : lo + self.block, cached + lo : cached + lo + self.block] = True
        allowed[:, torch.arange(n), cached + torch.arange(n)] = True  # every query sees itself
        return allowed[:, None].to(device)
