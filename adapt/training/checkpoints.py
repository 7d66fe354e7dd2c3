"""Training checkpoints (model, optimizer, scheduler, RNG and data position) under
OUTPUT_DIR/checkpoints: saved atomically, listed, and resumed from.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

from adapt.core.errors import AdaptError
from adapt.core.outputs import atomic_dir
from adapt.core.ownership import remove_owned
from adapt.training.config import Recipe, recipe_to_dict, save_recipe
from adapt.training.metrics import drop_replayed_metrics
from adapt.training.session import Session, TrainState

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


STATE_FILE = "trainer_state.json"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints (atomically renamed into place), oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(session: Session) -> Path:
    """Model, optimizer, scheduler, RNG and data position, written atomically by every process."""
    from accelerate.utils import broadcast_object_list

    acc, state = session.accelerator, session.state
    path = session.output_dir / CHECKPOINTS / f"step-{state.step:08d}"
    state.checkpoint, state.processes = str(path), acc.num_processes
    with atomic_dir(path) if acc.is_main_process else contextlib.nullcontext() as tmp:
        where = broadcast_object_list([str(tmp) if tmp is not None else None])[0]
        acc.save_state(where)
        if acc.is_main_process:
            (Path(where) / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
            save_recipe(session.recipe, Path(where) / "recipe.yaml")
        acc.wait_for_everyone()
    acc.wait_for_everyone()
    if acc.is_main_process:
        for old in checkpoint_dirs(session.output_dir)[: -session.recipe.training.keep_checkpoints]:
            kept = remove_owned(old)  # what adapt did not write there stays, named
            if kept:
                log.warning("pruned %s but kept %s: adapt did not write it", old, ", ".join(kept))
    return path


def resume(session: Session) -> None:
    """Load the newest checkpoint that loads, saying which ones did not (`check_outputs` refused another
    run's checkpoints before any work)."""
    candidates = checkpoint_dirs(session.output_dir)
    if not candidates:
        return
    for path in reversed(candidates):
        try:
            load_checkpoint(session, path)
        except Exception as e:
            log.warning("checkpoint %s cannot be loaded (%s); trying an older one", path, explain_load(e))
            continue
        if path != candidates[-1]:
            log.warning("resumed from %s, the newest checkpoint that loads", path)
        convert_position(session.state, session.accelerator.num_processes, path)
        if session.accelerator.is_main_process:  # its writer; ranks trimming at once raced on the tmp file
            drop_replayed_metrics(session.output_dir, session.state.step)
        return
    raise AdaptError(
        f"no checkpoint in {session.output_dir / CHECKPOINTS} can be loaded (see above); move them away "
        "or set training.resume=false and pass --force to start over"
    )


def load_checkpoint(session: Session, path: Path) -> None:
    state = TrainState(**json.loads((path / STATE_FILE).read_text()))
    session.accelerator.load_state(str(path))
    session.state = state
    session.state.interrupted, session.state.stopped_by = False, None
    session.state.checkpoint = str(path)


def convert_position(state: TrainState, processes: int, path: Path) -> None:
    """Carry the data position over to another number of processes: process i of n reads micro-batches
    i, i+n, ... of one shuffled order, so k batches on each of n processes are the first k*n of that order.
    Refused when they do not split evenly (some sample would be seen twice or skipped)."""
    saved = state.processes or processes
    consumed = state.batches_in_epoch * saved
    if consumed % processes:
        raise AdaptError(
            f"{path} was written by {saved} process{'es' if saved > 1 else ''} after {consumed} "
            f"micro-batches of epoch {state.epoch}, which do not split over {processes} processes; resume "
            f"with {saved} (or a number of processes that divides {consumed})"
        )
    if saved != processes:
        per = consumed // processes
        log.info("data position: %d micro-batches over %d processes -> %d per process", consumed, saved, per)
    state.batches_in_epoch, state.processes = consumed // processes, processes


def explain_load(e: BaseException) -> str:
    from adapt.core.boundary import explain
    from adapt.core.errors import first_line

    return explain(e) or f"{type(e).__name__}: {first_line(e)}"


def check_same_run(recipe: Recipe, checkpoint: Path) -> None:
    """The checkpoint's recorded model and adapters must be this recipe's (else resuming mixes two runs)."""
    from adapt.training.config import load_recipe

    try:
        saved = recipe_to_dict(load_recipe(checkpoint / "recipe.yaml"))
    except AdaptError:
        return  # unreadable recipe: the weights' own checks decide when loading
    now = recipe_to_dict(recipe)
    for section in ("model", "lora"):
        a, b = saved.get(section), now.get(section)
        if section == "model" and a and b:
            a, b = {**a, "path": same_path(a["path"])}, {**b, "path": same_path(b["path"])}
        if a != b:
            raise AdaptError(
                f"training.output_dir {recipe.training.output_dir} holds checkpoints of another run "
                f"({section}: {saved.get(section)} there, {now.get(section)} now); choose another "
                "training.output_dir, or set training.resume=false and pass --force to start over (the "
                "earlier run is moved aside)"
            )


def same_path(path: str) -> str:
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path
