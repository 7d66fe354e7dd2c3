"""Diffusion fine-tuning as free functions over Accelerate: `setup`, `fit`, `evaluate`, `run`.

`setup` builds everything a recipe describes (model converted on the fly if needed, optional LoRA,
data, AdamW, warmup + decay schedule) and resumes from the latest complete checkpoint. `fit` is the
step loop; each step masks every micro-batch with a generator seeded by (seed, step, micro-batch,
rank), so a resumed run sees exactly the masks, t and annealing patterns of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapt.core.boundary import check_writable
from adapt.core.checkpoint import DiffusionSettings, checked_settings
from adapt.core.errors import AdaptError
from adapt.core.outputs import atomic_dir, check_apart, check_replaceable
from adapt.training.config import ModelConfig, Recipe, recipe_to_dict, save_recipe
from adapt.training.engine import whole_weights
from adapt.training.lora import apply_lora, check_adapter_export
from adapt.training.objectives import Objective, make_objective
from adapt.training.objectives.loss import TokenLoss, causal_lm_of, check_fast_path

log = logging.getLogger(__name__)


CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
METRICS = "metrics.jsonl"
ENGINE_FILE = "engine.json"


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
    objective: Any
    """The prepared `TokenLoss` around the model (wrapped for DDP/FSDP when distributed)."""
    tokenizer: Any
    settings: DiffusionSettings
    """What the export records (the objective's settings applied)."""
    noiser: Objective
    """The training objective: turns clean batches into `TokenLoss` inputs."""
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any | None
    total_steps: int
    state: TrainState = field(default_factory=TrainState)
    probe_ids: list[int] = field(default_factory=list)
    """Ordinary token ids (for the final probe-batch check)."""

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.training.output_dir)

    @property
    def model(self) -> nn.Module:
        """The trained (HF or peft) model, unwrapped."""
        return self.accelerator.unwrap_model(self.objective).model


# ----------------------------------------------------------------------------- setup


def setup(recipe: Recipe) -> Session:
    """Accelerator, model, data, optimizer and schedule for `recipe`; resumes when a checkpoint exists."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from adapt.conversion.verify import ordinary_token_ids
    from adapt.training import engine

    t = recipe.training
    check_outputs(recipe)
    request, device = engine.requested(), launch_device()
    engine.check_request(request, device)
    precision, why = engine.resolve_precision(t.mixed_precision, request, device)
    # The precision is fixed per process by Accelerate's shared state: let a later run in the same
    # process (a notebook, a sweep) choose its own. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=precision,
        log_with=list(recipe.logging.report_to) or None,
        project_dir=t.output_dir,
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.seed),
    )
    engine.settle(request, accelerator, why)
    if accelerator.distributed_type.name == "DEEPSPEED":
        engine.prepare_deepspeed(accelerator, t.max_grad_norm)
    set_seed(t.seed)
    with whole_weights():  # until Accelerate prepares it; the engine then shards it
        model, tokenizer, settings = load_model(recipe.model)
        check_context(model.config, recipe)
        probe_ids = ordinary_token_ids(model, tokenizer)
        if recipe.lora is not None:
            check_adapter_export(recipe)
            model = apply_lora(model, recipe.lora, settings.mask_token_id)
        if t.gradient_checkpointing:
            causal_lm_of(model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        fast = check_fast_path(model, probe_ids)
    noiser = make_objective(recipe.diffusion, settings)
    warn_objective_change(settings, recipe)
    objective = TokenLoss(model, fast=fast).train()
    if accelerator.distributed_type.name == "FSDP":
        engine.prepare_fsdp(accelerator, objective)
    train_loader, eval_loader = build_loaders(recipe, tokenizer)
    optimizer = build_optimizer(objective, recipe)
    per_epoch = max(1, len(train_loader) // accelerator.num_processes // t.grad_accumulation)
    total = t.max_steps or per_epoch * t.epochs
    scheduler = build_scheduler(optimizer, recipe, total)
    objective, optimizer, train_loader, scheduler = accelerator.prepare(
        objective, optimizer, train_loader, scheduler
    )
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    facts = engine.describe(accelerator, objective, why)
    session = Session(
        recipe,
        accelerator,
        objective,
        tokenizer,
        noiser.record(settings),
        noiser,
        optimizer,
        scheduler,
        train_loader,
        eval_loader,
        total,
        probe_ids=probe_ids,
    )
    if recipe.logging.report_to:
        accelerator.init_trackers("adapt", config=flat_config(recipe))
    if t.resume:
        resume(session)
    if accelerator.is_main_process:  # once the run is sure to start
        session.output_dir.mkdir(parents=True, exist_ok=True)
        (session.output_dir / ENGINE_FILE).write_text(json.dumps(facts, indent=1))
    return session


def check_outputs(recipe: Recipe) -> None:
    """Before any work: every path the run writes is writable and apart from the model and data it reads,
    an existing export is one adapt wrote (it will be replaced), existing checkpoints are this run's."""
    from adapt.training.export import FINAL

    out = Path(recipe.training.output_dir)
    for written in (out / FINAL, out / CHECKPOINTS, out / METRICS):
        for option, source in (("model.path", recipe.model.path), ("data.path", recipe.data.path)):
            if source:
                check_apart(written, source, f"the run writes {written}, which", option)
    check_writable(out, "training.output_dir")
    final = out / FINAL
    if final.is_dir() and any(final.iterdir()):
        check_replaceable(final)
    latest = latest_checkpoint(out)
    if recipe.training.resume and latest is not None:
        check_same_run(recipe, latest)


def resume(session: Session) -> None:
    """Load the newest checkpoint that loads, saying which ones did not (`check_outputs` refused another
    run's checkpoints before any work)."""
    candidates = checkpoint_dirs(session.output_dir)
    if not candidates:
        return
    for path in reversed(candidates):
        try:
            load_checkpoint(session, path)
        except Exception as e:
            log.warning("checkpoint %s cannot be loaded (%s); trying an older one", path, explain_load(e))
            continue
        if path != candidates[-1]:
            log.warning("resumed from %s, the newest checkpoint that loads", path)
        convert_position(session.state, session.accelerator.num_processes, path)
        if session.accelerator.is_main_process:  # its writer; ranks trimming at once raced on the tmp file
            drop_replayed_metrics(session.output_dir, session.state.step)
        return
    raise AdaptError(
        f"no checkpoint in {session.output_dir / CHECKPOINTS} can be loaded (see above); move them away "
        "or set training.resume=false to start over"
    )


def load_checkpoint(session: Session, path: Path) -> None:
    state = TrainState(**json.loads((path / STATE_FILE).read_text()))
    session.accelerator.load_state(str(path))
    session.state = state
    session.state.interrupted, session.state.stopped_by = False, None
    session.state.checkpoint = str(path)


def convert_position(state: TrainState, processes: int, path: Path) -> None:
    """Carry the data position over to another number of processes: process i of n reads micro-batches
    i, i+n, ... of one shuffled order, so k batches on each of n processes are the first k*n of that order.
    Refused when they do not split evenly (some sample would be seen twice or skipped)."""
    saved = state.processes or processes
    consumed = state.batches_in_epoch * saved
    if consumed % processes:
        raise AdaptError(
            f"{path} was written by {saved} process{'es' if saved > 1 else ''} after {consumed} "
            f"micro-batches of epoch {state.epoch}, which do not split over {processes} processes; resume "
            f"with {saved} (or a number of processes that divides {consumed})"
        )
    if saved != processes:
        per = consumed // processes
        log.info("data position: %d micro-batches over %d processes -> %d per process", consumed, saved, per)
    state.batches_in_epoch, state.processes = consumed // processes, processes


def explain_load(e: BaseException) -> str:
    from adapt.core.boundary import explain
    from adapt.core.errors import first_line

    return explain(e) or f"{type(e).__name__}: {first_line(e)}"


def check_same_run(recipe: Recipe, checkpoint: Path) -> None:
    """The checkpoint's recorded model and adapters must be this recipe's (else resuming mixes two runs)."""
    from adapt.training.config import load_recipe

    try:
        saved = recipe_to_dict(load_recipe(checkpoint / "recipe.yaml"))
    except AdaptError:
        return  # unreadable recipe: the weights' own checks decide when loading
    now = recipe_to_dict(recipe)
    for section in ("model", "lora"):
        a, b = saved.get(section), now.get(section)
        if section == "model" and a and b:
            a, b = {**a, "path": same_path(a["path"])}, {**b, "path": same_path(b["path"])}
        if a != b:
            raise AdaptError(
                f"training.output_dir {recipe.training.output_dir} holds checkpoints of another run "
                f"({section}: {saved.get(section)} there, {now.get(section)} now); choose another "
                "training.output_dir, or set training.resume=false to start over"
            )


def same_path(path: str) -> str:
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def drop_replayed_metrics(output_dir: Path, step: int) -> None:
    """Remove metrics logged after `step` (they will be logged again by the resumed run)."""
    f = output_dir / METRICS
    if not f.is_file():
        return
    lines = f.read_text().splitlines(keepends=True)
    kept = [line for line in lines if logged_step(line) <= step]
    if len(kept) != len(lines):
        tmp = f.with_name(f".{f.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, f)


def logged_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError):
        return 0


def load_model(cfg: ModelConfig) -> tuple[Any, Any, DiffusionSettings]:
    """A diffusion model to train: a converted checkpoint, or an AR model converted now (in memory)."""
    from adapt.conversion.convert import (
        ConvertOptions,
        check_supported,
        convert_model,
        load_config,
        load_model_and_tokenizer,
    )

    config = load_config(cfg.path, cfg.revision)
    settings = checked_settings(config, cfg.path)
    shift = settings.shift if settings is not None and cfg.shift is None else cfg.shift
    options = ConvertOptions(
        dtype=cfg.dtype,
        attn_implementation=cfg.attn_implementation,
        mask_init=cfg.mask_init,
        shift=True if shift is None else shift,
        revision=cfg.revision,
    )
    if settings is None:
        check_supported(config)
    model, tokenizer = load_model_and_tokenizer(cfg.path, options)
    if settings is None:
        settings, _, _ = convert_model(model, tokenizer, options, source=cfg.path)
    elif cfg.shift is not None and cfg.shift != settings.shift:
        raise AdaptError(
            f"model.shift={cfg.shift} contradicts the checkpoint's recorded shift={settings.shift}; "
            "remove model.shift (it only applies when converting an AR model)"
        )
    return model.train(), tokenizer, settings


def check_context(config: Any, recipe: Recipe) -> None:
    """data.max_length must fit the model's positions (checked before the data is prepared)."""
    from adapt.sampling.engine import context_length

    limit = context_length(config)
    if limit is not None and recipe.data.max_length > limit:
        raise AdaptError(
            f"data.max_length={recipe.data.max_length} is longer than the context of {recipe.model.path} "
            f"({limit} tokens); lower data.max_length"
        )


def build_loaders(recipe: Recipe, tokenizer: Any) -> tuple[Any, Any | None]:
    """Training and held-out DataLoaders from `adapt.training.data` (held-out is None without an eval
    split)."""
    from adapt.training.data import build_dataloaders

    train, held_out, _ = build_dataloaders(recipe.data, tokenizer, batch_size=recipe.training.batch_size)
    return train, held_out


def build_optimizer(objective: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases, norms and embeddings rows of 1D."""
    t = recipe.training
    decay, no_decay = [], []
    for p in objective.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise AdaptError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=tuple(t.betas))


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then cosine/linear decay to min_ratio."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total: int) -> Any:
    t = recipe.training
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, total, t.schedule, t.min_lr_ratio)
    )


# ----------------------------------------------------------------------------- the step


def make_inputs(
    session: Session, batch: dict[str, torch.Tensor], step: int | None, generator: torch.Generator
) -> dict:
    """Noise a clean batch into the loss's inputs with the session's objective (step None: final setting)."""
    return session.noiser.inputs(batch, step, generator, mask_dtype(session))


def warn_objective_change(settings: DiffusionSettings, recipe: Recipe) -> None:
    """Say so when the recipe trains a block checkpoint with another objective, block size or clean
    attention."""
    wanted, clean = recipe.diffusion.block_size, recipe.diffusion.clean_attention
    if settings.block_size is not None and settings.block_size != wanted:
        now = f"block size {wanted}" if wanted else "the full-attention objective"
        log.warning(
            "the model is a block-diffusion checkpoint (block size %d); training it with %s, and the export "
            "records that (set diffusion.block_size=%d to keep its blocks)",
            settings.block_size,
            now,
            settings.block_size,
        )
    if settings.block_size is not None and wanted and settings.clean_attention != clean:
        log.warning(
            "the model's clean tokens attend %s (diffusion.clean_attention); training it with %s, and the "
            "export records that",
            settings.clean_attention,
            clean,
        )


def launch_device() -> str:
    """The device type Accelerate will train on, read before it starts (creating its state early would
    fix the process group and the precision): cpu when forced or without CUDA, else cuda."""
    from accelerate.utils import str_to_bool

    forced = str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false")) == 1
    return "cpu" if forced or not torch.cuda.is_available() else "cuda"


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
        sync = contextlib.nullcontext() if last else acc.no_sync(session.objective)
        with sync:
            loss, _, _ = session.objective(**inputs)
            acc.backward(loss / ga)
        total += loss.detach() / ga
        tokens += int(batch["attention_mask"].sum())
        for name, value in session.noiser.step_metrics(step, batch, inputs).items():
            metrics[name] = metrics.get(name, 0.0) + value / ga
    return total, tokens, metrics


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


# ----------------------------------------------------------------------------- the loop


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


def clip_gradients(session: Session) -> float | None:
    """Clip to training.max_grad_norm (when set) and return the gradient norm before clipping.

    None under fp16 (the grad scaler skips non-finite steps itself) and where Accelerate gives no norm.
    """
    acc, limit = session.accelerator, session.recipe.training.max_grad_norm
    norm = acc.clip_grad_norm_(session.objective.parameters(), limit if limit is not None else math.inf)
    if norm is None or acc.mixed_precision == "fp16":
        return None
    return float(norm)


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
    session.objective.eval()
    loss, _, _ = session.objective(**inputs)
    session.objective.train()
    check_finite(session, "the loss of the trained model on a probe batch", float(loss), session.state.step)


def log_evaluation(session: Session) -> None:
    """Evaluate on the held-out split and log loss and masked-token accuracy (a non-finite loss stops)."""
    loss = evaluate(session)
    check_finite(session, "evaluation loss", loss, session.state.step)
    if loss is not None:
        log_metrics(session, {"eval_loss": loss, "eval_accuracy": session.state.eval_accuracy})


@torch.no_grad()
def check_ranks_agree(session: Session) -> None:
    """With several processes, every rank must hold the same weights; logged and enforced."""
    acc = session.accelerator
    if acc.num_processes == 1 or acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
        return  # sharded parameters differ by design
    total = torch.zeros((), dtype=torch.float64, device=acc.device)
    for i, p in enumerate(session.objective.parameters()):
        total += p.detach().double().sum() * (1 + (i % 7))
    sums = acc.gather(total[None]).tolist()
    log_metrics(session, {"rank_weight_checksums": sums})
    if any(s != sums[0] for s in sums):
        raise AdaptError(f"processes ended with different weights (checksums {sums}); training diverged")


def reduce_step(acc: Any, loss: torch.Tensor, tokens: int) -> tuple[float, int]:
    """Mean loss and summed tokens over processes (one all-reduce)."""
    both = torch.stack([loss.float(), torch.tensor(float(tokens), device=loss.device)])
    if acc.num_processes > 1:
        both = acc.reduce(both, reduction="sum")
        both[0] /= acc.num_processes
    return float(both[0]), int(both[1])


class Window:
    """Running averages between two log lines."""

    def __init__(self) -> None:
        self.start, self.losses, self.tokens = time.perf_counter(), [], 0
        self.metrics: dict[str, list[float]] = {}

    def add(self, loss: float, tokens: int, metrics: dict[str, float]) -> None:
        self.losses.append(loss)
        for name, value in metrics.items():
            self.metrics.setdefault(name, []).append(value)
        self.tokens += tokens

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def flush(self, session: Session) -> dict[str, float]:
        state = session.state
        state.train_loss = sum(self.losses) / max(1, len(self.losses))
        metrics = {
            "loss": state.train_loss,
            "lr": session.scheduler.get_last_lr()[0],
            "tokens_per_s": self.rate(),
            "tokens_seen": state.tokens_seen,
            "epoch": state.epoch,
        }
        metrics.update({name: sum(v) / len(v) for name, v in self.metrics.items()})
        self.__init__()
        return metrics


@torch.no_grad()
def evaluate(session: Session) -> float | None:
    """Mean diffusion loss on the held-out split at the objective's final setting, with a fixed masking seed.

    Also sets `state.eval_accuracy`: the share of masked tokens whose argmax is right (t ~ U(eps, 1)).
    """
    if session.eval_loader is None:
        return None
    acc, objective = session.accelerator, session.objective
    objective.eval()
    limit = session.recipe.training.eval_batches
    total = torch.zeros(4, device=acc.device)  # loss * rows, rows, correct, masked
    for i, batch in enumerate(session.eval_loader):
        if limit is not None and i >= limit:
            break
        gen = step_generator(session, -1, i, acc.device)
        inputs = make_inputs(session, batch, None, gen)
        loss, _, correct = objective(**inputs)
        size = float(batch["input_ids"].shape[0])
        counts = [loss.float() * size, size, correct.sum().float(), float(correct.numel())]
        total += torch.stack([torch.as_tensor(c, device=acc.device, dtype=torch.float32) for c in counts])
    objective.train()
    total = acc.reduce(total, reduction="sum") if acc.num_processes > 1 else total
    session.state.eval_loss = float(total[0] / total[1].clamp(min=1))
    session.state.eval_accuracy = float(total[2] / total[3].clamp(min=1))
    return session.state.eval_loss


# ----------------------------------------------------------------------------- checkpoints and logs


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints (atomically renamed into place), oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(session: Session) -> Path:
    """Model, optimizer, scheduler, RNG and data position, written atomically by every process."""
    from accelerate.utils import broadcast_object_list

    acc, state = session.accelerator, session.state
    path = session.output_dir / CHECKPOINTS / f"step-{state.step:08d}"
    state.checkpoint, state.processes = str(path), acc.num_processes
    with atomic_dir(path) if acc.is_main_process else contextlib.nullcontext() as tmp:
        where = broadcast_object_list([str(tmp) if tmp is not None else None])[0]
        acc.save_state(where)
        if acc.is_main_process:
            (Path(where) / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
            save_recipe(session.recipe, Path(where) / "recipe.yaml")
        acc.wait_for_everyone()
    acc.wait_for_everyone()
    if acc.is_main_process:
        for old in checkpoint_dirs(session.output_dir)[: -session.recipe.training.keep_checkpoints]:
            import shutil

            shutil.rmtree(old, ignore_errors=True)
    return path


def log_metrics(session: Session, metrics: dict[str, Any]) -> None:
    """To the Accelerate trackers and (main process) a JSONL file."""
    metrics = {k: v for k, v in metrics.items() if v is not None}
    if not metrics:
        return
    acc, step = session.accelerator, session.state.step
    if session.recipe.logging.report_to:
        acc.log(metrics, step=step)
    if session.recipe.logging.jsonl and acc.is_main_process:
        session.output_dir.mkdir(parents=True, exist_ok=True)
        with (session.output_dir / METRICS).open("a") as f:
            f.write(json.dumps({"step": step, **metrics}, allow_nan=False) + "\n")


def progress_bar(session: Session) -> Any:
    from tqdm.auto import tqdm

    show = session.recipe.logging.progress_bar and session.accelerator.is_main_process
    return tqdm(total=session.total_steps, initial=session.state.step, disable=not show, unit="step")


def flat_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe flattened to scalar values, as trackers want their hyperparameters."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            out[prefix] = value
        else:
            out[prefix] = str(value)

    walk("", recipe_to_dict(recipe))
    return out


class InterruptFlag:
    """Turn SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop, `kill`) into a flag checked once per step;
    every process agrees before stopping."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> InterruptFlag:
        self.received, self.previous = 0, {}
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for number in self.SIGNALS:
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        # not "a second signal stops at once": a terminal's Ctrl-C or SLURM signals every process and
        # torchrun forwards its own copy, so each rank receives two
        self.received = max(self.received, signum)  # SIGTERM (15) outranks SIGINT (2)

    def requested(self, acc: Any) -> str | None:
        """The name of the signal any process received, or None."""
        received = self.received
        if acc.num_processes > 1:
            flag = torch.tensor([float(received)], device=acc.device)
            received = int(acc.reduce(flag, reduction="max").item())
        return signal.Signals(received).name if received else None

    def __exit__(self, *exc: Any) -> None:
        for number, previous in self.previous.items():
            if previous is not None:  # None: a handler installed outside Python, which stays
                signal.signal(number, previous)


# ----------------------------------------------------------------------------- the whole job


def run(recipe: Recipe) -> tuple[TrainState, Path | None]:
    """setup -> fit -> export (-> push); returns the final state and the exported directory."""
    from adapt.training.export import export, push_if_requested

    session = setup(recipe)
    try:
        state = fit(session)
        exported = None
        if not state.interrupted and recipe.training.export:
            check_probe_loss(session)
            exported = export(session)
            push_if_requested(session, exported)
        return state, exported
    finally:
        session.accelerator.end_training()
