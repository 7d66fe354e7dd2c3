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
    kind = accelerator.distributed_type.name
    if kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        if not accelerator.state.deepspeed_plugin.zero3_init_flag:
            return Load("whole", "zero3_init_flag is off")
        how: How = "zero.Init"
    elif kind == "FSDP":
        if not accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
            return Load("whole", "fsdp_cpu_ram_efficient_loading is off")
        how = "rank 0 + broadcast"
    else:
        several = accelerator.num_processes > 1
        return Load("whole", f"{engine} keeps every weight on every rank" if several else engine)
    return Load(how) if converted(cfg) else Load("whole", CONVERT_FIRST)


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


def held(model: Any, rss_before: int) -> dict[str, int]:
    """Elements of the model's parameters this rank holds right after loading (its zero.Init partition,
    none on the meta device) against their full count, and its peak resident memory before and after."""
    local = full = 0
    for p in model.parameters():
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0 if p.is_meta else p.numel()
        full += getattr(p, "ds_numel", p.numel())
    return {
        "local": local,
        "full": full,
        "peak_rss_before_load_bytes": rss_before,
        "peak_rss_loaded_bytes": peak_rss(),
    }


def facts(load: Load, loaded: dict[str, int]) -> dict[str, Any]:
    """engine.json's `load`: how, why, what each rank held right after loading (`held`), and each rank's
    peak resident memory once the engine holds the weights (every process must call this: gathered)."""
    from accelerate.utils import gather_object

    ranks = gather_object([{**loaded, "peak_rss_bytes": peak_rss()}])
    return {"how": load.how, "why": load.why, "ranks": ranks}
