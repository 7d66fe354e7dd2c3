"""`run`: the whole fine-tuning job, setup -> fit -> export (-> push), and how one of its processes stops
when another one has failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from adapt.core.errors import Stopped
from adapt.training.checks import check_probe_loss
from adapt.training.config import Recipe
from adapt.training.export import export, push_if_requested
from adapt.training.loop import fit
from adapt.training.session import TrainState
from adapt.training.setup import setup


def run(recipe: Recipe, force: bool = False) -> tuple[TrainState, Path | None]:
    """setup -> fit -> export (-> push); returns the final state and the exported directory. `force` moves
    an earlier run in the output folder aside (else such a folder is refused)."""

    with peers_watched():
        session = setup(recipe, force)
        try:
            state = fit(session)
            exported = None
            if not state.interrupted and recipe.training.export:
                check_probe_loss(session)
                exported = export(session)
                push_if_requested(session, exported)
            # every rank done before the process group goes down (a rank that tore its group down while rank
            # 0 still wrote the export was seen to abort in gloo's threads: "terminate called without an
            # active exception", and the launcher then reports the run failed)
            session.accelerator.wait_for_everyone()
            return state, exported
        finally:
            session.accelerator.end_training()
            if session.lock is not None:
                session.lock.release()


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


@contextlib.contextmanager
def peers_watched() -> Iterator[None]:
    """A collective that fails because another process of the run is gone (it failed and reports why, or
    was killed; torchrun then stops the rest) ends this one with one `stopped:` line, not gloo's traceback
    and not a second `error:` line."""
    try:
        yield
    except RuntimeError as e:
        gone = next((words for words in PEER_GONE if words in str(e)), None)
        if gone is None:
            raise
        raise Stopped(
            f"another process of this run ended first ({gone.lower()}); its error above, or the launcher's "
            "report, says why"
        ) from None


def close_process_group() -> None:
    """Tear the launch's process group down before the interpreter does."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave_launch(code: int) -> None:
    """A process of a multi-process launch whose work is done (or saved) exits without the interpreter's
    teardown. Left to it, a ZeRO-3 rank was seen to abort there in a C++ thread's destructor ("terminate
    called without an active exception", SIGABRT) and the launcher reported a finished run as failed; the
    engine keeps references to the process group past `destroy_process_group`. Output is flushed first."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
