"""How each rank reads the weights before the engine shards them (`load:` in engine.json and at start).

DDP and ZeRO-0/1/2 keep every weight on every rank, so every rank reads the model whole. ZeRO-3 and FSDP2
keep 1/N of it per rank; reading it whole on each rank first (8 x 30 GB of host memory for a 7B model on
an 8-GPU node) would cap the model size, so a converted checkpoint is read sharded:

- ZeRO-3 with `zero3_init_flag` (Accelerate's default at stage 3): transformers builds the model inside
  `deepspeed.zero.Init`, each parameter partitioned as it is created; rank 0 reads the files and each
  module's weights are scattered from it. `load: sharded (zero.Init)`.
- FSDP2 with `fsdp_cpu_ram_efficient_loading`: rank 0 reads the model, the other ranks build it on the meta
  device; Accelerate shards the meta model and broadcasts rank 0's weights, one tensor at a time, into
  each rank's shard. `load: rank 0 + broadcast`.
- Otherwise `load: whole`, with why: the engine replicates the weights, the launch turned the option off,
  or the recipe converts an AR model in memory (its new mask-token row and resized embeddings need the
  whole matrices; `adapt convert` it first to load it sharded).

Host memory per rank while loading, W the weights in the recipe's model.dtype, N ranks:

    whole                   W on every rank
    sharded (zero.Init)     rank 0: W (the files it reads) + W/N; the others: W/N
    rank 0 + broadcast      rank 0: W + W/N; the others: W/N (+ the tensor in flight)
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapt.core.errors import AdaptError
from adapt.core.zero3 import whole_weights
from adapt.training.config import ModelConfig

How = Literal["whole", "zero.Init", "rank 0 + broadcast"]
CONVERT_FIRST = "the AR model is converted in memory; `adapt convert` it first to load it sharded"


@dataclass(frozen=True)
class Load:
    """How this run reads its weights, and why."""

    how: How
    why: str = ""

    @property
    def sharded(self) -> bool:
        return self.how != "whole"

    def line(self) -> str:
        """`load: sharded (zero.Init)`, `load: rank 0 + broadcast`, `load: whole (why)`."""
        if self.how == "zero.Init":
            return "load: sharded (zero.Init)"
        return f"load: {self.how}" + (f" ({self.why})" if self.why else "")

    def host_share(self, rank: int, ranks: int) -> float:
        """The fraction of the weights this rank holds in host memory while loading (lower bound)."""
        return 1.0 if not self.sharded or rank == 0 else 1 / ranks


def choose(accelerator: Any, cfg: ModelConfig, engine: str) -> Load:
    """Sharded where the engine (`engine.engine_name`) shards and the checkpoint is already converted,
    else whole."""
    load = engine_load(accelerator, engine)
    return load if not load.sharded or converted(cfg) else Load("whole", CONVERT_FIRST)


def engine_load(accelerator: Any, engine: str) -> Load:
    """Sharded where the engine shards and its launch lets it load so, whatever the checkpoint."""
    kind = accelerator.distributed_type.name
    if kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        if not accelerator.state.deepspeed_plugin.zero3_init_flag:
            return Load("whole", "zero3_init_flag is off")
        return Load("zero.Init")
    if kind == "FSDP":
        if not accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
            return Load("whole", "fsdp_cpu_ram_efficient_loading is off")
        return Load("rank 0 + broadcast")
    several = accelerator.num_processes > 1
    return Load("whole", f"{engine} keeps every weight on every rank" if several else engine)


def converted(cfg: ModelConfig) -> bool:
    from adapt.conversion.convert import load_config
    from adapt.core.checkpoint import checked_settings

    return checked_settings(load_config(cfg.path, cfg.revision), cfg.path) is not None


@contextlib.contextmanager
def reading(load: Load) -> Iterator[None]:
    """The context the model is read, converted and wrapped in: ZeRO-3's zero.Init stays on only for a
    zero.Init load."""
    with contextlib.nullcontext() if load.how == "zero.Init" else whole_weights():
        yield


def read(load: Load, cfg: ModelConfig, main: bool) -> tuple[Any, Any, Any]:
    """(model, tokenizer, settings) as `load` reads them: under rank 0 + broadcast the other ranks' model
    is on the meta device until Accelerate broadcasts rank 0's weights into their shards."""
    from adapt.training.model import load_model

    model, tokenizer, settings = load_model(cfg, empty=load.how == "rank 0 + broadcast" and not main)
    if load.how == "zero.Init":
        check_partition_finite(model, cfg.path)
    return model, tokenizer, settings


def apply_lora(load: Load, model: Any, cfg: Any, mask_token_id: int) -> Any:
    """`lora.apply_lora`; under zero.Init with the embedding and head gathered for the while, so that peft
    copies the mask token's rows from whole matrices (its own ZeRO-3 path for them runs on CUDA only).
    Its new parameters are partitioned by `deepspeed.initialize`."""
    from adapt.training import lora

    if load.how != "zero.Init":
        return lora.apply_lora(model, cfg, mask_token_id)
    import deepspeed

    from adapt.training.objectives.loss import causal_lm_of

    lm = causal_lm_of(model)
    ends = [m for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) if m is not None]
    edges = {id(m.weight): m.weight for m in ends}  # once when tied
    with deepspeed.zero.GatheredParameters(list(edges.values())), whole_weights():
        return lora.apply_lora(model, cfg, mask_token_id)


def check_partition_finite(model: Any, path: str) -> None:
    """Under zero.Init each rank holds only its partition (`ds_tensor`): refuse NaN or infinity there."""
    from adapt.loading.weights import first_non_finite

    name = first_non_finite((n, p.ds_tensor) for n, p in model.named_parameters() if hasattr(p, "ds_tensor"))
    if name is not None:
        raise AdaptError(
            f"cannot load the weights of {path}: weight {name} holds NaN or infinity, so every output would "
            "be NaN: the model is broken (a diverged run or a corrupt file)"
        )


def match_rank0(load: Load, model: Any, device: Any) -> None:
    """Under rank 0 + broadcast: every rank's model has rank 0's parameters, shapes, dtypes and ties
    (refused otherwise: the broadcast would mismatch), and its buffers become rank 0's (rotary
    frequencies, peft's saved token rows; Accelerate broadcasts the state dict alone and re-registers the
    other buffers as they are, which it cannot do from the meta device)."""
    if load.how != "rank 0 + broadcast":
        return
    import torch
    import torch.distributed as dist
    from accelerate.utils import broadcast_object_list

    ids: dict[int, int] = {}
    mine = [
        (n, tuple(p.shape), str(p.dtype), ids.setdefault(id(p), len(ids)))
        for n, p in model.named_parameters(remove_duplicate=False)
    ]
    if broadcast_object_list([mine], from_process=0)[0] != mine:
        raise AdaptError(
            "this rank's empty model differs from rank 0's loaded one; set "
            "fsdp_cpu_ram_efficient_loading: false to load it whole on every rank"
        )

    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            buffer = model.get_submodule(owner)._buffers[leaf] = torch.empty_like(buffer, device="cpu")
        sent = buffer.to(device)
        dist.broadcast(sent, src=0)
        buffer.copy_(sent)


def keep_ties(module: Any) -> None:
    """Give `module` a `tie_weights` that re-ties the parameters it shares now (a head tied to the
    embeddings, under any peft wrapping): Accelerate calls it after moving the module to the meta device
    and after loading rank 0's weights, either of which unties them."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    shared = [names for names in groups.values() if len(names) > 1]

    def tie_weights() -> None:
        for first, *others in shared:
            param = module.get_parameter(first)
            for name in others:
                owner, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(owner), leaf, param)

    module.tie_weights = tie_weights


def fast_path_before(load: Load, model: Any, probe_ids: list[int], main: bool) -> bool:
    """`check_fast_path` before the engine exists: on this rank's whole model; under rank 0 + broadcast on
    rank 0's, the answer sent to the others; under zero.Init False until `fast_path_after`."""
    from adapt.training.objectives.loss import check_fast_path

    if load.how == "whole":
        return check_fast_path(model, probe_ids)
    if load.how == "zero.Init":
        return False
    from accelerate.utils import broadcast_object_list

    found = [check_fast_path(model, probe_ids) if main else None]
    return bool(broadcast_object_list(found, from_process=0)[0])


def fast_path_after(load: Load, accelerator: Any, loss_module: Any, probe_ids: list[int]) -> None:
    """Under zero.Init: `check_fast_path` on the prepared model, every rank at once (DeepSpeed's hooks
    gather each module's weights as the probe reaches it)."""
    if load.how != "zero.Init":
        return
    from adapt.training.objectives.loss import check_fast_path

    inner = accelerator.unwrap_model(loss_module)
    with zero3_forward(inner):
        inner.fast = check_fast_path(inner.model, probe_ids)
    inner.train()


@contextlib.contextmanager
def zero3_forward(module: Any) -> Iterator[None]:
    """What `DeepSpeedEngine.forward` marks around a forward under ZeRO-3: a parameter a module reads from
    another one (peft's trainable tokens read their base layer's weight) is gathered as it is read."""
    from deepspeed.runtime.zero.parameter_offload import ensure_zero_ordered_dict

    modules = list(module.modules())
    for m in modules:
        ensure_zero_ordered_dict(m)
        m._parameters._in_forward = True
    try:
        yield
    finally:
        for m in modules:
            m._parameters._in_forward = False


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_now() -> int:
    """This process's resident memory now, in bytes (0 where /proc is not)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * resource.getpagesize()


def held(model: Any, rss_before: int) -> dict[str, int]:
    """Elements of the model's parameters this rank holds right after loading (`elements`), and its peak
    resident memory before and after."""
    return {**elements(model), "peak_rss_before_load_bytes": rss_before, "peak_rss_loaded_bytes": peak_rss()}


def elements(model: Any) -> dict[str, int]:
    """Elements of the model's parameters this rank holds (its zero.Init partition, its FSDP2 shard, none
    on the meta device) against their full count."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
        elif hasattr(p, "to_local"):
            local += p.to_local().numel()
        elif not p.is_meta:
            local += p.numel()
        full += getattr(p, "ds_numel", p.numel())
    return {"local": local, "full": full}


def facts(load: Load, loaded: dict[str, int]) -> dict[str, Any]:
    """engine.json's `load`: how, why, what each rank held right after loading (`held`), and each rank's
    peak resident memory once the engine holds the weights (every process must call this: gathered)."""
    from accelerate.utils import gather_object

    ranks = gather_object([{**loaded, "peak_rss_bytes": peak_rss()}])
    return {"how": load.how, "why": load.why, "ranks": ranks}


# ----------------------------------------------------------------------------- the joint objective's teacher
# The frozen teacher (`diffusion.ar_teacher`) is read and held as the engine holds the model's weights: under
# FSDP2 each decoder layer is its own unit (rank 0 reads it, the others start on the meta device, as the
# model), under ZeRO-3 it is built partitioned and run by an inference-only DeepSpeed engine; 1/N of it per
# rank at rest, a layer at a time gathered while it runs. DDP and ZeRO-0/1/2 keep it whole on every rank.

DEEPSPEED_PARAMETER_KEYS = (
    "offload_param",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "stage3_prefetch_bucket_size",
)


def teacher_load(accelerator: Any, engine: str) -> Load:
    """How the teacher is read: as the engine would read a converted model (FSDP1: whole)."""
    load = engine_load(accelerator, engine)
    return Load("whole", engine) if engine == "FSDP1" and load.sharded else load


def read_teacher(
    accelerator: Any, engine: str, path: str, tokenizer: Any, student: Any, dtype: Any, probe_ids: list[int]
) -> tuple[Any, Load, dict[str, int]]:
    """The teacher as this rank reads it (whole, its zero.Init partition, or rank 0's whole and the others'
    on the meta device), how, and what this rank holds of it (`elements`, and its resident memory before and
    after). Its fast-path probe runs where it is whole (rank 0's answer is sent)."""
    from accelerate.utils import broadcast_object_list

    from adapt.training.objectives.teacher import load_teacher

    before = rss_now()
    load = teacher_load(accelerator, engine)
    on_rank0 = load.how == "rank 0 + broadcast"
    device = "cpu" if on_rank0 else accelerator.device  # rank 0's copy stays in host memory until sharded
    with reading(load):
        empty = on_rank0 and not accelerator.is_main_process
        teacher = load_teacher(path, tokenizer, student, device, dtype, probe_ids, empty=empty)
    loaded = {**elements(teacher.scorer), "rss_before_bytes": before, "rss_bytes": rss_now()}
    if on_rank0:
        teacher.scorer.fast = bool(broadcast_object_list([teacher.scorer.fast], from_process=0)[0])
    return teacher, load, loaded


def shard_teacher(
    accelerator: Any, engine: str, read: tuple[Any, Load, dict[str, int]], probe_ids: list[int]
) -> dict[str, Any]:
    """Shard the teacher `read_teacher` read as `engine` shards the model (after the model is prepared),
    and engine.json's `teacher`: how it was read, and what each rank held of it then and holds now, with
    its resident memory before and after each (every process must call this: gathered)."""
    from accelerate.utils import gather_object

    from adapt.training.objectives.loss import check_fast_path

    teacher, load, loaded = read
    before = rss_now()
    if engine == "FSDP2":
        shard_teacher_fsdp2(accelerator, teacher.scorer, broadcast=load.how == "rank 0 + broadcast")
    elif engine == "DeepSpeed ZeRO-3":
        teacher.engine = teacher_zero3_engine(accelerator, teacher.scorer)
        with zero3_forward(teacher.scorer):
            teacher.scorer.fast = check_fast_path(teacher.scorer.model, probe_ids)
    if engine == "FSDP2":
        run_once(teacher, probe_ids, accelerator.device)  # what it holds is what a forward leaves
    held = {**elements(teacher.scorer), "rss_before_bytes": before, "rss_bytes": rss_now()}
    ranks = gather_object([{"loaded": loaded, "held": held}])
    return {"how": load.how, "why": load.why, "fast_path": teacher.scorer.fast, "ranks": ranks}


def run_once(teacher: Any, probe_ids: list[int], device: Any) -> None:
    """One forward of the teacher on a probe (every rank: its engine gathers and reshards)."""
    import torch

    ids = torch.tensor([probe_ids[:8]], device=device)
    at = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        teacher.scorer(ids, torch.ones_like(ids), None, at, at, teacher.width)


def shard_teacher_fsdp2(accelerator: Any, scorer: Any, broadcast: bool) -> None:
    """One FSDP2 unit per decoder layer and one for the rest (embeddings, final norm, head); under
    `broadcast` rank 0's weights are sent into every rank's shards (the others' model is on meta)."""
    from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict
    from torch.distributed.fsdp import fully_shard

    from adapt.training.objectives.loss import causal_lm_of, decoder_blocks

    keep_ties(scorer)
    full = scorer.state_dict()  # rank 0's weights (the other ranks' are meta tensors, never read)
    # resharded after every forward, the root too (its default keeps it gathered for a backward that a
    # frozen teacher never runs)
    for block in decoder_blocks(causal_lm_of(scorer.model)):
        fully_shard(block, reshard_after_forward=True)
    fully_shard(scorer, reshard_after_forward=True)
    if broadcast:
        fsdp2_load_full_state_dict(accelerator, scorer, full)
        scorer.tie_weights()
    del full


def teacher_zero3_engine(accelerator: Any, scorer: Any) -> Any:
    """An inference-only ZeRO-3 engine over the teacher (no optimizer): it partitions what is not
    partitioned yet and gathers each module's weights around its forward. The launch's parameter settings
    (offload, persistence threshold, prefetch) apply to it too."""
    import deepspeed
    import torch

    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    kept = {k: v for k, v in zero.items() if k in DEEPSPEED_PARAMETER_KEYS and v != "auto"}
    dtype = next(scorer.parameters()).dtype
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {**kept, "stage": 3},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    engine, *_ = deepspeed.initialize(model=scorer, config=config)
    return engine
