"""Streaming views of the canvas: a rich live view on a terminal, progressive plain text otherwise."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from adapt.sampling.engine import StepEvent, first_stop

MASK_GLYPH = "░"


def render_row(ids: list[int], mask_id: int, tokenizer: Any) -> str:
    """Text of a row with each still-masked token shown as a shaded glyph."""
    parts: list[str] = []
    run: list[int] = []
    for t in ids + [None]:  # type: ignore[list-item]
        if t is not None and t != mask_id:
            run.append(t)
            continue
        if run:
            parts.append(tokenizer.decode(run, skip_special_tokens=True))
            run = []
        if t is not None:
            parts.append(MASK_GLYPH)
    return "".join(parts)


def region(event: StepEvent, row: int) -> list[int]:
    if event.canvas.infill[row]:
        return event.ids[row, event.ids.shape[1] - len(event.canvas.prompts[row]) :].tolist()
    return event.ids[row, int(event.canvas.start[row]) :].tolist()


class LiveView:
    """Every row of the canvas, redrawn after each step (rich.live)."""

    def __init__(self, tokenizer: Any) -> None:
        from rich.console import Console
        from rich.live import Live

        self.tokenizer = tokenizer
        self.live = Live(console=Console(stderr=True), refresh_per_second=12, transient=True)

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)

    def __call__(self, event: StepEvent) -> None:
        from rich.panel import Panel
        from rich.text import Text

        rows = [
            render_row(region(event, r), event.mask_id, self.tokenizer) for r in range(event.ids.shape[0])
        ]
        body = Text("\n\n".join(rows))
        self.live.update(Panel(body, title=f"block {event.block + 1} · NFE {event.nfe}", title_align="left"))


class PlainStream:
    """Prints the decided left part of the first row as it grows (for pipes and logs).

    Text that could be the start of a stop string is held back until it is decided, and nothing at or
    after a stop string is ever printed, so the stream never shows what the final text cuts.
    """

    def __init__(
        self, tokenizer: Any, eos_ids: list[int], stops: tuple[str, ...] = (), out: TextIO | None = None
    ) -> None:
        self.tokenizer, self.eos_ids, self.stops = tokenizer, set(eos_ids), stops
        self.out = out or sys.stdout
        self.printed = ""

    def __enter__(self) -> PlainStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def __call__(self, event: StepEvent) -> None:
        decided: list[int] = []
        for t in region(event, 0):
            if t == event.mask_id or t in self.eos_ids:
                break
            decided.append(t)
        self._show(self.safe_prefix(self.tokenizer.decode(decided, skip_special_tokens=True)))

    def safe_prefix(self, text: str) -> str:
        """`text` cut before its first stop string, less any tail that may grow into one."""
        cut = first_stop(text, self.stops)
        if cut is not None:
            return text[:cut]
        hold = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return text[: len(text) - hold]

    def _show(self, text: str) -> None:
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed) :])
            self.out.flush()
            self.printed = text

    def finish(self, final: str) -> None:
        """Print what the stream has not shown yet of the final text."""
        if final.startswith(self.printed):
            self.out.write(final[len(self.printed) :])
        self.out.write("\n")
        self.out.flush()
