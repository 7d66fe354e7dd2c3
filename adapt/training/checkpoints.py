"""Training checkpoints (model, optimizer, scheduler, RNG and data position) under
OUTPUT_DIR/checkpoints: saved atomically, listed, and resumed from.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from adapt.core.errors import AdaptError, Stopped
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
    """Load the newest checkpoint that every process loads, saying which ones did not and why
    (`check_outputs` refused another run's checkpoints before any work).

    The processes agree: all take rank 0's newest checkpoint; each checks the files only it reads, then
    all load it; after each of the two they exchange whether it went well, and all move on to the next
    older checkpoint unless every one did. So a checkpoint that only some ranks can load (a damaged file of
    one rank's own) is skipped by all and every rank resumes from the same step, and no rank enters the
    engine's collective load while another has already given up on it. With one process this is the
    plain newest-first fallback.
    """
    from accelerate.utils import broadcast_object_list, gather_object

    acc = session.accelerator
    candidates = checkpoint_dirs(session.output_dir)
    if acc.num_processes > 1:  # rank 0's list: a rank that lacks one of them fails to load it
        candidates = broadcast_object_list([candidates])[0]
    if not candidates:
        return
    for path in reversed(candidates):
        for step in (check_own_files, load_checkpoint):
            failed = attempt(step, session, path)
            failures = gather_object([failed]) if acc.num_processes > 1 else [failed]
            if any(failures):
                break
        if any(failures):
            if acc.is_main_process:
                log.warning("checkpoint %s cannot be loaded %s; trying an older one", path, reasons(failures))
            continue
        if path != candidates[-1] and acc.is_main_process:
            log.warning("resumed from %s, the newest checkpoint that loads", path)
        convert_position(session.state, acc.num_processes, path)
        if acc.is_main_process:  # its writer; ranks trimming at once raced on the tmp file
            drop_replayed_metrics(session.output_dir, session.state.step)
        return
    where, every = session.output_dir / CHECKPOINTS, " by every process" if acc.num_processes > 1 else ""
    if not acc.is_main_process:
        raise Stopped(f"no checkpoint in {where} can be loaded{every}; rank 0 says why")
    raise AdaptError(
        f"no checkpoint in {where} can be loaded{every} (see above); move them away or set "
        "training.resume=false and pass --force to start over"
    )


def attempt(step: Callable[[Session, Path], None], session: Session, path: Path) -> str | None:
    """Run one step of loading `path` on this process: None when it went well, else why not. Catches what
    torch's distributed checkpoint raises too (its CheckpointException is a BaseException), never Ctrl-C
    or an exit."""
    try:
        step(session, path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        return explain_load(e)
    return None


def reasons(failures: list[str | None]) -> str:
    """`(why)` for one process or when every process failed alike, else `by rank 1 (why)`, and so on."""
    ranks: dict[str, list[int]] = {}
    for rank, why in enumerate(failures):
        if why:
            ranks.setdefault(why, []).append(rank)
    if len(ranks) == 1 and all(failures):
        return ("on every process " if len(failures) > 1 else "") + f"({next(iter(ranks))})"
    said = [f"by rank{'s' * (len(r) > 1)} {', '.join(map(str, r))} ({why})" for why, r in ranks.items()]
    return "; ".join(said)


def load_checkpoint(session: Session, path: Path) -> None:
    """Model, optimizer, scheduler, RNG and data position from `path` (every process together)."""
    state = read_state(path)
    session.accelerator.load_state(str(path))
    session.state = state
    session.state.interrupted, session.state.stopped_by = False, None
    session.state.checkpoint = str(path)


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / STATE_FILE).read_text()))


def check_own_files(session: Session, path: Path) -> None:
    """Before the engine's collective load, the files of `path` that only this process reads: its RNG
    state (Accelerate skips one it cannot read without a word, and the resumed run would no longer repeat
    the uninterrupted one) and, under DeepSpeed, its partition of the optimizer state (a torch zip archive:
    every member must match its checksum). A rank that failed on one of them inside the load, while the
    others went on into the engine's collectives, would meet them in mismatched collectives."""
    import zipfile

    from accelerate.utils import load

    state = read_state(path)
    rank, saved = session.accelerator.process_index, state.processes or 1
    rng = path / f"random_states_{rank}.pkl"
    if rng.exists() or rank < saved:  # a run written by fewer processes has no file for this rank
        with about_file(rng):
            load(rng)
    if saved != session.accelerator.num_processes:
        return  # DeepSpeed itself refuses partitions written by another number of processes
    partitions = sorted(path.glob("*/*zero_pp_rank_*optim_states.pt"))
    own = [p for p in partitions if f"zero_pp_rank_{rank}_" in p.name]
    if partitions and not own:
        raise AdaptError(f"{path} holds no optimizer partition of rank {rank}")
    for partition in own:
        with about_file(partition), zipfile.ZipFile(partition) as archive:
            bad = archive.testzip()  # reads it through once (the load then reads it from the page cache)
        if bad is not None:
            raise AdaptError(f"{partition.name}: corrupt ({bad} does not match its checksum)")


@contextlib.contextmanager
def about_file(path: Path) -> Iterator[None]:
    """Name the file in what reading it raised."""
    try:
        yield
    except AdaptError:
        raise
    except Exception as e:
        raise AdaptError(f"{path.name}: {explain_load(e)}") from e


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
    """One line for why a checkpoint did not load: under FSDP the first failing rank's reason out of
    torch's CheckpointException (whose text is every rank's traceback)."""
    import pickle
    import zipfile

    from adapt.core.boundary import explain
    from adapt.core.errors import first_line

    failures = getattr(e, "failures", None)
    if type(e).__name__ == "CheckpointException" and isinstance(failures, dict) and failures:
        rank, (inner, _) = sorted(failures.items(), key=lambda kv: kv[0])[0]
        return f"sharded load failed on rank {rank}: {explain_load(inner)}"
    if isinstance(e, (pickle.UnpicklingError, zipfile.BadZipFile, EOFError)):
        return f"corrupt or truncated ({type(e).__name__}: {first_line(e).split('. ')[0]})"
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
