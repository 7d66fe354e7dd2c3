"""Stopping cleanly on a signal: SIGINT (Ctrl-C) and SIGTERM become a flag checked once per step."""

from __future__ import annotations

import contextlib
import signal
from typing import Any

import torch


class InterruptFlag:
    """Turn SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop, `kill`) into a flag checked once per step;
    every process agrees before stopping."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> InterruptFlag:
        self.received, self.previous = 0, {}
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for number in self.SIGNALS:
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        # not "a second signal stops at once": a terminal's Ctrl-C or SLURM signals every process and
        # torchrun forwards its own copy, so each rank receives two
        self.received = max(self.received, signum)  # SIGTERM (15) outranks SIGINT (2)

    def requested(self, acc: Any) -> str | None:
        """The name of the signal any process received, or None."""
        received = self.received
        if acc.num_processes > 1:
            flag = torch.tensor([float(received)], device=acc.device)
            received = int(acc.reduce(flag, reduction="max").item())
        return signal.Signals(received).name if received else None

    def __exit__(self, *exc: Any) -> None:
        for number, previous in self.previous.items():
            if previous is not None:  # None: a handler installed outside Python, which stays
                signal.signal(number, previous)
