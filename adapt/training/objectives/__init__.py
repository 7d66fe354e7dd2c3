"""The training objectives: what the model sees and where the loss is read, one module each.

| objective | module | recipe |
|---|---|---|
| full-attention masked diffusion (LLaDA, DiffuLLaMA) | `masked.py` | `diffusion.block_size` unset |
| block diffusion (BD3-LM, Fast-dLLM v2) | `block.py` | `diffusion.block_size: B` |

Both turn a clean batch into the inputs of the one shared loss (`loss.TokenLoss`), so the training
loop calls `objective.inputs(...)` and never asks which objective it has.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from adapt.core.checkpoint import DiffusionSettings
from adapt.training.config import DiffusionConfig

Inputs = dict[str, Any]  # tensors, the attention argument (dense, BlockMask or placeholder), a PairLayout


class Objective(Protocol):
    """Noise a batch, say what a step used, say what the export records."""

    name: str

    def inputs(
        self, batch: dict[str, torch.Tensor], step: int | None, generator: torch.Generator, dtype: torch.dtype
    ) -> Inputs:
        """`TokenLoss` inputs (input_ids, attention_mask, position_ids, rows, cols, targets, weights) for a
        clean batch at training step `step`; None is the final setting, used for evaluation."""
        ...

    def step_metrics(self, step: int, batch: dict[str, torch.Tensor], inputs: Inputs) -> dict[str, float]:
        """Numbers worth logging about one step's inputs (averaged over the logging window)."""
        ...

    def record(self, settings: DiffusionSettings) -> DiffusionSettings:
        """The checkpoint settings the export writes for a model trained with this objective."""
        ...


def make_objective(config: DiffusionConfig, settings: DiffusionSettings, teacher: Any = None) -> Objective:
    """The objective a recipe's `diffusion` section asks for (`teacher`: its AR term's, if it has one)."""
    from adapt.training.objectives.block import BlockDiffusion
    from adapt.training.objectives.masked import MaskedDiffusion

    if config.block_size is not None:
        return BlockDiffusion(config, settings, teacher=teacher)
    return MaskedDiffusion(config, settings)
