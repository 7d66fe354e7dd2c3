"""The model a recipe trains: a converted checkpoint, or an AR model converted now (in memory), whether
the data fits its context, and whether a micro-batch fits in memory.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from adapt.core.bounds import (
    Term,
    check_config_matches,
    check_fits,
    hidden_size,
    logits_term,
    read_weights,
    vocab_size,
)
from adapt.core.checkpoint import DiffusionSettings, checked_settings, resolve_dtype
from adapt.core.errors import AdaptError
from adapt.training.config import ModelConfig, Recipe


def load_model(cfg: ModelConfig, empty: bool = False) -> tuple[Any, Any, DiffusionSettings]:
    """A diffusion model to train: a converted checkpoint, or an AR model converted now (in memory).
    `empty`: a converted checkpoint's model with its parameters on the meta device (nothing read)."""
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
    if empty and settings is None:
        raise AdaptError(f"{cfg.path} is not a converted checkpoint; only those load empty")
    model, tokenizer = (empty_model if empty else load_model_and_tokenizer)(cfg.path, options)
    if settings is None:
        settings, _, _ = convert_model(model, tokenizer, options, source=cfg.path)
    elif cfg.shift is not None and cfg.shift != settings.shift:
        raise AdaptError(
            f"model.shift={cfg.shift} contradicts the checkpoint's recorded shift={settings.shift}; "
            "remove model.shift (it only applies when converting an AR model)"
        )
    return model.train(), tokenizer, settings


def empty_model(path: str, options: Any) -> tuple[Any, Any]:
    """The model of `path`'s config with its parameters on the meta device (its buffers, rotary
    frequencies, computed as usual), and its tokenizer."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapt.conversion.convert import load_config

    config = load_config(path, options.revision)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=options.revision)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=resolve_dtype(options.dtype), attn_implementation=options.attn_implementation
        )
    model.tie_weights()  # (init_empty_weights gave each tied name its own meta parameter)
    return model, tokenizer


def check_context(config: Any, recipe: Recipe) -> None:
    """data.max_length must fit the model's positions (checked before the data is prepared)."""
    from adapt.sampling.engine import context_length

    limit = context_length(config)
    if limit is not None and recipe.data.max_length > limit:
        raise AdaptError(
            f"data.max_length={recipe.data.max_length} is longer than the context of {recipe.model.path} "
            f"({limit} tokens); lower data.max_length"
        )


def choose_kernel(model: Any, recipe: Recipe) -> None:
    """The block objective under sdpa runs the tiled pair kernel: the same attention, without the scores of
    pairs its mask never opens (`adapt.core.pair_attention`)."""
    from adapt.core.pair_attention import use_pair_sdpa
    from adapt.training.objectives.loss import causal_lm_of

    if recipe.diffusion.block_size is not None and recipe.model.attn_implementation == "sdpa":
        use_pair_sdpa(causal_lm_of(model))


def check_attention(recipe: Recipe, device: Any) -> None:
    """model.attn_implementation=flex_attention needs a torch that trains FlexAttention on `device` and an
    architecture whose transformers code takes it (checked on its config, before any weight is read)."""
    if recipe.model.attn_implementation != "flex_attention":
        return
    from adapt.core.flex import check_flex_architecture, flex_cannot_train

    reason = flex_cannot_train(device)
    if reason is not None:
        raise AdaptError(
            f"model.attn_implementation=flex_attention cannot train on {device}: {reason}; use sdpa here "
            "(flex_attention trains on CUDA)"
        )
    from adapt.conversion.convert import load_config

    check_flex_architecture(load_config(recipe.model.path, recipe.model.revision))


def check_batch(recipe: Recipe, device: Any, host_share: float = 1.0, teacher_share: float = 1.0) -> None:
    """Before the model loads: a micro-batch's logits fit the training device, and this rank's share of
    the weights read through the host (`host_share`: 1 for a whole load, 1/N on ranks > 0 of a sharded
    one; `adapt.training.placement`) fits the host, with its share of an AR teacher's (`teacher_share`).
    Lower bounds: the loss reads the logits (and their gradients) where the objective reads them
    (`step_logits`); activations and optimizer states add more."""
    from adapt.conversion.convert import load_config

    config = load_config(recipe.model.path, recipe.model.revision)
    t, length = recipe.training, recipe.data.max_length
    terms = step_logits(recipe, vocab_size(config), hidden_size(config))
    if Path(recipe.model.path).is_dir():  # a Hub id's weights are not on disk yet
        dtype = resolve_dtype(recipe.model.dtype)
        weights = read_weights(recipe.model.path)  # headers only; the share this rank holds is checked below
        if weights is not None:
            check_config_matches(config, weights, recipe.model.path)
        terms += [host_weights(weights.term(dtype), host_share)] if weights is not None else []
    terms += teacher_weights(recipe, teacher_share)
    fix = "lower training.batch_size (raise training.grad_accumulation to keep the batch) or data.max_length"
    check_fits(f"training.batch_size={t.batch_size} x data.max_length={length}", terms, device, fix)


def teacher_weights(recipe: Recipe, share: float) -> list[Any]:
    """The AR teacher's weights as this rank holds them, at 2 bytes a parameter or fewer (it computes in
    the step's precision, bf16 under mixed precision)."""
    import torch

    path = recipe.diffusion.ar_teacher
    weights = read_weights(Path(path).expanduser()) if path and recipe.diffusion.ar_loss_weight else None
    if weights is None:
        return []
    dtype = resolve_dtype(recipe.model.dtype)
    low = dtype if getattr(dtype, "itemsize", 4) < 2 else torch.bfloat16
    term = host_weights(weights.term(low), share)
    return [replace(term, what=term.what.replace("the weights", "the teacher's weights"))]


def step_logits(recipe: Recipe, vocab: int, hidden: int) -> list[Any]:
    """The float32 logits a micro-batch's loss reads, with their gradients: at the masked tokens (about
    half of them; all of them under diffusion.full_mask) and, with the joint objective's AR term, at every
    clean token too; over twice `loss.chunk_elements()` of them the loss holds one chunk at a time
    (`objectives.loss.chunked_scores`), and the decoder's last hidden states [b, L, hidden] are the bound
    that grows with the batch. An AR teacher's probabilities at the clean tokens are whole."""
    from adapt.training.objectives import loss

    d, t, length = recipe.diffusion, recipe.training, recipe.data.max_length
    masked, ar = (1.0 if d.full_mask else 0.5), (1.0 if d.ar_loss_weight else 0.0)
    where = "every masked token (full_mask)" if d.full_mask else "the masked half"
    where += " and every clean token (the AR term)" if ar else ""
    what = f"the logits and their gradients at {where} of a micro-batch"
    rows = (masked + ar) * t.batch_size * length
    chunk = loss.chunk_elements()
    if rows * vocab > 2 * chunk:
        what = "a chunk of the logits and its gradient"
        terms = [Term(what, 8 * chunk, f"{chunk:,} logits x 4 bytes x 2 ({loss.CHUNK_ENV})")]
        states = "the decoder's last hidden states"
        rows_h = t.batch_size * length * hidden * 4
        terms.append(Term(states, rows_h, "batch x length x hidden size x 4 bytes"))
    else:
        term = logits_term(t.batch_size, length, vocab, what)
        copies = 2 * (masked + ar)
        formula = term.formula if copies == 1 else f"{term.formula} x {copies:g}"
        # (at most what a chunked loss would hold: the masked count is an estimate, the loss counts)
        terms = [replace(term, bytes=min(int(term.bytes * copies), 8 * chunk), formula=formula)]
    if d.ar_teacher and ar:
        terms.append(
            logits_term(t.batch_size, length, vocab, "the teacher's probabilities at the clean tokens")
        )
    return terms


def host_weights(term: Any, share: float) -> Any:
    """The weights term as this rank holds it in host memory while loading."""
    if share == 1:
        return replace(term, host=True)
    what = f"this rank's 1/{round(1 / share)} of the weights"
    formula = f"{term.formula} / {round(1 / share)}"
    return replace(term, what=what, bytes=int(term.bytes * share), formula=formula, host=True)
