"""`run`: the whole fine-tuning job, setup -> fit -> export (-> push)."""

from __future__ import annotations

from pathlib import Path

from adapt.training.checks import check_probe_loss
from adapt.training.config import Recipe
from adapt.training.export import export, push_if_requested
from adapt.training.loop import fit
from adapt.training.session import TrainState
from adapt.training.setup import setup


def run(recipe: Recipe, force: bool = False) -> tuple[TrainState, Path | None]:
    """setup -> fit -> export (-> push); returns the final state and the exported directory. `force` moves
    an earlier run in the output folder aside (else such a folder is refused)."""

    session = setup(recipe, force)
    try:
        state = fit(session)
        exported = None
        if not state.interrupted and recipe.training.export:
            check_probe_loss(session)
            exported = export(session)
            push_if_requested(session, exported)
        # every rank done before the process group goes down (a rank that tore its group down while rank 0
        # still wrote the export was seen to abort in gloo's threads: "terminate called without an active
        # exception", and the launcher then reports the run failed)
        session.accelerator.wait_for_everyone()
        return state, exported
    finally:
        session.accelerator.end_training()
        if session.lock is not None:
            session.lock.release()
