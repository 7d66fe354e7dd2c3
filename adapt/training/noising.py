"""Noising a session's clean batches into loss inputs, reproducibly: the masking generator of each
micro-batch is a pure function of (seed, step, micro-batch, rank), so a resumed run sees exactly the masks,
t and annealing patterns of an uninterrupted one.
"""

from __future__ import annotations

import torch

from adapt.core.attention import MaskStyle
from adapt.training.session import Session


def make_inputs(
    session: Session, batch: dict[str, torch.Tensor], step: int | None, generator: torch.Generator
) -> dict:
    """Noise a clean batch into the loss's inputs with the session's objective (step None: final setting)."""
    return session.objective.inputs(batch, step, generator, mask_style(session))


def mask_style(session: Session) -> MaskStyle:
    """The mask the trained model's attention takes: bool for sdpa, a BlockMask for flex_attention,
    additive in the autocast (or weights) dtype for eager."""
    return MaskStyle.for_model(session.model, mask_dtype(session))


def mask_dtype(session: Session) -> torch.dtype:
    mp = session.accelerator.mixed_precision
    if mp == "bf16":
        return torch.bfloat16
    if mp == "fp16":
        return torch.float16
    return next(session.model.parameters()).dtype


def step_generator(session: Session, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The masking RNG of one micro-batch: a pure function of (seed, step, micro-batch, rank)."""
    seed = session.recipe.training.seed
    rank = session.accelerator.process_index
    key = ((seed * 1_000_003 + step) * 1009 + micro) * 4099 + rank
    return torch.Generator(device=device).manual_seed(key % (2**63 - 1))
