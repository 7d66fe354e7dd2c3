"""LoRA through peft: target modules found per architecture, the mask-token row kept trainable."""

from __future__ import annotations

from torch import nn

from adapt.core.checkpoint import read_settings
from adapt.core.errors import AdaptError, first_line
from adapt.training.config import LoraSettings, Recipe
from adapt.training.objectives.loss import causal_lm_of


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names of every linear layer inside the decoder blocks (the LM head excluded)."""
    lm = causal_lm_of(model)
    head = lm.get_output_embeddings()
    names = set()
    for name, module in lm.get_decoder().named_modules():
        if module is head or not name:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise AdaptError(f"found no linear layers to adapt in {type(lm).__name__}; set lora.target_modules")
    return sorted(names)


def apply_lora(model: nn.Module, cfg: LoraSettings, mask_token_id: int) -> nn.Module:
    """Wrap `model` with peft LoRA adapters; the mask token's embedding row stays trainable."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model) if cfg.target_modules == "auto" else list(cfg.target_modules)
    gpt2_style = any(type(m).__name__ == "Conv1D" for m in model.modules())
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=gpt2_style,
        trainable_token_indices=[mask_token_id] if cfg.train_mask_token else None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise AdaptError(f"cannot apply LoRA: {first_line(e)}") from e


def check_adapter_export(recipe: Recipe) -> None:
    """An adapter alone is only usable on top of a diffusion checkpoint, not of an AR source, and is only
    publishable when that checkpoint is on the Hub."""
    if recipe.lora is not None and recipe.lora.export == "adapter":
        from adapt.conversion.convert import load_config
        from adapt.core.locate import looks_like_hub_id

        if recipe.push_to_hub and not looks_like_hub_id(recipe.model.path):
            raise AdaptError(
                "push_to_hub publishes the LoRA adapter against its base, but model.path "
                f"{recipe.model.path} is a local directory nobody else can reach: push the base first "
                "(adapt push DIR NAMESPACE/BASE) and train from model.path=NAMESPACE/BASE, "
                "or use lora.export=merged"
            )

        if read_settings(load_config(recipe.model.path, recipe.model.revision)) is None:
            raise AdaptError(
                "lora.export=adapter needs model.path to be a converted diffusion checkpoint "
                "(run `adapt convert` first) or use lora.export=merged"
            )
