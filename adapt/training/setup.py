"""`setup`: everything a recipe describes (model converted on the fly if needed, optional LoRA, data,
AdamW, warmup + decay schedule, the distributed engine), resumed from the latest complete checkpoint;
and the checks that run before any work.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from adapt.core.checkpoint import DiffusionSettings
from adapt.core.lock import abandoned_on_error
from adapt.training import placement
from adapt.training.checkpoints import resume
from adapt.training.config import Recipe
from adapt.training.lora import check_adapter_export
from adapt.training.metrics import flat_config
from adapt.training.model import check_attention, check_batch, check_context, choose_kernel
from adapt.training.objectives import make_objective
from adapt.training.objectives.loss import TokenLoss, causal_lm_of
from adapt.training.objectives.teacher import teacher_dtype
from adapt.training.optim import build_optimizer, build_scheduler
from adapt.training.outdir import ENGINE_FILE, claim_output
from adapt.training.session import Session

log = logging.getLogger(__name__)


def setup(recipe: Recipe, force: bool = False) -> Session:
    """Accelerator, model, data, optimizer and schedule for `recipe`; resumes when a checkpoint exists.

    The output folder stays locked for the session (`Session.lock`, released by `run`); `force` moves an
    earlier run in it aside.
    """
    lock = claim_output(recipe, force)
    with abandoned_on_error(lock):
        session = _setup(recipe)
    session.lock = lock
    return session


def _setup(recipe: Recipe) -> Session:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from adapt.conversion.verify import ordinary_token_ids
    from adapt.training import engine

    t = recipe.training
    request, device = engine.requested(), launch_device()
    engine.check_request(request, device)
    precision, why = engine.resolve_precision(t.mixed_precision, request, device)
    # The precision is fixed per process by Accelerate's shared state: let a later run in the same
    # process (a notebook, a sweep) choose its own. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    with engine.accelerate_refusals():
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
    check_attention(recipe, accelerator.device)
    engine_label = engine.engine_name(accelerator)
    load = placement.choose(accelerator, recipe.model, engine_label)
    if accelerator.is_main_process:
        log.info(load.line())
    rank, ranks = accelerator.process_index, accelerator.num_processes
    share = load.host_share(rank, ranks)
    teacher_share = placement.teacher_load(accelerator, engine_label).host_share(rank, ranks)
    with placement.whole_weights():  # a meta-device model under zero.Init would run its collectives
        check_batch(recipe, accelerator.device, share, teacher_share)  # before any weights are read
    set_seed(t.seed)
    rss_before = placement.peak_rss()
    with placement.reading(load):  # whole: until Accelerate prepares it; the engine then shards it
        model, tokenizer, settings = placement.read(load, recipe.model, accelerator.is_main_process)
        loaded = placement.held(model, rss_before)
        check_context(model.config, recipe)
        probe_ids = ordinary_token_ids(model, tokenizer)
        if recipe.lora is not None:
            check_adapter_export(recipe)
            model = placement.apply_lora(load, model, recipe.lora, settings.mask_token_id)
        if t.gradient_checkpointing:
            causal_lm_of(model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        placement.match_rank0(load, model, accelerator.device)
        fast = placement.fast_path_before(load, model, probe_ids, accelerator.is_main_process)
    teacher = read = None
    if recipe.diffusion.ar_teacher is not None:
        dtype = teacher_dtype(accelerator.mixed_precision, model)
        path, student = recipe.diffusion.ar_teacher, causal_lm_of(model)
        read = placement.read_teacher(accelerator, engine_label, path, tokenizer, student, dtype, probe_ids)
        teacher = read[0]
    objective = make_objective(recipe.diffusion, settings, teacher)
    choose_kernel(model, recipe)
    warn_objective_change(settings, recipe)
    loss_module = TokenLoss(model, fast=fast).train()
    if accelerator.distributed_type.name == "FSDP":
        engine.prepare_fsdp(accelerator, loss_module)
    train_loader, eval_loader = build_loaders(recipe, tokenizer)
    optimizer = build_optimizer(loss_module, recipe)
    per_epoch = max(1, len(train_loader) // accelerator.num_processes // t.grad_accumulation)
    total = t.max_steps or per_epoch * t.epochs
    scheduler = build_scheduler(optimizer, recipe, total)
    loss_module, optimizer, train_loader, scheduler = accelerator.prepare(
        loss_module, optimizer, train_loader, scheduler
    )
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    placement.fast_path_after(load, accelerator, loss_module, probe_ids)
    facts = {**engine.describe(accelerator, loss_module, why), "load": placement.facts(load, loaded)}
    if read is not None:
        facts["teacher"] = placement.shard_teacher(accelerator, engine_label, read, probe_ids)
    facts["fast_path"] = accelerator.unwrap_model(loss_module).fast
    facts["attention"] = causal_lm_of(model).config._attn_implementation  # adapt_pair_sdpa: the tiled kernel
    session = Session(
        recipe,
        accelerator,
        loss_module,
        tokenizer,
        objective.record(settings),
        objective,
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


def build_loaders(recipe: Recipe, tokenizer: Any) -> tuple[Any, Any | None]:
    """Training and held-out DataLoaders from `adapt.training.data` (held-out is None without an eval
    split)."""
    from adapt.training.data import build_dataloaders

    train, held_out, _ = build_dataloaders(recipe.data, tokenizer, batch_size=recipe.training.batch_size)
    return train, held_out
