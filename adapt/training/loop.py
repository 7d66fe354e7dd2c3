"""`fit`: the step loop. Trains to the recipe's step count; checkpoints, logs, evaluates, stops cleanly
on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging

from adapt.training.checkpoints import save_checkpoint
from adapt.training.checks import check_finite, check_ranks_agree
from adapt.training.heldout import log_evaluation
from adapt.training.metrics import Window, log_metrics, progress_bar
from adapt.training.session import Session, TrainState
from adapt.training.signals import InterruptFlag
from adapt.training.step import clip_gradients, micro_batches, reduce_step, train_step

log = logging.getLogger(__name__)


def fit(session: Session) -> TrainState:
    """Train to the recipe's step count; checkpoints, logs, evaluates, stops cleanly on Ctrl-C."""
    acc, t, state = session.accelerator, session.recipe.training, session.state
    batches, bar, window = micro_batches(session), progress_bar(session), Window()
    with InterruptFlag() as interrupt:
        while state.step < session.total_steps:
            loss, tokens, step_metrics = train_step(session, batches)
            loss, tokens = reduce_step(acc, loss, tokens)
            check_finite(session, "loss", loss, state.step + 1)
            check_finite(session, "gradient norm", clip_gradients(session), state.step + 1)
            session.optimizer.step()
            session.scheduler.step()
            session.optimizer.zero_grad(set_to_none=True)
            state.step, state.tokens_seen = state.step + 1, state.tokens_seen + tokens
            window.add(loss, tokens, step_metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{window.rate():.0f}")
            if state.step % session.recipe.logging.log_every == 0 or state.step == session.total_steps:
                log_metrics(session, window.flush(session))
            if t.eval_every and state.step % t.eval_every == 0:
                log_evaluation(session)
            stop = interrupt.requested(acc)
            if stop is not None:
                state.interrupted, state.stopped_by = True, stop
                if acc.is_main_process:  # said first: a save cut short leaves the previous checkpoint
                    log.warning("interrupted (%s) after step %d: saving a checkpoint", stop, state.step)
                save_checkpoint(session)
                break
            if t.checkpoint_every and state.step % t.checkpoint_every == 0:
                save_checkpoint(session)
    bar.close()
    check_ranks_agree(session)
    just_evaluated = t.eval_every and state.step % t.eval_every == 0 and state.eval_loss is not None
    if not state.interrupted and not just_evaluated:
        log_evaluation(session)
    return state
