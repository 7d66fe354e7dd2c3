"""Export a fine-tuned model as a ready-to-sample diffusion checkpoint (or a LoRA adapter alone).

The directory is the converted-checkpoint format (config.json with `is_causal: false` and the
`diffusion` block, safetensors, tokenizer, generation config) plus `recipe.yaml` and
`training_summary.json`; stock `AutoModelForCausalLM.from_pretrained` loads it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from adapt.core.checkpoint import write_settings
from adapt.core.errors import AdaptError
from adapt.core.outputs import atomic_dir, json_text
from adapt.core.version import __version__
from adapt.loading.weights import first_non_finite
from adapt.training.config import save_recipe

log = logging.getLogger(__name__)

FINAL = "final"


def export(session: Any, out: str | Path | None = None) -> Path:
    """Write the trained model of a `adapt.training.session.Session` to OUT (default OUTPUT_DIR/final),
    atomically."""
    acc = session.accelerator
    out = Path(out) if out is not None else session.output_dir / FINAL
    acc.wait_for_everyone()
    state_dict = None
    if acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
        full = acc.get_state_dict(session.loss_module)  # every process takes part in the gather
        if acc.is_main_process:  # ZeRO-3 gathers onto rank 0 alone (the others get None)
            state_dict = {k.removeprefix("model."): v for k, v in full.items()}
    if acc.is_main_process:
        check_finite_weights(state_dict if state_dict is not None else session.model.state_dict(), out)
        lora, model = session.recipe.lora, session.model
        if lora is not None and state_dict is not None:
            model, state_dict = unsharded_peft_model(session, state_dict), None
        with atomic_dir(out) as tmp:
            if lora is not None and lora.export == "adapter":
                model.save_pretrained(tmp)
            else:
                save_full_model(model, session.settings, tmp, state_dict)
            session.tokenizer.save_pretrained(tmp)
            save_recipe(session.recipe, tmp / "recipe.yaml")
            (tmp / "training_summary.json").write_text(json_text(training_summary(session)))
    acc.wait_for_everyone()
    return out


def unsharded_peft_model(session: Any, state_dict: dict[str, Any]) -> Any:
    """Rank 0's plain copy of a sharded peft model (FSDP, DeepSpeed): rebuilt as `setup` built it, then the
    gathered weights loaded, every key accounted for. peft's merge and save then run on one process only
    (on the sharded model they would wait for the other ranks)."""
    from adapt.core.zero3 import whole_weights
    from adapt.training.lora import apply_lora
    from adapt.training.model import load_model

    with whole_weights():
        model, _, _ = load_model(session.recipe.model)
        model = apply_lora(model, session.recipe.lora, session.settings.mask_token_id)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise AdaptError(
            f"the gathered LoRA weights do not fit the model ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); nothing exported"
        )
    return model.eval()


def check_finite_weights(state_dict: dict[str, Any], out: Path) -> None:
    """Refuse to export weights holding NaN or infinity (a diverged run), naming the first bad tensor."""
    name = first_non_finite(state_dict.items())
    if name is not None:
        raise AdaptError(
            f"the trained weights are not finite ({name} holds NaN or infinity); nothing exported to "
            f"{out}. The run diverged: lower training.lr or check the data"
        )


def merged_model(model: Any) -> Any:
    """A plain transformers model: peft adapters (and trainable token rows) merged in."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def save_full_model(model: Any, settings: Any, out: Path, state_dict: dict | None = None) -> None:
    """save_pretrained with the diffusion settings recorded in config.json and generation_config.json."""
    model = merged_model(model)
    write_settings(model.config, settings)
    model.generation_config.mask_token_id = settings.mask_token_id
    if state_dict is not None:
        model.save_pretrained(out, state_dict=state_dict)
    else:
        model.save_pretrained(out)


def training_summary(session: Any) -> dict[str, Any]:
    s, r = session.state, session.recipe
    return {
        "steps": s.step,
        "tokens_seen": s.tokens_seen,
        "train_loss": s.train_loss,
        "eval_loss": s.eval_loss,
        "base_model": session.settings.source_model or r.model.path,
        "lora": r.lora is not None,
        "adapt_version": __version__,
    }


def push_if_requested(session: Any, exported: Path) -> None:
    """Publish the export when the recipe names a Hub repo and adapt.publishing.hub is available."""
    repo_id = session.recipe.push_to_hub
    if not repo_id or not session.accelerator.is_main_process:
        return
    try:
        from adapt.publishing import hub
    except ImportError:
        log.warning(
            "push_to_hub=%s skipped: adapt.publishing.hub is not available in this installation", repo_id
        )
        return
    hub.push(exported, repo_id)
