"""The run's output folder (`training.output_dir`): checked before any work, held by one run at a time,
never mixed with an earlier run's checkpoints and metrics.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from adapt.core.boundary import check_writable
from adapt.core.errors import AdaptError
from adapt.core.lock import OutputLock, lock_output
from adapt.core.outputs import check_apart, check_replaceable
from adapt.training.checkpoints import CHECKPOINTS, check_same_run, latest_checkpoint
from adapt.training.config import Recipe
from adapt.training.export import FINAL
from adapt.training.metrics import METRICS

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.json"
EARLIER = (CHECKPOINTS, METRICS, ENGINE_FILE, FINAL)
"""What a run leaves in its folder; `--force` moves an earlier run's aside together."""


def claim_output(recipe: Recipe, force: bool = False) -> OutputLock | None:
    """Before any work: check the folder, then lock it for this launch (its first process holds the lock;
    the others stop with it). With `force`, an earlier run's checkpoints and metrics move aside first."""
    check_outputs(recipe, force)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return None
    out = Path(recipe.training.output_dir)
    lock = lock_output(out, "training.output_dir")
    if force and earlier_run(out, recipe.training.resume):
        set_aside(out)
    return lock


def check_outputs(recipe: Recipe, force: bool = False) -> None:
    """Every path the run writes is writable and apart from what it reads, an existing export holds only
    files adapt wrote (it will be replaced), existing checkpoints are this run's to resume."""
    out = Path(recipe.training.output_dir)
    d = recipe.data
    reads = [("model.path", recipe.model.path), ("data.path", d.path), ("data.eval_path", d.eval_path)]
    for written in (out / FINAL, out / CHECKPOINTS, out / METRICS):
        for option, source in reads:
            if source:
                check_apart(written, source, f"the run writes {written}, which", option)
    check_writable(out, "training.output_dir")
    final = out / FINAL
    if final.is_dir() and any(final.iterdir()) and not force:
        check_replaceable(final, "the run's export")
    latest = latest_checkpoint(out)
    if recipe.training.resume and latest is not None:
        check_same_run(recipe, latest)
    elif earlier_run(out, recipe.training.resume) and not force:
        found = f"checkpoints up to {latest.name}" if latest is not None else METRICS
        raise AdaptError(
            f"training.output_dir {out} holds an earlier run ({found}) and this run starts over "
            f"(training.resume={str(recipe.training.resume).lower()}); its steps would mix with that run's: "
            "pass --force to move the earlier run aside, or choose another training.output_dir"
        )


def earlier_run(out: Path, resume: bool) -> bool:
    """`out` holds what a run that this one does not continue wrote (checkpoints, metrics)."""
    latest = latest_checkpoint(out)
    if resume and latest is not None:
        return False
    return latest is not None or (out / METRICS).is_file() or (out / CHECKPOINTS).is_dir()


def set_aside(out: Path) -> Path:
    """Move an earlier run's checkpoints, metrics, engine facts and export into OUT/previous-TIME/."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out / f"previous-{stamp}"
    n = 1
    while aside.exists():
        aside, n = out / f"previous-{stamp}-{n}", n + 1
    aside.mkdir()
    moved = []
    for name in EARLIER:
        if (out / name).exists():
            os.replace(out / name, aside / name)
            moved.append(name)
    log.warning("moved the earlier run's %s to %s", ", ".join(moved), aside)
    return aside
