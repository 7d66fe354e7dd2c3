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

    Also sets `state.eval_accuracy`: the share of masked tokens whose argmax is right (t ~ U(eps, 1)), and
    for the joint objective `state.eval_ar_loss`, the clean stream's next-token cross-entropy (the AR term
    is not part of `eval_loss`, which stays the diffusion loss of every objective).
    """
    if session.eval_loader is None:
        return None
    acc, loss_module = session.accelerator, session.loss_module
    loss_module.eval()
    limit = session.recipe.training.eval_batches
    total = torch.zeros(6, device=acc.device)  # loss * rows, rows, correct, masked, AR nll, AR targets
    for i, batch in enumerate(session.eval_loader):
        if limit is not None and i >= limit:
            break
        gen = step_generator(session, -1, i, acc.device)
        inputs = make_inputs(session, batch, None, gen)
        loss, nll, correct = loss_module(**inputs)
        ar = inputs.get("ar")
        ar = ar if ar is not None else torch.zeros_like(correct)
        diffusion = loss.float() - (nll * inputs["weights"])[ar].sum().float()
        size = float(batch["input_ids"].shape[0])
        counts = [diffusion * size, size, correct[~ar].sum().float(), float((~ar).sum())]
        counts += [nll[ar].sum().float(), float(ar.sum())]
        total += torch.stack([torch.as_tensor(c, device=acc.device, dtype=torch.float32) for c in counts])
    loss_module.train()
    total = acc.reduce(total, reduction="sum") if acc.num_processes > 1 else total
    state = session.state
    state.eval_loss = float(total[0] / total[1].clamp(min=1))
    state.eval_accuracy = float(total[2] / total[3].clamp(min=1))
    state.eval_ar_loss = float(total[4] / total[5]) if float(total[5]) else None
    return state.eval_loss


def log_evaluation(session: Session) -> None:
    """Evaluate on the held-out split and log loss and masked-token accuracy (a non-finite loss stops)."""
    loss = evaluate(session)
    check_finite(session, "evaluation loss", loss, session.state.step)
    if loss is not None:
        extra = {"eval_ar_loss": session.state.eval_ar_loss} if session.state.eval_ar_loss is not None else {}
        log_metrics(session, {"eval_loss": loss, "eval_accuracy": session.state.eval_accuracy, **extra})
