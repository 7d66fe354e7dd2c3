"""The model a recipe trains: a converted checkpoint, or an AR model converted now (in memory), and
whether the data fits its context.
"""

from __future__ import annotations

from typing import Any

from adapt.core.checkpoint import DiffusionSettings, checked_settings
from adapt.core.errors import AdaptError
from adapt.training.config import ModelConfig, Recipe


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
