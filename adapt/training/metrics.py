"""What a run logs: step metrics to the Accelerate trackers and OUTPUT_DIR/metrics.jsonl, running averages
between log lines, the progress bar, and the recipe flattened for the trackers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from adapt.training.config import Recipe, recipe_to_dict
from adapt.training.session import Session

METRICS = "metrics.jsonl"


def log_metrics(session: Session, metrics: dict[str, Any]) -> None:
    """To the Accelerate trackers and (main process) a JSONL file."""
    metrics = {k: v for k, v in metrics.items() if v is not None}
    if not metrics:
        return
    acc, step = session.accelerator, session.state.step
    if session.recipe.logging.report_to:
        acc.log(metrics, step=step)
    if session.recipe.logging.jsonl and acc.is_main_process:
        session.output_dir.mkdir(parents=True, exist_ok=True)
        with (session.output_dir / METRICS).open("a") as f:
            f.write(json.dumps({"step": step, **metrics}, allow_nan=False) + "\n")


def drop_replayed_metrics(output_dir: Path, step: int) -> None:
    """Remove metrics logged after `step` (they will be logged again by the resumed run)."""
    f = output_dir / METRICS
    if not f.is_file():
        return
    lines = f.read_text().splitlines(keepends=True)
    kept = [line for line in lines if logged_step(line) <= step]
    if len(kept) != len(lines):
        tmp = f.with_name(f".{f.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, f)


def logged_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError):
        return 0


class Window:
    """Running averages between two log lines."""

    def __init__(self) -> None:
        self.start, self.losses, self.tokens = time.perf_counter(), [], 0
        self.metrics: dict[str, list[float]] = {}

    def add(self, loss: float, tokens: int, metrics: dict[str, float]) -> None:
        self.losses.append(loss)
        for name, value in metrics.items():
            self.metrics.setdefault(name, []).append(value)
        self.tokens += tokens

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def flush(self, session: Session) -> dict[str, float]:
        state = session.state
        state.train_loss = sum(self.losses) / max(1, len(self.losses))
        metrics = {
            "loss": state.train_loss,
            "lr": session.scheduler.get_last_lr()[0],
            "tokens_per_s": self.rate(),
            "tokens_seen": state.tokens_seen,
            "epoch": state.epoch,
        }
        metrics.update({name: sum(v) / len(v) for name, v in self.metrics.items()})
        self.__init__()
        return metrics


def progress_bar(session: Session) -> Any:
    from tqdm.auto import tqdm

    show = session.recipe.logging.progress_bar and session.accelerator.is_main_process
    return tqdm(total=session.total_steps, initial=session.state.step, disable=not show, unit="step")


def flat_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe flattened to scalar values, as trackers want their hyperparameters."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            out[prefix] = value
        else:
            out[prefix] = str(value)

    walk("", recipe_to_dict(recipe))
    return out
