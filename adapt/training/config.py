"""Fine-tuning recipes: YAML files loaded into nested typed dataclasses.

A recipe is data only (no class paths, no code). `load_recipe(path, overrides)` reads the YAML,
applies `a.b=value` overrides (values typed as YAML scalars), and builds a `Recipe`; unknown keys
and wrong types fail with an `AdaptError` that lists the valid keys of the section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from adapt.core.errors import AdaptError, first_line
from adapt.training.data import DataConfig


@dataclass
class ModelConfig:
    """The model to fine-tune."""

    path: str
    """A converted diffusion checkpoint, or an AR causal LM (local dir or Hub id) converted on the fly."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `path` is a Hub id; None: the default branch."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the weights held by the optimizer (use training.mixed_precision for autocast)."""
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    """Attention kernel: sdpa (a boolean mask per batch), eager (an additive one), or flex_attention (a
    FlexAttention BlockMask that skips empty tiles, no dense mask: CUDA, for long sequences)."""
    shift: bool | None = None
    """Logits at i predict token i + 1. None: the checkpoint's recorded value (True when converting)."""
    mask_init: Literal["mean", "normal", "zero"] = "mean"
    """Initial mask-token embedding when an AR model is converted on the fly."""


@dataclass
class DiffusionConfig:
    """The masked-diffusion objective."""

    eps: float = 1e-3
    """t ~ U(eps, 1): the lowest masking rate (keeps the 1/t weight bounded)."""
    low_discrepancy: bool = True
    """Stratified t across the batch, t_i = eps + (1 - eps)((u + i/b) mod 1): lower-variance loss."""
    anneal_steps: int = 0
    """Attention annealing: open future edges with probability (step + 1) / N; 0 = bidirectional."""
    complementary_masking: bool = False
    """Also train on the complement of each mask (rate 1 - t): two views of every sample per step."""
    train_on_padding: bool = False
    """Let padding positions be masked and enter the loss (teaches EOS/length, as LLaDA SFT does)."""
    block_size: int | None = None
    """Block diffusion (BD3-LM): autoregressive over blocks of this many tokens, diffusion inside each;
    null: the full-attention objective. Must divide data.max_length."""
    block_schedule: list[list[int]] | None = None
    """Block size by step while adapting, as [[step, size], ...] from step 0, ending at block_size
    (LLaDA2: start near 1 = AR, grow, settle). null: block_size throughout."""
    clean_attention: Literal["block", "causal"] = "block"
    """How the clean copy x_0 attends in block diffusion. block (BD3-LM): clean block b sees clean blocks
    <= b. causal: each clean token sees the clean tokens before it, as in the AR source, so a committed
    token's keys depend only on the past and the sampler caches it in the very next pass instead of
    re-feeding its whole block (fewer tokens per pass: B + 1 instead of 2B at one token per step)."""
    ar_loss_weight: float = 0.0
    """Joint objective (TiDAR): also train next-token cross-entropy on the clean half, the AR source's own
    loss, added with this weight. Needs clean_attention: causal (the clean half is then an AR pass); the
    checkpoint is then an AR model and a block-diffusion drafter at once (`adapt sample --strategy verify`).
    0: the diffusion loss alone."""
    ar_teacher: str | None = None
    """With the AR term: an AR causal LM (usually model.path's AR source) whose next-token distribution
    the clean stream is trained to match, KL(teacher || model), instead of the corpus tokens' cross-
    entropy. Keeps the AR stream at the teacher's quality when the corpus is the teacher's own greedy text
    (whose hard targets sharpen it). Training only: held-out `eval_ar_loss` stays the tokens' cross-
    entropy. null: cross-entropy on the tokens."""
    full_mask: bool = False
    """TiDAR's drafter training: every token of the noisy copy is a mask (t = 1 in every block) instead of
    t ~ U(eps, 1). The mask blocks then train on exactly what `--strategy verify` asks of them (a whole
    block of masks after the committed tokens, drafted in one step) and every token enters the loss. Needs
    the AR term: such a checkpoint drafts for verify (threshold decoding needs partly unmasked blocks,
    which it never sees)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise AdaptError(f"diffusion.eps must be in (0, 1), got {self.eps}")
        self.check_ar_loss_weight()
        self.check_full_mask()
        if self.anneal_steps < 0:
            raise AdaptError(f"diffusion.anneal_steps must be >= 0, got {self.anneal_steps}")
        if self.block_size is None:
            if self.block_schedule is not None:
                raise AdaptError(
                    "diffusion.block_schedule needs diffusion.block_size (the block size it ends at)"
                )
            if self.clean_attention != "block":
                raise AdaptError(
                    f"diffusion.clean_attention={self.clean_attention} needs diffusion.block_size (it says "
                    "how the clean copy attends in block diffusion)"
                )
            return
        if self.block_size < 1:
            raise AdaptError(
                f"diffusion.block_size must be >= 1 (or null for full attention), got {self.block_size}"
            )
        if self.anneal_steps:
            raise AdaptError(
                "diffusion.anneal_steps does not apply to block diffusion (its attention is block-causal "
                "from the start); set anneal_steps=0 and grow the block with diffusion.block_schedule, "
                f"e.g. [[0, 1], [100, {self.block_size}]]"
            )
        if self.block_schedule is not None:
            check_block_schedule(self.block_schedule, self.block_size)

    def check_ar_loss_weight(self) -> None:
        """The AR term is a finite weight >= 0, and only where the clean half is an AR pass."""
        a = self.ar_loss_weight
        if not math.isfinite(a) or a < 0:
            raise AdaptError(f"diffusion.ar_loss_weight must be a finite number >= 0, got {a}")
        if self.ar_teacher is not None and not a:
            raise AdaptError(
                "diffusion.ar_teacher sets what the AR term matches, but diffusion.ar_loss_weight is 0 "
                "(no AR term); set ar_loss_weight > 0 or ar_teacher=null"
            )
        if a and (self.block_size is None or self.clean_attention != "causal"):
            where = "full attention" if self.block_size is None else "clean_attention: block"
            raise AdaptError(
                f"diffusion.ar_loss_weight={a} trains the clean half as an AR model, which needs block "
                f"diffusion with clean_attention: causal (this recipe has {where}); set "
                "diffusion.block_size and diffusion.clean_attention=causal, or ar_loss_weight=0"
            )

    def check_full_mask(self) -> None:
        """The full mask is a drafter's objective: for the joint model, never with its own complement."""
        if self.full_mask and not self.ar_loss_weight:
            raise AdaptError(
                "diffusion.full_mask trains a one-step drafter for --strategy verify, which needs the AR "
                "term; set diffusion.ar_loss_weight > 0 (with block_size and clean_attention: causal) or "
                "full_mask=false"
            )
        if self.full_mask and self.complementary_masking:
            raise AdaptError(
                "diffusion.full_mask masks every token, so complementary_masking's second view would mask "
                "none; set one of them false"
            )

    def block_sizes(self) -> list[int]:
        """Every block size training will use (the schedule's and the target)."""
        if self.block_size is None:
            return []
        return sorted({self.block_size, *(size for _, size in self.block_schedule or [])})


def check_block_schedule(schedule: list[list[int]], block_size: int) -> None:
    """[[step, size], ...]: starts at step 0, steps strictly increasing, sizes >= 1, ends at block_size."""
    form = "a list of [step, block_size] pairs, e.g. [[0, 1], [100, 4], [200, 32]]"
    if not schedule or any(len(pair) != 2 for pair in schedule):
        raise AdaptError(f"diffusion.block_schedule must be {form}, got {schedule}")
    steps = [step for step, _ in schedule]
    if steps[0] != 0:
        raise AdaptError(f"diffusion.block_schedule must start at step 0, got {schedule}")
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise AdaptError(f"diffusion.block_schedule steps must be strictly increasing, got {steps}")
    if any(size < 1 for _, size in schedule):
        raise AdaptError(f"diffusion.block_schedule sizes must be >= 1, got {schedule}")
    if schedule[-1][1] != block_size:
        raise AdaptError(
            f"diffusion.block_schedule must end at diffusion.block_size ({block_size}), got {schedule[-1][1]}"
        )


@dataclass
class TrainingConfig:
    """The optimisation loop."""

    output_dir: str = "out/finetune"
    """Where checkpoints, logs and the exported model (OUTPUT_DIR/final) go."""
    max_steps: int | None = None
    """Optimizer steps to run; None: `epochs` passes over the training split."""
    epochs: int = 1
    """Passes over the training data when max_steps is None."""
    batch_size: int = 8
    """Sequences per micro-batch on each process."""
    grad_accumulation: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine and linear)."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; None disables clipping."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision through Accelerate; auto: bf16 where the device multiplies it natively (CUDA with
    bf16, a CPU with AVX512_BF16 or AMX), else no (fp32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    seed: int = 0
    """Seeds the model init of new rows, data order, masking and t."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at the end and on Ctrl-C)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    eval_every: int = 0
    """Evaluate the diffusion loss on the held-out split every N steps (0: only at the end)."""
    eval_batches: int | None = None
    """Limit evaluation to this many batches (None: the whole held-out split)."""
    resume: bool = True
    """Resume from the latest complete checkpoint in output_dir when there is one."""
    export: bool = True
    """Export a ready-to-sample checkpoint to OUTPUT_DIR/final at the end."""

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accumulation": self.grad_accumulation}
        positive["epochs"] = self.epochs
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        for name, value in positive.items():
            if value < 1:
                raise AdaptError(f"training.{name} must be >= 1, got {value}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                raise AdaptError(f"training.{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise AdaptError(f"training.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.lr <= 0:
            raise AdaptError(f"training.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise AdaptError(f"training.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise AdaptError(f"training.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise AdaptError(f"training.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")


@dataclass
class LoraSettings:
    """Low-rank adapters through peft; absent (null) in a recipe means full fine-tuning."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] | Literal["auto"] = "auto"
    """Module names to adapt; auto: every linear layer of the attention and MLP blocks."""
    train_mask_token: bool = True
    """Train the mask token's embedding row (peft trainable_token_indices) alongside the adapters."""
    export: Literal["merged", "adapter"] = "merged"
    """merged: merge_and_unload into a full checkpoint; adapter: save the peft adapter alone."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise AdaptError(f"lora.r and lora.alpha must be >= 1, got r={self.r} alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdaptError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise AdaptError("lora.target_modules must be 'auto' or a non-empty list of module names")


@dataclass
class LoggingConfig:
    """Where metrics go."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml"]] = field(
        default_factory=lambda: ["tensorboard"]
    )
    """Accelerate trackers to log to (tensorboard is installed with the test extras)."""
    jsonl: bool = True
    """Also append every logged metric to OUTPUT_DIR/metrics.jsonl."""
    log_every: int = 10
    """Log metrics every N optimizer steps."""
    progress_bar: bool = True
    """Show a progress bar with loss, tokens/s and ETA on the main process."""

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise AdaptError(f"logging.log_every must be >= 1, got {self.log_every}")


@dataclass
class Recipe:
    """A complete fine-tuning job."""

    model: ModelConfig
    """The model to fine-tune."""
    data: DataConfig
    """Training (and held-out) data."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """The masked-diffusion objective."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """The optimisation loop."""
    lora: LoraSettings | None = None
    """LoRA adapters; null for full fine-tuning."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress."""
    push_to_hub: str | None = None
    """Hub repo id to publish the exported checkpoint to (needs adapt.publishing.hub and a token)."""

    def __post_init__(self) -> None:
        length = self.data.max_length
        for size in self.diffusion.block_sizes():
            if size > length or length % size:
                valid = [b for b in range(1, length + 1) if length % b == 0]
                raise AdaptError(
                    f"block size {size} must divide data.max_length ({length}); valid block sizes: "
                    f"{', '.join(map(str, valid))}"
                )


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML, apply `a.b=value` overrides and build the typed `Recipe`."""
    p = Path(path)
    if not p.is_file():
        raise AdaptError(f"no such recipe file: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise AdaptError(f"{p} is not valid YAML: {first_line(e)}") from e
    if not isinstance(raw, dict):
        raise AdaptError(f"{p} must hold a mapping of sections, got {type(raw).__name__}")
    return recipe_from_dict(apply_overrides(raw, overrides))


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    return build(Recipe, raw, "")


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of `raw` with each `a.b.c=value` applied; value parsed as a YAML scalar (or list)."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise AdaptError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise AdaptError(f"cannot parse the value of override {item!r}: {e}") from e
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, checking keys and types recursively."""
    label = where or "the recipe"
    if not isinstance(data, dict):
        raise AdaptError(f"{label} must be a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields_ = [f for f in dataclasses.fields(cls) if f.init]
    valid = [f.name for f in fields_]
    for key in data:
        if key not in valid:
            raise AdaptError(
                f"unknown key {_join(where, str(key))!r}; valid keys in {label}: {', '.join(valid)}"
            )
    kwargs = {}
    for f in fields_:
        if f.name in data:
            kwargs[f.name] = convert_value(hints[f.name], data[f.name], _join(where, f.name), valid)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise AdaptError(
                f"missing required key {_join(where, f.name)!r}; valid keys in {label}: {', '.join(valid)}"
            )
    try:
        return cls(**kwargs)
    except AdaptError:
        raise
    except (TypeError, ValueError) as e:
        raise AdaptError(f"invalid {label}: {e}") from e


def convert_value(tp: Any, value: Any, where: str, siblings: list[str]) -> Any:
    """Check (and lightly coerce: int -> float) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise message
            return convert_value(options[0], value, where, siblings)
        for arg in options:
            with contextlib.suppress(AdaptError):
                return convert_value(arg, value, where, siblings)
        raise AdaptError(f"{where} must be {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false: mixed_precision=no
            return "no"
        if value not in args:
            raise AdaptError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise AdaptError(f"{where} must be a list, got {_describe(value)}")
        item = args[0] if args else Any
        return [convert_value(item, v, f"{where}[{i}]", siblings) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise AdaptError(f"{where} must be a mapping, got {_describe(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise AdaptError(f"{where} must be true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise AdaptError(f"{where} must be an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AdaptError(f"{where} must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise AdaptError(f"{where} must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise AdaptError(f"{where} must be a string, got {_describe(value)}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise AdaptError(f"{where} must be a path string, got {_describe(value)}")
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise AdaptError(f"{where} must be {tp.__name__}, got {_describe(value)}")
    return value


# ----------------------------------------------------------------------------- saving


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain YAML-safe values of a recipe (paths as strings)."""
    return _plain(dataclasses.asdict(recipe))


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin is list:
        return "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))
