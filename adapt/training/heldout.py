"""Evaluation on the held-out split during training: diffusion loss and masked-token accuracy."""

from __future__ import annotations

import torch

from adapt.training.checks import check_finite
from adapt.training.metrics import log_metrics
from adapt.training.noising import make_inputs, step_generator
from adapt.training.session import Session


@torch.no_grad()
def evaluate(session: Session) -> float | None:
    """Mean diffusion loss on the held-out split at the objective's final setting, with a fixed masking seed.

    Also sets `state.eval_accuracy`: the share of masked tokens whose argmax is right (t ~ U(eps, 1)).
    """
    if session.eval_loader is None:
        return None
    acc, loss_module = session.accelerator, session.loss_module
    loss_module.eval()
    limit = session.recipe.training.eval_batches
    total = torch.zeros(4, device=acc.device)  # loss * rows, rows, correct, masked
    for i, batch in enumerate(session.eval_loader):
        if limit is not None and i >= limit:
            break
        gen = step_generator(session, -1, i, acc.device)
        inputs = make_inputs(session, batch, None, gen)
        loss, _, correct = loss_module(**inputs)
        size = float(batch["input_ids"].shape[0])
        counts = [loss.float() * size, size, correct.sum().float(), float(correct.numel())]
        total += torch.stack([torch.as_tensor(c, device=acc.device, dtype=torch.float32) for c in counts])
    loss_module.train()
    total = acc.reduce(total, reduction="sum") if acc.num_processes > 1 else total
    session.state.eval_loss = float(total[0] / total[1].clamp(min=1))
    session.state.eval_accuracy = float(total[2] / total[3].clamp(min=1))
    return session.state.eval_loss


def log_evaluation(session: Session) -> None:
    """Evaluate on the held-out split and log loss and masked-token accuracy (a non-finite loss stops)."""
    loss = evaluate(session)
    check_finite(session, "evaluation loss", loss, session.state.step)
    if loss is not None:
        log_metrics(session, {"eval_loss": loss, "eval_accuracy": session.state.eval_accuracy})
