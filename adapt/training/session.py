"""Where a training run stands (`TrainState`, saved with every checkpoint) and everything `fit`
needs (`Session`, built by `setup`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from adapt.core.checkpoint import DiffusionSettings
from adapt.training.config import Recipe
from adapt.training.objectives import Objective


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current pass over the training data."""
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (this process)."""
    processes: int | None = None
    """Processes that consumed them (None in checkpoints older than this field: taken as now)."""
    tokens_seen: int = 0
    """Real (non-padding) tokens trained on, all processes."""
    train_loss: float | None = None
    """Mean loss over the last logging window."""
    eval_loss: float | None = None
    """Diffusion loss on the held-out split at the last evaluation."""
    eval_accuracy: float | None = None
    """Share of held-out masked tokens predicted right (argmax) at the last evaluation."""
    eval_ar_loss: float | None = None
    """Next-token cross-entropy of the clean (AR) stream on the held-out split (joint objective only)."""
    interrupted: bool = False
    """The run stopped on Ctrl-C or SIGTERM (after saving a checkpoint)."""
    stopped_by: str | None = None
    """SIGINT or SIGTERM, the signal that interrupted it."""
    checkpoint: str | None = None
    """The latest complete checkpoint written or resumed from."""


@dataclass
class Session:
    """Everything `fit` needs, built by `setup`."""

    recipe: Recipe
    accelerator: Any
    loss_module: Any
    """The prepared `TokenLoss` around the model (wrapped for DDP/FSDP when distributed)."""
    tokenizer: Any
    settings: DiffusionSettings
    """What the export records (the objective's settings applied)."""
    objective: Objective
    """The training objective: turns clean batches into `TokenLoss` inputs."""
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any | None
    total_steps: int
    state: TrainState = field(default_factory=TrainState)
    probe_ids: list[int] = field(default_factory=list)
    lock: Any = None
    """The output folder's `adapt.core.lock.OutputLock` (None on the launch's other processes)."""
    """Ordinary token ids (for the final probe-batch check)."""

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.training.output_dir)

    @property
    def model(self) -> nn.Module:
        """The trained (HF or peft) model, unwrapped."""
        return self.accelerator.unwrap_model(self.loss_module).model
