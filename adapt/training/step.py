"""One optimizer step's work: endless micro-batches from where the state says, forward/backward over
grad_accumulation of them, the reduction over processes, gradient clipping.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from adapt.core.errors import AdaptError
from adapt.training.noising import make_inputs, step_generator
from adapt.training.session import Session


def micro_batches(session: Session) -> Any:
    """Endless training micro-batches, epoch after epoch, starting where the state says."""
    from accelerate import skip_first_batches

    state = session.state
    while True:
        session.train_loader.set_epoch(state.epoch)
        loader = session.train_loader
        if state.batches_in_epoch:
            loader = skip_first_batches(loader, state.batches_in_epoch)
        for batch in loader:
            state.batches_in_epoch += 1
            yield batch
        if state.batches_in_epoch == 0:
            raise AdaptError("the training data produced no batches")
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0


def train_step(session: Session, batches: Any) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Forward/backward over grad_accumulation micro-batches: (mean loss, real tokens, step metrics)."""
    acc, ga = session.accelerator, session.recipe.training.grad_accumulation
    step = session.state.step
    total = torch.zeros((), device=acc.device)
    tokens, metrics = 0, {}
    for micro in range(ga):
        batch = next(batches)
        inputs = make_inputs(session, batch, step, step_generator(session, step, micro, acc.device))
        last = micro == ga - 1
        acc.sync_gradients = last  # DeepSpeed steps inside the last micro-batch's backward
        sync = contextlib.nullcontext() if last else acc.no_sync(session.loss_module)
        with sync:
            loss, nll, _ = session.loss_module(**inputs)
            acc.backward(loss / ga)
        total += loss.detach() / ga
        tokens += int(batch["attention_mask"].sum())
        if inputs.get("ar") is not None:  # the joint objective: its AR term's own mean, for the log
            metrics["ar_loss"] = metrics.get("ar_loss", 0.0) + float(nll[inputs["ar"]].mean()) / ga
        for name, value in session.objective.step_metrics(step, batch, inputs).items():
            metrics[name] = metrics.get(name, 0.0) + value / ga
    return total, tokens, metrics


def reduce_step(acc: Any, loss: torch.Tensor, tokens: int) -> tuple[float, int]:
    """Mean loss and summed tokens over processes (one all-reduce)."""
    both = torch.stack([loss.float(), torch.tensor(float(tokens), device=loss.device)])
    if acc.num_processes > 1:
        both = acc.reduce(both, reduction="sum")
        both[0] /= acc.num_processes
    return float(both[0]), int(both[1])


def clip_gradients(session: Session) -> float | None:
    """Clip to training.max_grad_norm (when set) and return the gradient norm before clipping.

    None under fp16 (the grad scaler skips non-finite steps itself) and where Accelerate gives no norm.
    """
    acc, limit = session.accelerator, session.recipe.training.max_grad_norm
    norm = acc.clip_grad_norm_(session.loss_module.parameters(), limit if limit is not None else math.inf)
    if norm is None or acc.mixed_precision == "fp16":
        return None
    return float(norm)
