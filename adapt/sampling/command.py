"""What `adapt sample` / `python sample.py` do: load a checkpoint, generate, stream, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from adapt.core.bounds import Weights, check_fits, check_weights, kv_cache_term, logits_term, vocab_size
from adapt.core.checkpoint import DiffusionSettings
from adapt.core.errors import AdaptError
from adapt.sampling.config import SamplingConfig


def sample(
    checkpoint: str | Path,
    prompts: list[str],
    infills: list[str],
    config: SamplingConfig,
    dtype: str = "auto",
    device: str | None = None,
    as_json: bool = False,
    stream: bool = True,
    revision: str | None = None,
) -> None:
    """Generate from every prompt and template; print texts (or JSON) and the counters.

    `checkpoint` is a directory or a Hub id (at `revision`), of a full checkpoint or a LoRA adapter export.
    """
    from transformers import AutoConfig

    from adapt.core.boundary import resolve_device
    from adapt.core.checkpoint import config_dir, load_settings
    from adapt.core.locate import locate
    from adapt.loading.model import load_diffusion_model
    from adapt.loading.precision import weights_dtype
    from adapt.sampling.display import LiveView, PlainStream
    from adapt.sampling.engine import context_length, generate, resolve_cache, stop_token_ids

    where = locate(checkpoint, revision)
    settings = load_settings(where)  # a clear error before any weights are read
    if not prompts and not infills:
        raise AdaptError("give a --prompt or an --infill template")
    device = resolve_device(device)
    model_config = AutoConfig.from_pretrained(config_dir(where))
    limit = context_length(model_config)
    if limit is not None and prompts and config.gen_length >= limit:
        raise AdaptError(
            f"--gen-length {config.gen_length} does not fit the model's context of {limit} tokens "
            "(with the prompt); lower --gen-length"
        )
    for t in infills:
        if settings.mask_token not in t:
            raise AdaptError(
                f"--infill template has no {settings.mask_token} (write {settings.mask_token}*N)"
            )
    resolved = resolve_cache(config, settings)  # what cannot run on this checkpoint fails before loading
    chosen, why = weights_dtype(dtype, device)
    weights = check_weights(config_dir(where), chosen, device)  # config.json against the weights, and memory
    if prompts:
        check_batch(model_config, settings, resolved, len(prompts) + len(infills), weights, chosen, device)
    name = "checkpoint" if chosen == "auto" else str(chosen).removeprefix("torch.")  # resolved once
    shown = "saved dtype" if name == "checkpoint" else name
    typer.echo(f"{checkpoint} on {device} in {shown} ({why})", err=True)
    model, tokenizer, settings = load_diffusion_model(where, dtype=name, device=device)
    inputs = list(prompts) + list(infills)
    view = None
    if stream and not as_json:
        if sys.stderr.isatty():
            view = LiveView(tokenizer)
        elif len(inputs) == 1:
            view = PlainStream(tokenizer, stop_token_ids(tokenizer, model), config.stop)
    if view is None:
        out = generate(model, tokenizer, inputs, config, settings)
    else:
        with view:
            out = generate(model, tokenizer, inputs, config, settings, on_step=view)
    if as_json:
        record = {"checkpoint": str(checkpoint), "prompts": inputs, **out.to_dict()}
        typer.echo(json.dumps(record, ensure_ascii=False))
        return
    if isinstance(view, PlainStream):
        view.finish(out.texts[0])
    else:
        for prompt, text in zip(inputs, out.texts, strict=True):
            if len(inputs) > 1:
                typer.echo(f"--- {prompt}")
            typer.echo(text)
    accepted = " · drafts accepted by position " + " ".join(f"{a:.2f}" for a in out.acceptance)
    typer.echo(
        f"NFE {out.nfe} · {out.tokens} tokens · {out.seconds:.2f} s · {out.tokens_per_second:.1f} tokens/s"
        + (accepted if out.drafted else ""),
        err=True,
    )


def check_batch(
    model_config: Any,
    settings: DiffusionSettings,
    config: SamplingConfig,
    rows: int,
    weights: Weights | None,
    dtype: Any,
    device: str,
) -> None:
    """Refuse a batch whose logits (and KV cache) cannot fit beside the weights, before anything is loaded.

    Lower bounds: each row is at least a token and `gen_length` masks; a step reads the logits of one block
    (the checkpoint's, or --block-length) and the cache holds every column.
    """
    length = config.gen_length + 1
    width = min(settings.block_size or config.block, length)
    logits = "prompts x block length x vocabulary x 4 bytes"
    terms = [logits_term(rows, width, vocab_size(model_config), "the logits of a step", logits)]
    if config.cache != "none":
        per_value = getattr(dtype, "itemsize", None) or 2
        terms.append(kv_cache_term(model_config, rows, length, per_value))
    if weights is not None:
        terms.append(weights.term(dtype))
    fix = "lower --gen-length or --block-length, or give fewer prompts"
    check_fits(f"{rows} prompt(s) x --gen-length {config.gen_length}", terms, device, fix)
