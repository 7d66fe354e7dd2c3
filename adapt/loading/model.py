"""Load a diffusion checkpoint to run it (sample, evaluate, verify): stock transformers, a LoRA adapter
export merged onto its base, the weights dtype chosen for the device."""

from __future__ import annotations

import os
from typing import Any

from adapt.core.boundary import about, resolve_device
from adapt.core.bounds import check_weights
from adapt.core.checkpoint import DiffusionSettings, adapter_base, config_dir, load_settings
from adapt.core.locate import locate
from adapt.loading.precision import weights_dtype


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
    natively). Before anything is allocated, config.json is checked against the weights' headers and the
    weights against the memory of `device` (`adapt.core.bounds.check_weights`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = locate(path, revision)
    settings = load_settings(path)
    device = resolve_device(device)
    kwargs: dict[str, Any] = {"dtype": weights_dtype(dtype, device)[0]}
    check_weights(config_dir(path), kwargs["dtype"], device)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with about(f"cannot load the model in {path}"):
        model = AutoModelForCausalLM.from_pretrained(config_dir(path), **kwargs)
        if adapter_base(path) is not None:
            model = merged_adapter(model, path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    model.to(device)
    return model.eval(), tokenizer, settings


def merged_adapter(base: Any, adapter: str | os.PathLike) -> Any:
    """`base` with the peft adapter in `adapter` applied and merged: a plain transformers model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter).merge_and_unload()
