"""Which distributed engine runs, checked against what the launch asked for.

`accelerate launch` passes its configuration to each process as environment variables
(ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED, WORLD_SIZE, ACCELERATE_MIXED_PRECISION, ...). Accelerate
itself quietly gives something else when it cannot honour them: FSDP and DeepSpeed become plain DDP
on CPU, and a launch without a usable device becomes one independent process per rank. `requested`
reads what the launch asked for, `check_launch` refuses a run that would not get it, and `start_line`
says what actually runs.

On CPU (gloo) Accelerate does not set FSDP up at all; `enable_cpu_fsdp2` switches the prepared state to
FSDP2 so that Accelerate's own `fully_shard` wrapping, sharded checkpoints and state-dict gathering run
there too (torch's `fully_shard` accepts a CPU device mesh).

Mixed precision rule: the recipe's `training.mixed_precision: auto` takes the launcher's value
(`--mixed_precision` or the config file's `mixed_precision`, which `accelerate launch` always sets, to
"no" when neither gives one); outside a launcher auto means bf16 where the hardware has it. An explicit
recipe value (no, bf16, fp16) wins over the launcher's and the start line says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapt.core.errors import AdaptError

log = logging.getLogger(__name__)

CPU_FIX = "on a machine without CUDA GPUs prefix the launch with ACCELERATE_USE_CPU=1 (gloo)"
CPU_FLAG_FIX = (
    "`accelerate launch --cpu` starts one process: use ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
    "--num_processes N"
)


ENGINES = ("single", "DDP", "FSDP", "DeepSpeed")
MODEL_PARALLEL = {"TP": "tensor parallelism", "CP": "context parallelism", "SP": "sequence parallelism"}


@dataclass(frozen=True)
class Request:
    """What the launch asked for, read from the environment before Accelerate starts."""

    engine: str
    """single, DDP, FSDP or DeepSpeed (anything else is refused)."""
    processes: int
    """World size asked for."""
    mixed_precision: str | None
    """The launcher's mixed precision (None outside `accelerate launch`)."""
    fsdp_version: int = 2
    zero_stage: int | None = None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise AdaptError(f"the launch sets {name}={value!r}, which is not a whole number")
    return int(value)


def requested() -> Request:
    """The launch's request: engine from ACCELERATE_USE_FSDP/DEEPSPEED, processes from WORLD_SIZE (or the
    parent `accelerate launch --cpu --num_processes N` command, which starts one process only)."""
    processes = env_int("WORLD_SIZE", 0) or cpu_launch_processes() or 1
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION") or None
    if env_flag("ACCELERATE_USE_MEGATRON_LM"):
        return Request("Megatron-LM", processes, precision)
    split = [n for n in MODEL_PARALLEL if env_int(f"PARALLELISM_CONFIG_{n}_SIZE", 1) > 1]
    if env_flag("ACCELERATE_USE_PARALLELISM_CONFIG") and split:
        return Request(" and ".join(MODEL_PARALLEL[n] for n in split), processes, precision)
    if env_flag("ACCELERATE_USE_DEEPSPEED"):
        stage = env_int("ACCELERATE_DEEPSPEED_ZERO_STAGE", None)
        return Request("DeepSpeed", processes, precision, zero_stage=stage)
    if env_flag("ACCELERATE_USE_FSDP"):
        return Request("FSDP", processes, precision, fsdp_version=env_int("FSDP_VERSION", 1))
    return Request("DDP" if processes > 1 else "single", processes, precision)


def check_request(request: Request, device: str) -> None:
    """Refuse, before Accelerate starts, what cannot run at all: an engine adapt does not train with, an
    unknown FSDP version or ZeRO stage, DeepSpeed on CPU or not installed."""
    if request.engine not in ENGINES:
        raise AdaptError(
            f"the launch asks for {request.engine}, which adapt does not train with; "
            "use DDP, FSDP2 or DeepSpeed ZeRO (recipes/accelerate/ddp.yaml, fsdp.yaml, deepspeed.yaml)"
        )
    if request.engine == "FSDP" and request.fsdp_version not in (1, 2):
        raise AdaptError(f"FSDP version {request.fsdp_version} does not exist; set fsdp_version: 2")
    if request.engine == "FSDP" and request.fsdp_version == 1 and device == "cpu":
        # (before Accelerate: its FSDP1 settings check refuses the shipped fsdp.yaml's options on CPU)
        raise AdaptError(
            "the launch asks for FSDP version 1 on CPU; adapt runs only FSDP2 there: set fsdp_version: 2 in "
            "the Accelerate config (--fsdp_version 2)"
        )
    if request.engine != "DeepSpeed":
        return
    if request.zero_stage not in (None, *ZERO_STAGES):
        raise AdaptError(
            f"DeepSpeed ZeRO stage {request.zero_stage} does not exist (the launcher's zero_stage); use "
            "0, 1, 2 or 3"
        )
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    check_deepspeed_config_file(config_file, request.zero_stage)
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise AdaptError("the launch asks for DeepSpeed, which is not installed: pip install deepspeed")
    from adapt.training.extensions import check_build_locks

    check_build_locks()


ZERO_STAGES = (0, 1, 2, 3)  # 0: DeepSpeed's data parallel without partitioning


def check_deepspeed_config_file(name: str, launcher_stage: int | None) -> None:
    """A DeepSpeed config file named by the launch (`deepspeed_config_file`) must hold a JSON object whose
    `zero_optimization.stage` is a ZeRO stage or "auto" (the launcher's), and agrees with the launcher's
    zero_stage when both give one (Accelerate would silently run the file's)."""
    if name == "none":
        return
    import json

    try:
        config = json.loads(Path(name).read_text())
    except OSError as e:
        raise AdaptError(f"the launch's DeepSpeed config file {name} cannot be read ({e.strerror})") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise AdaptError(f"the launch's DeepSpeed config file {name} is not JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdaptError(f"the launch's DeepSpeed config file {name} holds no JSON object")
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or "stage" not in zero:
        raise AdaptError(
            f"the launch's DeepSpeed config file {name} sets no zero_optimization.stage (DeepSpeed would run "
            'stage 0 while Accelerate reports another); set it to 0, 1, 2, 3 or "auto"'
        )
    stage = zero["stage"]
    if stage != "auto" and (isinstance(stage, bool) or stage not in ZERO_STAGES):
        raise AdaptError(
            f"the launch's DeepSpeed config file {name} sets zero_optimization.stage {json.dumps(stage)}, "
            'which is not a ZeRO stage adapt runs; use 0, 1, 2, 3 or "auto"'
        )
    if stage != "auto" and launcher_stage is not None and stage != launcher_stage:
        raise AdaptError(
            f"the launch's DeepSpeed config file {name} sets zero_optimization.stage {stage} but the "
            f"launcher's zero_stage is {launcher_stage} (DeepSpeed would run {stage}); give one stage: "
            'drop --zero_stage, or set the file\'s stage to "auto"'
        )


def cpu_launch_processes() -> int:
    """N of a parent `accelerate launch --cpu --num_processes N` (Linux /proc; 0 when unknown)."""
    cmdline = Path(f"/proc/{os.getppid()}/cmdline")
    try:
        args = cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return 0
    if "accelerate" not in " ".join(args) or "launch" not in " ".join(args) or "--cpu" not in args:
        return 0
    for flag in ("--num_processes", "--num-processes"):
        if flag in args[:-1]:
            value = args[args.index(flag) + 1]
            return int(value) if value.isdigit() else 0
    return 0


def resolve_precision(recipe_choice: str, request: Request, device: str) -> tuple[str, str]:
    """(no|bf16|fp16, why) by the module's rule: recipe auto defers to the launcher, explicit wins."""
    from adapt.loading.precision import resolve_mixed_precision

    launcher = request.mixed_precision
    if launcher is not None and launcher not in ("no", "bf16", "fp16"):
        raise AdaptError(
            f"the launcher's mixed precision {launcher!r} is not one adapt trains with (no, bf16, fp16)"
        )
    if recipe_choice == "auto" and launcher is not None:
        return launcher, "launcher's"
    precision, why = resolve_mixed_precision(recipe_choice, device)
    if launcher is not None and launcher != precision:
        return precision, f"recipe overrides launcher's {launcher}"
    return precision, "recipe" if why == "requested" else why


def check_launch(request: Request, accelerator: Any) -> None:
    """Refuse a run that is not what the launch asked for (before any work, on every rank)."""
    got, kind = accelerator.num_processes, accelerator.distributed_type.name
    if got < request.processes:
        fix = CPU_FIX if os.environ.get("WORLD_SIZE") else CPU_FLAG_FIX
        raise AdaptError(
            f"the launch asks for {request.processes} processes but only {got} would train together "
            f"(Accelerate set up {kind}); {fix}"
        )
    if request.engine == "DeepSpeed" and kind not in ("DEEPSPEED", "MULTI_CPU"):
        raise AdaptError(
            f"the launch asks for DeepSpeed but it would run as {engine_name(accelerator)} ({got} process); "
            f"on CPU adapt runs DeepSpeed over gloo with 2 or more processes: {CPU_FIX} and --num_processes 2"
        )
    if request.engine == "FSDP" and kind not in ("FSDP", "MULTI_CPU"):
        raise AdaptError(
            f"the launch asks for FSDP but it would run as {engine_name(accelerator)} ({got} process); "
            f"{CPU_FIX} (FSDP2 then shards over --num_processes, one or more)"
        )


@contextlib.contextmanager
def accelerate_refusals() -> Iterator[None]:
    """Accelerate's own refusal of the launch's settings, raised while it builds its state and its FSDP or
    DeepSpeed plugin (an option that engine does not take, a deepspeed_config_file beside the fields it
    replaces), as one line instead of a traceback."""
    import traceback

    from adapt.core.boundary import one_line

    try:
        yield
    except (ValueError, RuntimeError, NotImplementedError) as e:
        frames = traceback.extract_tb(e.__traceback__)
        if not frames or f"{os.sep}accelerate{os.sep}" not in frames[-1].filename:
            raise
        raise AdaptError(f"Accelerate refuses the launch's settings: {one_line(str(e))}") from e


def settle(request: Request, accelerator: Any, precision_why: str) -> None:
    """Check the launch, set FSDP2 up on CPU when it was asked for, and print the start line (rank 0)."""
    check_launch(request, accelerator)
    if request.engine == "FSDP" and accelerator.distributed_type.name == "MULTI_CPU":
        enable_cpu_fsdp2(accelerator)
    if request.engine == "DeepSpeed" and accelerator.distributed_type.name == "MULTI_CPU":
        enable_cpu_deepspeed(accelerator)
    if accelerator.is_main_process:
        log.info(start_line(accelerator, precision_why))


def enable_cpu_fsdp2(accelerator: Any) -> None:
    """Turn a CPU (gloo) Accelerate state into FSDP2 with the launch's FSDP settings.

    Accelerate only selects FSDP on GPU-like devices; its FSDP2 code paths (fully_shard per decoder layer,
    sharded save/load_state, get_state_dict) run on CPU once the state says FSDP; the launch's
    fsdp_cpu_ram_efficient_loading (rank 0 reads, the others start on the meta device) is kept.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)  # reads the launch's FSDP_* settings
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # AcceleratorState re-copies the process state's fields whenever it is constructed: set both
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    if not accelerator.is_fsdp2:
        raise AdaptError("could not set FSDP2 up on CPU with this version of accelerate")


def enable_cpu_deepspeed(accelerator: Any) -> None:
    """Turn a CPU (gloo) Accelerate state into DeepSpeed with the launch's DeepSpeed settings.

    Accelerate only selects DeepSpeed on GPU-like devices; DeepSpeed itself runs ZeRO on its CPU
    accelerator over the gloo group already set up, and from there Accelerate's own `deepspeed.initialize`,
    checkpointing and state-dict gathering run unchanged.
    """
    import deepspeed.comm as ds_dist
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    if not ds_dist.is_initialized():
        ds_dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    plugin = DeepSpeedPlugin()  # reads the launch's ACCELERATE_DEEPSPEED_* settings
    plugin.set_mixed_precision(accelerator.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    accelerator.state.deepspeed_plugins = plugin
    accelerator.deepspeed_engine_wrapped = None
    PartialState().distributed_type = DistributedType.DEEPSPEED
    accelerator.state.distributed_type = DistributedType.DEEPSPEED


def prepare_deepspeed(accelerator: Any, max_grad_norm: float | None) -> None:
    """Before Accelerate builds the DeepSpeed engine: the recipe's gradient clipping (DeepSpeed clips inside
    its own step, so the launcher's value would otherwise win silently), one micro-batch per DeepSpeed step
    (adapt accumulates training.grad_accumulation micro-batches itself and marks the last one), and under
    ZeRO-3 the full weights gathered when saving (the export needs them; checkpoints stay sharded)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["gradient_clipping"] = max_grad_norm or 0.0
    config["gradient_accumulation_steps"] = 1
    if config.get("zero_optimization", {}).get("stage") == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True


def engine_name(accelerator: Any) -> str:
    """single process, DDP, FSDP1/FSDP2 or DeepSpeed ZeRO-n: what Accelerate will run."""
    kind = accelerator.distributed_type.name
    if kind == "FSDP":
        return "FSDP2" if accelerator.is_fsdp2 else "FSDP1"
    if kind == "DEEPSPEED":
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return f"DeepSpeed ZeRO-{stage}"
    return "DDP" if accelerator.num_processes > 1 else "single process"


def start_line(accelerator: Any, precision_why: str) -> str:
    """One line: engine, process count, mixed precision (and whose) and device that actually run."""
    n = accelerator.num_processes
    where = f"{accelerator.device.type}" + ("/gloo" if n > 1 and accelerator.device.type == "cpu" else "")
    return (
        f"engine: {engine_name(accelerator)}, {n} process{'es' if n > 1 else ''}, "
        f"mixed precision: {accelerator.mixed_precision} ({precision_why}), device: {where}"
    )


def prepare_fsdp(accelerator: Any, loss_module: Any) -> None:
    """Before Accelerate shards: one unit per decoder layer, and every rank starts from rank 0's weights,
    as DDP does, rather than from its own identically seeded copy (new rows, LoRA init): Accelerate
    broadcasts them under fsdp_cpu_ram_efficient_loading, adapt does on gloo otherwise."""
    import torch.distributed as dist

    from adapt.training.placement import keep_ties

    plugin = accelerator.state.fsdp_plugin
    configure_wrapping(plugin, loss_module, accelerator.is_main_process)
    keep_fp32_edges(plugin)
    if plugin.cpu_ram_efficient_loading:
        keep_ties(loss_module)
    elif dist.get_backend() == "gloo":
        for tensor in loss_module.state_dict().values():
            dist.broadcast(tensor, src=0)


def keep_fp32_edges(plugin: Any) -> None:
    """FSDP2 under bf16/fp16: compute in the low dtype, but reduce gradients in fp32 and leave the
    modules' outputs as computed (Accelerate's policy also reduces in bf16 and casts every output, which
    rounds the fp32 loss to bf16), as DDP's autocast and torchtitan's default do."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = plugin.mixed_precision_policy  # (inputs, the 1/t loss weights included, are still cast)
    if isinstance(policy, MixedPrecisionPolicy) and policy.param_dtype in (torch.bfloat16, torch.float16):
        plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=policy.param_dtype, reduce_dtype=torch.float32, output_dtype=None
        )


def configure_wrapping(plugin: Any, loss_module: Any, main: bool) -> None:
    """Shard one FSDP unit per decoder layer: the model's own `_no_split_modules` (seen through adapt's
    wrapper), else the class of the blocks in its decoder's `layers` list, said so."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if plugin.transformer_cls_names_to_wrap:
        return  # named in the Accelerate config
    if plugin.auto_wrap_policy is None:
        plugin.auto_wrap_policy = transformer_auto_wrap_policy
    own = loss_module._no_split_modules
    if own:
        plugin.transformer_cls_names_to_wrap = sorted(own)
        return
    names = decoder_layer_classes(loss_module)
    plugin.transformer_cls_names_to_wrap = names
    if main:
        log.warning(
            "the model declares no _no_split_modules; FSDP wraps each block of its decoder's layers list "
            "(%s) instead",
            ", ".join(names),
        )


def decoder_layer_classes(loss_module: Any) -> list[str]:
    """Class names of the blocks in the decoder's `layers`/`h`/`blocks` list."""
    from adapt.training.objectives.loss import causal_lm_of, decoder_blocks

    lm = causal_lm_of(loss_module.model)
    blocks = decoder_blocks(lm)
    if not blocks:
        raise AdaptError(
            f"{type(lm.get_decoder()).__name__} has no _no_split_modules and no list of decoder layers to "
            "shard; name the layer class with fsdp_transformer_layer_cls_to_wrap in the Accelerate config"
        )
    return sorted({type(b).__name__ for b in blocks})


def describe(accelerator: Any, loss_module: Any, precision_why: str) -> dict[str, Any]:
    """What runs, for OUTPUT_DIR/engine.json: the start line's facts and, under FSDP, each rank's share of
    each sharded unit (every process must call this: the shares are gathered)."""
    from accelerate.utils import gather_object

    facts: dict[str, Any] = {
        "engine": engine_name(accelerator),
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "mixed_precision_source": precision_why,
        "device": accelerator.device.type,
    }
    if accelerator.distributed_type.name == "FSDP" and accelerator.is_fsdp2:
        facts["fsdp_ranks"] = gather_object([fsdp_shares(loss_module)])
    if accelerator.distributed_type.name == "DEEPSPEED":
        facts["deepspeed_ranks"] = gather_object([deepspeed_shares(loss_module)])
    return facts


def deepspeed_shares(engine: Any) -> dict[str, Any]:
    """This rank's DeepSpeed engine: its class, ZeRO stage and optimizer, the dtypes of the weights it
    computes with and of its optimizer state, the elements of that state (master weights) it holds against
    all trainable ones, and under ZeRO-3 its parameter partition. Below ZeRO-3, whatever DeepSpeed wraps
    the optimizer in (ZeRO-1/2, its bf16 or fp16 optimizers under ZeRO-0, nothing under ZeRO-0 in fp32),
    the torch optimizer inside steps this rank's master weights (ZeRO-3 hands them over per step only)."""
    stage = engine.zero_optimization_stage()
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    groups = (
        optimizer.fp32_partitioned_groups_flat
        if stage == 3
        else [p for group in inner.param_groups for p in group["params"]]
    )
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    facts: dict[str, Any] = {
        "wrapper": type(engine).__name__,
        "zero_stage": stage,
        "optimizer": type(optimizer).__name__,
        "dtypes": {
            "weights": str(trainable[0].dtype).removeprefix("torch."),
            "optimizer_state": str(groups[0].dtype).removeprefix("torch."),
        },
        "optimizer_state": {
            "local": sum(g.numel() for g in groups),
            "full": sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
        },
    }
    if stage == 3:
        params = list(engine.module.parameters())
        facts["parameters"] = {
            "local": sum(p.ds_tensor.numel() for p in params),
            "full": sum(p.ds_numel for p in params),
        }
    return facts


def unit_dtypes(module: Any) -> dict[str, str | None]:
    """The mixed-precision policy this FSDP2 unit runs with: compute, gradient-reduction and output dtypes
    (None: not cast)."""
    policy = module._get_fsdp_state()._mp_policy
    named = {"param": policy.param_dtype, "reduce": policy.reduce_dtype, "output": policy.output_dtype}
    return {k: str(v).removeprefix("torch.") if v is not None else None for k, v in named.items()}


def fsdp_shares(loss_module: Any) -> dict[str, Any]:
    """This rank's elements of each FSDP2 unit's own parameters against their full size."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = {name: m for name, m in loss_module.named_modules() if isinstance(m, FSDPModule)}
    units = {name: type(m).__name__.removeprefix("FSDP") for name, m in fsdp.items()}
    shares = {
        name or "<root>": {"class": units[name], "local": 0, "full": 0, "dtypes": unit_dtypes(m)}
        for name, m in fsdp.items()
    }
    for pname, p in loss_module.named_parameters():
        owner = max((u for u in units if u == "" or pname.startswith(u + ".")), key=len, default=None)
        if owner is not None and hasattr(p, "to_local"):
            share = shares[owner or "<root>"]
            share["local"] += p.to_local().numel()
            share["full"] += p.numel()
    return shares
