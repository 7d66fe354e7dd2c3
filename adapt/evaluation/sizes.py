"""What an evaluation will hold at once, refused before it is allocated when it cannot fit.

`adapt eval` checks every model before the first one loads (`check_elbo` with one window, the fewest
there can be; the weights against config.json and memory), again once the windows are cut (their real
number), and the generative-perplexity options (`check_gen_ppl`) before the ELBO runs. The formulas are
`adapt.core.bounds`'; each is a lower bound of what the evaluation holds, so a refusal is never a guess.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapt.core.boundary import resolve_device
from adapt.core.bounds import (
    Term,
    check_fits,
    check_weights,
    context_length,
    logits_term,
    noisy_copies_term,
    vocab_size,
)
from adapt.core.checkpoint import adapter_export, checked_settings, config_dir
from adapt.core.errors import AdaptError
from adapt.core.locate import locate, looks_like_hub_id
from adapt.loading.precision import weights_dtype


def weights_dir(path: str, revision: str | None = None) -> Path:
    """The directory holding the config and weights `path` loads: itself, or a LoRA adapter's base."""
    where = locate(path, revision if looks_like_hub_id(path) else None)
    adapter = adapter_export(str(where))
    return config_dir(adapter) if adapter else where


def check_elbo(path: str, config: Any, model_config: Any, windows: int = 1, held: int | None = None) -> None:
    """The likelihood pass of `path` under the EvalConfig `config`: the noisy copies of `windows` windows
    (diffusion) and the logits of a batch, beside the weights (checked and counted here when `held` is
    None; else `held` bytes of a loaded model)."""
    device = resolve_device(config.device)
    dtype = weights_dtype(config.dtype, device)[0]
    vocab = vocab_size(model_config)
    if checked_settings(model_config, path) is None:  # AR: teacher-forced logits
        terms = [logits_term(min(config.batch_size, windows), config.seq_len, vocab)]
    else:
        rows = min(config.batch_size, windows * config.mc_samples)
        terms = [noisy_copies_term(windows, config.mc_samples, config.seq_len)]
        terms.append(logits_term(rows, config.seq_len, vocab))
    if held is None:
        weights = check_weights(weights_dir(path, config.revision), dtype, device)
        terms += [weights.term(dtype)] if weights is not None else []
    fix = "lower --mc-samples, --max-sequences, --seq-len or --batch-size"
    subject = f"--mc-samples {config.mc_samples} x --seq-len {config.seq_len} on {windows} window(s)"
    check_fits(subject, terms, device, fix, held or 0)


def check_gen_ppl(path: str, cfg: Any, dtype: str, device: str | None, revision: str | None = None) -> None:
    """Generative perplexity of `path` under the GenPplConfig `cfg`, before anything runs: the step counts
    (at most the tokens generated), the samples against the context, and what they hold in memory."""
    from transformers import AutoConfig

    from adapt.sampling.config import SamplingConfig

    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise AdaptError(f"--gen-samples must be at least 1, not {cfg.num_samples}")
    for steps in cfg.steps:
        try:
            SamplingConfig(gen_length=cfg.gen_length, steps=steps, **cfg.extra)
        except AdaptError as e:
            raise AdaptError(f"--gen-steps {steps} with --gen-length {cfg.gen_length}: {e}") from None
    where = weights_dir(path, revision)
    model_config = AutoConfig.from_pretrained(where)
    settings = checked_settings(model_config, path)
    limit = context_length(model_config)
    if limit is not None and cfg.gen_length + 1 > limit:
        raise AdaptError(
            f"--gen-length {cfg.gen_length} does not fit the context of {path} ({limit} tokens, with BOS)"
        )
    device = resolve_device(device)
    chosen = weights_dtype(dtype, device)[0]
    width = min(getattr(settings, "block_size", None) or cfg.gen_length, cfg.gen_length)
    rows = min(cfg.batch_size, cfg.num_samples)
    kept = cfg.num_samples * (cfg.gen_length + 1) * 8
    terms = [
        logits_term(rows, width, vocab_size(model_config), "the logits of a step"),
        Term("the samples kept to be judged", kept, "samples x (length + 1) x 8 bytes", host=True),
    ]
    weights = check_weights(where, chosen, device)
    terms += [weights.term(chosen)] if weights is not None else []
    subject = f"--gen-samples {cfg.num_samples} x --gen-length {cfg.gen_length}"
    check_fits(subject, terms, device, "lower --gen-samples or --gen-length")


def first_diffusion(models: list[str], revision: str | None = None) -> str:
    """The first diffusion checkpoint among `models` (generative perplexity samples from it)."""
    from transformers import AutoConfig

    for m in models:
        if checked_settings(AutoConfig.from_pretrained(weights_dir(m, revision)), m) is not None:
            return m
    raise AdaptError("--gen-steps needs a diffusion checkpoint among MODELS")
