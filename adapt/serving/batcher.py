"""One model, many requests: compatible requests decoded as one batch, batches decoded in turn.

- Each prompt of a request is a `Job` in the inbox.
- The gatherer waits for a free decoding slot (at most `ACTIVE_BATCHES` batches at once; meanwhile
  arrivals queue up), then takes the oldest job and every queued job whose settings it can share a batch
  with (`api.batch_key`: equal settings, greedy), waiting until the batching window after the oldest
  arrived, up to `max_batch` rows. A row of a batch gets exactly what it gets alone (the sampler's
  guarantee); requests whose random draws depend on the batch (temperature > 0) are decoded alone.
- Each batch runs `adapt.sampling.generate` in its own thread. The model is lent to one batch at a time
  (`Turn`) and handed on, in arrival order, after every denoising step (every pass of `verify`): a
  request never waits for another's whole answer, only for one step of each batch ahead of it.
- After every step each row's newly settled text goes to its job (`stream.RowText`); a row that decided
  a stop token is answered then, not when its batch ends; a batch whose rows are all answered or whose
  clients all left is stopped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adapt.core.checkpoint import DiffusionSettings
from adapt.core.errors import AdaptError, first_line
from adapt.sampling.config import SamplingConfig
from adapt.sampling.engine import StepEvent, generate, stop_token_ids
from adapt.serving.api import ApiError, as_fields, batch_key
from adapt.serving.stream import Final, RowText, finish_reason

log = logging.getLogger(__name__)

ACTIVE_BATCHES = 4
"""Batches decoded at once, taking turns step by step (each holds its own canvas and KV cache)."""
DECODER = "adapt-serve-decode"  # the name of each batch's thread
MAX_WAITING = 1024
"""Jobs queued and not yet decoding; more are refused (503) rather than held without bound."""


@dataclass(frozen=True)
class Delta:
    """New settled text of choice `index`."""

    index: int
    text: str


@dataclass(frozen=True)
class Done:
    """Choice `index` is finished: the last of its text (`text`), and the whole answer."""

    index: int
    text: str
    final: Final
    prompt_tokens: int


@dataclass(frozen=True)
class Failed:
    index: int
    error: ApiError


Event = Delta | Done | Failed


@dataclass
class Job:
    """One prompt to decode: token ids, its settings, and where its events go (called from any thread)."""

    ids: list[int]
    config: SamplingConfig
    index: int
    emit: Callable[[Event], None]
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    """Set by the server when the client has gone: its row's output is no longer sent."""
    key: tuple[Any, ...] | None = field(init=False)
    """Jobs with equal keys may share a batch; None: decoded alone (`api.batch_key`)."""

    def __post_init__(self) -> None:
        self.key = batch_key(self.config)


class Turn:
    """A lock handed to its waiters in arrival order; `pass_on` lets the waiters go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._line: deque[object] = deque()
        self._held = False

    def __enter__(self) -> Turn:
        me = object()
        with self._cond:
            self._line.append(me)
            while self._held or self._line[0] is not me:
                self._cond.wait()
            self._line.popleft()
            self._held = True
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def pass_on(self) -> None:
        """Held: let everyone waiting now take a turn, then take it back (no-op when nobody waits)."""
        with self._cond:
            if not self._line:
                return
        self.__exit__()
        self.__enter__()


class _Stop(Exception):
    """Every row of a batch is answered or abandoned: nothing more to decode."""


class Batcher:
    """The decoding side of the server: call `start`, then `submit` jobs from any thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: DiffusionSettings,
        max_batch: int,
        window: float,
        active: int = ACTIVE_BATCHES,
    ) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.max_batch, self.window = max_batch, window
        self.eos_ids = set(stop_token_ids(tokenizer, model))
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.turn = Turn()
        self.slots = threading.Semaphore(active)
        self.batches: list[int] = []  # rows of each batch started, in order (read by tests and logs)
        self.waiting = 0  # jobs submitted and not yet in a batch
        self._count = threading.Lock()
        self._thread = threading.Thread(target=self._gather, name="adapt-serve-gather", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.inbox.put(None)

    def submit(self, jobs: list[Job]) -> None:
        with self._count:
            full = self.waiting + len(jobs) > MAX_WAITING
            self.waiting += 0 if full else len(jobs)
        if full:
            raise ApiError(
                503,
                "the server is busy: too many requests waiting; retry later",
                None,
                "overloaded",
                "server_error",
            )
        for job in jobs:
            self.inbox.put(job)

    # ------------------------------------------------------------------ gathering

    def _gather(self) -> None:
        waiting: list[Job] = []
        while True:
            if not waiting:
                job = self.inbox.get()
                if job is None:
                    return
                waiting.append(job)
            self.slots.acquire()  # a batch may start: what arrived meanwhile joins the choice
            running = self._collect(waiting)
            batch = self._take(waiting)
            if batch:
                self.batches.append(len(batch))
                threading.Thread(target=self._decode, args=(batch,), name=DECODER, daemon=True).start()
            else:
                self.slots.release()
            if not running:
                return

    def _collect(self, waiting: list[Job]) -> bool:
        """Move arrivals into `waiting` until the oldest job's batch is full or its window has passed
        (everything already queued is taken in any case). False once `stop` was called."""
        key, deadline = waiting[0].key, waiting[0].arrived + self.window
        mates = sum(j.key == key for j in waiting) if key is not None else 0
        while True:
            full = key is None or mates >= self.max_batch
            timeout = 0.0 if full else deadline - time.monotonic()
            try:
                job = self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            waiting.append(job)
            mates += key is not None and job.key == key

    def _take(self, waiting: list[Job]) -> list[Job]:
        """The oldest live job and the live jobs that may share its batch, taken out of `waiting`."""
        live = [j for j in waiting if not j.cancelled]
        key = live[0].key if live else None
        batch = [j for j in live if key is not None and j.key == key][: self.max_batch] or live[:1]
        taken = {id(j) for j in batch}
        with self._count:
            self.waiting -= len(waiting) - (len(live) - len(batch))  # taken, or dropped: cancelled
        waiting[:] = [j for j in live if id(j) not in taken]
        return batch

    # ------------------------------------------------------------------ decoding

    def _decode(self, batch: list[Job]) -> None:
        config = batch[0].config
        rows = [
            RowText(self.tokenizer, self.eos_ids, self.settings.mask_token_id, config.stop, config.gen_length)
            for _ in batch
        ]
        try:
            with self.turn:
                step = _Step(batch, rows, self.turn)
                out = generate(
                    self.model, self.tokenizer, [j.ids for j in batch], config, self.settings, on_step=step
                )
            for job, row, tokens, text in zip(batch, rows, out.sequences, out.texts, strict=True):
                if row.final is None and not job.cancelled:
                    final = Final(text, tokens, finish_reason(tokens, config.gen_length))
                    job.emit(Done(job.index, row.finish(final), final, len(job.ids)))
        except _Stop:
            pass
        except AdaptError as e:  # a setting only the model could refuse
            for job in batch:
                job.emit(Failed(job.index, ApiError(400, as_fields(first_line(e)))))
        except Exception:
            log.exception("decoding a batch of %d failed", len(batch))
            for job in batch:
                job.emit(
                    Failed(
                        job.index, ApiError(500, "internal error while decoding", None, None, "server_error")
                    )
                )
        finally:
            self.slots.release()


class _Step:
    """The `on_step` hook of one batch (the one `adapt sample --stream` displays through): sends each row's
    new settled text, answers finished rows, stops a batch with nothing left to send, passes the turn."""

    def __init__(self, batch: list[Job], rows: list[RowText], turn: Turn) -> None:
        self.batch, self.rows, self.turn = batch, rows, turn
        self.spans: list[tuple[int, int]] | None = None

    def __call__(self, event: StepEvent) -> None:
        if event.ids.shape[0] != len(self.batch):  # never with plain prompts (one cache group)
            return
        if self.spans is None:
            starts, ends = event.canvas.start.tolist(), event.canvas.end.tolist()
            self.spans = list(zip(starts, ends, strict=True))
        ids = event.ids.cpu()  # [b, l] one copy per step, not one per row
        for r, (job, row) in enumerate(zip(self.batch, self.rows, strict=True)):
            if row.final is not None or job.cancelled:
                continue
            begin, end = self.spans[r]
            delta = row.advance(ids[r, begin:end].tolist())
            if row.final is not None:
                job.emit(Done(job.index, delta, row.final, len(job.ids)))
            elif delta:
                job.emit(Delta(job.index, delta))
        if all(
            row.final is not None or job.cancelled for job, row in zip(self.batch, self.rows, strict=True)
        ):
            raise _Stop
        self.turn.pass_on()
