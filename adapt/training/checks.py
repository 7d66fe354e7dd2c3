"""Checks that stop a run gone wrong: a non-finite loss or gradient norm, a trained model whose probe loss
overflows, processes that ended with different weights.
"""

from __future__ import annotations

import math

import torch

from adapt.core.errors import AdaptError
from adapt.training.metrics import log_metrics
from adapt.training.noising import make_inputs, step_generator
from adapt.training.session import Session


def check_finite(session: Session, what: str, value: float | None, step: int) -> None:
    """Stop the run (nothing exported) when a loss, gradient norm or evaluation loss is not finite."""
    if value is None or math.isfinite(value):
        return
    raise AdaptError(
        f"{what} is {value} at step {step}; stopped, nothing exported. Last good checkpoint: "
        f"{session.state.checkpoint or 'none'}. Lower training.lr or check the data"
    )


@torch.no_grad()
def check_probe_loss(session: Session) -> None:
    """The trained model's loss on a fixed batch of ordinary tokens must be finite: catches weights that
    are finite yet overflow in a forward pass, with or without a held-out split."""
    acc, ids = session.accelerator, session.probe_ids
    row = torch.tensor([ids[i % len(ids)] for i in range(session.recipe.data.max_length)], device=acc.device)
    batch = {"input_ids": row[None], "attention_mask": torch.ones_like(row[None])}
    inputs = make_inputs(session, batch, None, step_generator(session, -2, 0, acc.device))
    session.loss_module.eval()
    loss, _, _ = session.loss_module(**inputs)
    session.loss_module.train()
    check_finite(session, "the loss of the trained model on a probe batch", float(loss), session.state.step)


@torch.no_grad()
def check_ranks_agree(session: Session) -> None:
    """With several processes, every rank must hold the same weights; logged and enforced."""
    acc = session.accelerator
    if acc.num_processes == 1 or acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
        return  # sharded parameters differ by design
    total = torch.zeros((), dtype=torch.float64, device=acc.device)
    for i, p in enumerate(session.loss_module.parameters()):
        total += p.detach().double().sum() * (1 + (i % 7))
    sums = acc.gather(total[None]).tolist()
    log_metrics(session, {"rank_weight_checksums": sums})
    if any(s != sums[0] for s in sums):
        raise AdaptError(f"processes ended with different weights (checksums {sums}); training diverged")
