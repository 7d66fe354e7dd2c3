"""Load a diffusion checkpoint to run it (sample, evaluate, verify): stock transformers, a LoRA adapter
export merged onto its base, the weights dtype chosen for the device; every tensor loaded and finite
(`adapt.loading.weights`)."""

from __future__ import annotations

import os
from typing import Any

from adapt.core.boundary import about, resolve_device
from adapt.core.bounds import check_weights
from adapt.core.checkpoint import DiffusionSettings, adapter_base, config_dir, load_settings
from adapt.core.locate import locate
from adapt.loading.precision import weights_dtype
from adapt.loading.weights import check_finite_model, from_pretrained, load_adapter


def load_diffusion_model(
    path: str | os.PathLike,
    dtype: str = "float32",
    device: str | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
) -> tuple[Any, Any, DiffusionSettings]:
    """Load a converted checkpoint with stock transformers: (model in eval mode, tokenizer, settings).

    `path` is a local directory or a Hub id (at `revision`; see `adapt.core.locate`), of a full checkpoint or
    of a LoRA adapter export (loaded onto its base model with peft and merged). `device` defaults to cuda
    when available, else cpu; `dtype` is read by `weights_dtype` (auto: bf16 where the device multiplies it
    natively). A checkpoint whose files lack a tensor, hold an unexpected one or one of the wrong shape, or
    hold a NaN or infinite weight, is refused. Before anything is allocated, config.json is checked against
    the weights' headers and the weights against the memory of `device` (`adapt.core.bounds.check_weights`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = locate(path, revision)
    settings = load_settings(path)
    device = resolve_device(device)
    kwargs: dict[str, Any] = {"dtype": weights_dtype(dtype, device)[0]}
    check_weights(config_dir(path), kwargs["dtype"], device)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    where, base = f"cannot load the model in {path}", config_dir(path)  # base: an adapter's base model
    with about(where):
        model = from_pretrained(AutoModelForCausalLM, base, f"cannot load the model in {base}", **kwargs)
        if adapter_base(path) is not None:
            model = merged_adapter(model, path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    model.to(device)
    check_finite_model(model, where)  # on the device: one pass over the weights where they are fastest read
    return model.eval(), tokenizer, settings


def merged_adapter(base: Any, adapter: str | os.PathLike) -> Any:
    """`base` with the peft adapter in `adapter` applied and merged: a plain transformers model."""
    return load_adapter(base, adapter, f"cannot load the LoRA adapter in {adapter}").merge_and_unload()
