"""Evaluate diffusion checkpoints and their AR sources on the same text: likelihood, accuracy, samples.

- Diffusion models: the ELBO bound on the NLL, -log p(x) <= E_t [ (1/t) sum_{masked i} -log p(x_i | x_t) ],
  estimated per sequence by Monte Carlo over `mc_samples` stratified (low-discrepancy) t values, reported
  per token with its standard error over sequences; and masked-token accuracy at fixed mask ratios.
  Block-diffusion checkpoints get their own bound: the sum over blocks of the same expectation for each
  block given the clean blocks before it (one t per block), computed in one pass as in training.
- AR models (no diffusion settings): the exact teacher-forced NLL on the same windows, so both sit in
  one table. With shift (the default), both predict tokens 1..L-1 of each window from what precedes.
- Generative perplexity (MDLM protocol): samples from the diffusion model scored by the source AR
  model, as a function of the number of sampling steps, with the unigram entropy of the samples
  (a low perplexity with low entropy means repetitive text, not good text).

t is drawn from U(eps, 1): the part of the integral below eps (relative size about eps) is left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from adapt.core.attention import MaskStyle
from adapt.core.boundary import about, resolve_device
from adapt.core.bounds import check_weights
from adapt.core.checkpoint import (
    DiffusionSettings,
    adapter_export,
    checked_settings,
    config_dir,
    read_settings,
)
from adapt.core.diffusion import mask_tokens, maskable_positions, masked_token_nll, sample_t
from adapt.core.errors import AdaptError, first_line
from adapt.core.flex import check_flex_architecture
from adapt.core.locate import locate, looks_like_hub_id
from adapt.evaluation.report import RESULTS_NAME, format_table, plot_results, save_results  # noqa: F401
from adapt.evaluation.sizes import check_elbo, check_gen_ppl, first_diffusion
from adapt.loading.model import load_diffusion_model
from adapt.loading.precision import weights_dtype
from adapt.loading.weights import check_finite_model, from_pretrained

ATTENTION = ("sdpa", "eager", "flex_attention")


@dataclass
class EvalConfig:
    """What to evaluate on and how hard to look."""

    data: str = ""
    """Local text/jsonl/json/parquet/csv file (or directory) with the evaluation text."""
    text_column: str = "text"
    """Column holding documents in json/jsonl/parquet/csv files."""
    seq_len: int = 128
    """Window length in tokens; the token stream (documents joined by EOS) is cut into such windows."""
    max_sequences: int = 64
    """Evaluate at most this many windows (the first ones)."""
    mc_samples: int = 8
    """Monte Carlo samples of t per window for the ELBO (stratified across the samples)."""
    mask_ratios: tuple[float, ...] = (0.15, 0.5, 0.9)
    """Mask ratios at which masked-token accuracy is measured."""
    eps: float = 1e-3
    """Smallest t drawn."""
    batch_size: int = 16
    """Rows per forward pass."""
    seed: int = 0
    dtype: str = "float32"
    device: str | None = None
    """Device; default cuda when available, else cpu."""
    attn_implementation: str = "sdpa"
    """Attention kernel of every model: sdpa, eager or flex_attention (no dense mask; long windows)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) read for every Hub id among the models; local directories have
    none (the judge of generative perplexity is read at its default branch)."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise AdaptError(f"seq_len must be at least 2, not {self.seq_len}")
        if self.mc_samples < 2:
            raise AdaptError(f"mc_samples must be at least 2 (for a standard error), not {self.mc_samples}")
        if self.max_sequences < 1 or self.batch_size < 1:
            raise AdaptError("max_sequences and batch_size must be positive")
        if self.attn_implementation not in ATTENTION:
            raise AdaptError(
                f"--attn-implementation takes {', '.join(ATTENTION)}, not {self.attn_implementation!r}"
            )
        if any(not 0 < r <= 1 for r in self.mask_ratios):
            raise AdaptError(f"mask ratios must lie in (0, 1], got {list(self.mask_ratios)}")


@dataclass
class GenPplConfig:
    """Generative perplexity: how many samples, how long, at which step counts."""

    steps: tuple[int, ...] = (8, 16, 32)
    """Sampling step counts to compare (NFE grows with them)."""
    num_samples: int = 8
    gen_length: int = 32
    batch_size: int = 8
    strategy: str = "low_confidence"
    temperature: float = 1.0
    seed: int = 0
    judge: str | None = None
    """AR model that scores the samples; default the checkpoint's source model."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further SamplingConfig fields."""


# ---------------------------------------------------------------- data


def token_windows(path: str, tokenizer: Any, seq_len: int, max_sequences: int, column: str = "text") -> Any:
    """The evaluation text as non-overlapping windows of `seq_len` token ids. -> long [n, l]"""
    from adapt.training.data import load_raw, tokenize_documents

    ds = load_raw(path)
    if column not in ds.column_names:
        raise AdaptError(f"{path} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    docs, _ = tokenize_documents(ds, tokenizer, column, None)
    stream = [tok for doc in docs for tok in doc]
    n = min(len(stream) // seq_len, max_sequences)
    if n == 0:
        raise AdaptError(f"{path} has {len(stream)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ---------------------------------------------------------------- estimators


def elbo_samples(
    model: Any,
    windows: torch.Tensor,
    settings: DiffusionSettings,
    mc_samples: int,
    batch_size: int = 16,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window, per-sample ELBO estimates of the NLL per token, and the token counts.

    windows [n, l] -> (estimates [n, k] in nats per predicted token, tokens [n]). Sample j of window i
    masks each maskable token with probability t_ij and gives (1/t_ij) * sum_masked CE / tokens_i; the
    k values of t for one window are stratified over (eps, 1). Tokens under `prompt_mask` [n, l] are
    context only: never masked, never scored (the lm-eval continuation likelihood).
    Block-diffusion checkpoints draw one t per block (see `elbo_noise`).
    """
    ids, masked, t, tokens = elbo_noise(windows, settings, mc_samples, eps, generator, prompt_mask)
    sums = masked_nll_sums(model, ids, masked, t, settings, batch_size)  # [n*k]
    estimates = sums / tokens.repeat_interleave(mc_samples).double()  # [n*k]
    return estimates.view(-1, mc_samples), tokens


def elbo_noise(
    windows: torch.Tensor,
    settings: DiffusionSettings,
    mc_samples: int,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k noisy copies of each window the ELBO averages over.

    windows [n, l] -> (ids [n*k, l] (window i repeated k times), masked bool [n*k, l], t [n*k, l] per
    token, tokens [n] scored per window). Each block of a window draws its own t (BD3-LM's bound sums
    one ELBO per block given the clean blocks before it; without a block size the window is one block);
    the k values of t of one block are stratified over (eps, 1).
    """
    n, length = windows.shape
    maskable = maskable_positions(torch.ones(n, length, dtype=torch.long), settings.shift, prompt_mask)
    block = int(settings.block_size or length)
    blocks = -(-length // block)
    t = torch.stack([sample_t(mc_samples, eps, True, generator) for _ in range(n * blocks)])  # [n*nb, k]
    t = t.view(n, blocks, mc_samples).transpose(1, 2).reshape(n * mc_samples, blocks)  # [n*k, nb]
    t_tok = t[:, torch.arange(length) // block]  # [n*k, l] each token the t of its block
    ids = windows.repeat_interleave(mc_samples, 0)  # [n*k, l]
    rows_maskable = maskable.repeat_interleave(mc_samples, 0)
    masked = (torch.rand(ids.shape, generator=generator) < t_tok) & rows_maskable
    return ids, masked, t_tok, maskable.sum(-1)


def masked_nll_sums(
    model: Any,
    ids: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    settings: DiffusionSettings,
    batch_size: int,
    hits: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row: sum over masked tokens of CE / t (with `hits`: the number of argmax hits).

    ids, masked, t [rows, l] -> float64 [rows]. `attention_mask` [rows, l] (0/1) hides right padding,
    so a padded row scores as it does alone.
    """
    if settings.block_size:
        return block_masked_nll(model, ids, masked, t, settings, batch_size, hits, attention_mask)
    device = next(model.parameters()).device
    noisy = ids.masked_fill(masked, settings.mask_token_id)
    out = torch.zeros(ids.shape[0], dtype=torch.float64)
    for s in range(0, ids.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        am = None if attention_mask is None else attention_mask[sl].to(device)
        logits = forward(model, noisy[sl].to(device), am)  # [b, l, V]
        nll, rows, correct = masked_token_nll(
            logits, ids[sl].to(device), masked[sl].to(device), settings.shift
        )
        rows = rows.cpu()
        cols = masked[sl].nonzero(as_tuple=True)[1]
        value = correct.double().cpu() if hits else nll.double().cpu() / t[sl][rows, cols].double()
        out[sl] += torch.zeros(logits.shape[0], dtype=torch.float64).index_add(0, rows, value)
    return out


def masked_accuracy(
    model: Any,
    windows: torch.Tensor,
    settings: DiffusionSettings,
    ratio: float,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[float, int]:
    """Argmax accuracy at the masked positions when each maskable token is masked with prob `ratio`.

    -> (accuracy, number of masked positions), pooled over all windows.
    """
    if settings.block_size:
        return block_masked_accuracy(model, windows, settings, ratio, batch_size, generator)
    device = next(model.parameters()).device
    n, length = windows.shape
    maskable = maskable_positions(torch.ones(n, length, dtype=torch.long), settings.shift)
    t = torch.full((n,), float(ratio))
    noisy, masked = mask_tokens(windows, t, settings.mask_token_id, maskable, generator)
    hits, total = 0, 0
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        logits = forward(model, noisy[sl].to(device))
        _, _, correct = masked_token_nll(
            logits, windows[sl].to(device), masked[sl].to(device), settings.shift
        )
        hits += int(correct.sum())
        total += correct.numel()
    return (hits / total if total else float("nan")), total


def block_masked_accuracy(
    model: Any,
    windows: torch.Tensor,
    settings: DiffusionSettings,
    ratio: float,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[float, int]:
    """`masked_accuracy` for a block-diffusion checkpoint (every block masked at `ratio`)."""
    n, length = windows.shape
    maskable = maskable_positions(torch.ones(n, length, dtype=torch.long), settings.shift)
    masked = (torch.rand(windows.shape, generator=generator) < ratio) & maskable
    t = torch.full(windows.shape, float(ratio))
    correct = block_masked_nll(model, windows, masked, t, settings, batch_size, hits=True)
    total = int(masked.sum())
    return (float(correct.sum()) / total if total else float("nan")), total


@torch.no_grad()
def block_masked_nll(
    model: Any,
    ids: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    settings: DiffusionSettings,
    batch_size: int,
    hits: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row: sum over masked tokens of CE / t (or, with `hits`, the number of argmax hits). -> [rows]

    `attention_mask` [rows, l] (0/1) hides right padding from both halves of the pair.
    """
    from adapt.training.objectives.block import pair_inputs
    from adapt.training.objectives.loss import TokenLoss

    device = next(model.parameters()).device
    style = MaskStyle.for_model(model, next(model.parameters()).dtype)
    loss = TokenLoss(model, fast=True)
    rows_total, length = ids.shape
    out = torch.zeros(rows_total, dtype=torch.float64)
    positions = torch.arange(length)[None].expand(rows_total, length)
    block = int(settings.block_size or length)
    for s in range(0, rows_total, batch_size):
        sl = slice(s, s + batch_size)
        # (the normaliser in the weights is not used: 1/t is applied here)
        am = torch.ones_like(ids[sl]) if attention_mask is None else attention_mask[sl]
        inputs = pair_inputs(
            ids[sl], am, positions[sl], None, masked[sl], t[sl], masked[sl], block, settings, False, style
        )
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        _, nll, correct = loss(**inputs)
        rows, cols = masked[sl].nonzero(as_tuple=True)
        value = correct.double().cpu() if hits else nll.double().cpu() / t[sl][rows, cols].double()
        out[sl] += torch.zeros(ids[sl].shape[0], dtype=torch.float64).index_add(0, rows, value)
    return out


def ar_nll(model: Any, windows: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced causal NLL per predicted token of each window: (nll [n], tokens [n])."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s : s + batch_size].to(device)  # [b, l]
        logits = forward(model, ids)  # [b, l, V]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        out.append(nll.view(ids.shape[0], -1).double().mean(-1).cpu())  # [b]
    return torch.cat(out), torch.full((windows.shape[0],), windows.shape[1] - 1)


@torch.no_grad()
def forward(model: Any, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=attention_mask).logits


def summarize(per_window: torch.Tensor, tokens: torch.Tensor) -> dict[str, float | int]:
    """Token-weighted mean NLL, its standard error over windows, and the perplexity. per_window [n]."""
    w = tokens.double() / tokens.double().sum()
    nll = float((w * per_window).sum())
    n = per_window.numel()
    se = float(per_window.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    ppl = math.exp(nll) if nll < 700 else math.inf  # math.exp overflows past ~709
    return {"nll": nll, "nll_stderr": se, "ppl": ppl, "sequences": n, "tokens": int(tokens.sum())}


# ---------------------------------------------------------------- models


def revision_for(name: str, revision: str | None) -> str | None:
    """`revision` for a Hub id; None for a local directory, which has no revisions."""
    return revision if looks_like_hub_id(name) else None


def model_config(path: str, seq_len: int | None = None, revision: str | None = None) -> Any:
    """The config of a model directory or Hub id (at `revision`), checked (settings, `seq_len` against its
    context). A Hub id is resolved by `adapt.core.locate`: its refusals are adapt's one line."""
    from transformers import AutoConfig

    from adapt.sampling.engine import context_length

    where = locate(path, revision)
    adapter = adapter_export(str(where))
    try:
        config = AutoConfig.from_pretrained(config_dir(adapter) if adapter else where)
    except Exception as e:
        raise AdaptError(f"cannot load model {path!r}: {first_line(e)}") from None
    checked_settings(config, path)
    limit = context_length(config)
    if seq_len is not None and limit is not None and seq_len > limit:
        raise AdaptError(f"--seq-len {seq_len} is longer than the context of {path} ({limit} tokens)")
    return config


def load_any(
    path: str,
    dtype: str = "float32",
    device: str | None = None,
    revision: str | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any, Any]:
    """A model directory or Hub id (at `revision`): (model in eval mode, tokenizer, diffusion settings or
    None for AR); a LoRA adapter export is merged onto its base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = locate(path, revision)
    adapter = adapter_export(str(where))
    if adapter is not None:
        return load_diffusion_model(adapter, dtype, device, attn_implementation)
    config = model_config(str(where))
    device = resolve_device(device)
    dtype_ = weights_dtype(dtype, device)[0]
    check_weights(where, dtype_, device)
    what = f"cannot load the model {path}"
    with about(what):
        model = from_pretrained(
            AutoModelForCausalLM, where, what, dtype=dtype_, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(where)
    check_finite_model(model.to(device), what)
    return model.eval(), tokenizer, read_settings(config)


def evaluate_model(path: str, config: EvalConfig) -> dict[str, Any]:
    """One row of the results table for a diffusion checkpoint or an AR model."""
    revision = revision_for(path, config.revision)
    if config.attn_implementation == "flex_attention":
        check_flex_architecture(model_config(path, None, revision))
    model, tokenizer, settings = load_any(
        path, config.dtype, config.device, revision, config.attn_implementation
    )
    windows = token_windows(config.data, tokenizer, config.seq_len, config.max_sequences, config.text_column)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    check_elbo(path, config, model.config, len(windows), held)  # the real number of windows
    gen = torch.Generator().manual_seed(config.seed)
    if settings is None:
        per_window, tokens = ar_nll(model, windows, config.batch_size)
        return {"model": path, "kind": "ar", **summarize(per_window, tokens)}
    est, tokens = elbo_samples(
        model, windows, settings, config.mc_samples, config.batch_size, config.eps, gen
    )
    row = {"model": path, "kind": "diffusion", **summarize(est.mean(1), tokens)}
    row["mc_samples"] = config.mc_samples
    row["shift"] = settings.shift
    row["block_size"] = settings.block_size
    row["masked_accuracy"] = {
        str(r): masked_accuracy(model, windows, settings, r, config.batch_size, gen)[0]
        for r in config.mask_ratios
    }
    return row


def evaluate(models: Sequence[str], config: EvalConfig, gen: GenPplConfig | None = None) -> dict[str, Any]:
    """The results of every model on the same text: {"dataset", "seq_len", "models": [rows]}, and with `gen`
    the generative perplexity of the first diffusion checkpoint ("gen_ppl"). Every size is checked
    (`adapt.evaluation.sizes`) before the first model loads."""
    from adapt.core.version import __version__

    if not config.data:
        raise AdaptError("no evaluation data given (--data FILE)")
    if config.revision is not None and not any(looks_like_hub_id(m) for m in models):
        raise AdaptError(f"--revision {config.revision} applies to Hub ids; {', '.join(models)}: local paths")
    for m in models:  # every model checked before the first one is evaluated
        check_elbo(m, config, model_config(m, config.seq_len, revision_for(m, config.revision)))
    first = first_diffusion(list(models), config.revision) if gen is not None else ""
    if gen is not None:
        check_gen_ppl(first, gen, config.dtype, config.device, config.revision)
    rows = [check_finite_row(evaluate_model(m, config)) for m in models]
    cfg = asdict(config)
    out = {"adapt_version": __version__, "dataset": config.data, "seq_len": config.seq_len, "config": cfg,
           "models": rows}  # fmt: skip
    if gen is not None:
        out["gen_ppl"] = generative_perplexity_of(first, gen, config.dtype, config.device, config.revision)
    return out


def check_finite_row(row: dict[str, Any]) -> dict[str, Any]:
    """Refuse a NaN or infinite NLL or perplexity (weights that are finite but overflow): no table of them."""
    bad = [f"{k}={row[k]}" for k in ("nll", "ppl") if not math.isfinite(row[k])]
    if bad:
        raise AdaptError(
            f"the evaluation of {row['model']} is not finite ({', '.join(bad)}): its outputs overflow or are "
            "NaN; nothing written (under bfloat16 or float16, try --dtype float32)"
        )
    return row


# ---------------------------------------------------------------- generative perplexity


def generative_perplexity(
    model: Any,
    tokenizer: Any,
    settings: DiffusionSettings,
    judge: Any,
    judge_tokenizer: Any,
    cfg: GenPplConfig,
) -> list[dict[str, Any]]:
    """Samples at each step count, scored by the AR `judge`: one dict per step count."""
    from adapt.sampling import SamplingConfig, generate

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompts = [[bos]] * cfg.num_samples
    out = []
    for steps in cfg.steps:
        texts, ids, nfe = [], [], 0
        for s in range(0, cfg.num_samples, cfg.batch_size):
            sc = SamplingConfig(
                gen_length=cfg.gen_length, steps=steps, strategy=cfg.strategy, temperature=cfg.temperature,
                seed=cfg.seed + s, stop_at_eos=False, **cfg.extra,
            )  # fmt: skip
            res = generate(model, tokenizer, prompts[s : s + cfg.batch_size], sc, settings)
            texts += list(res.texts)
            ids += [list(x) for x in res.sequences]
            nfe = res.nfe
        nll, count = judge_nll(judge, judge_tokenizer, texts)
        entropy = sum(unigram_entropy(x) for x in ids) / len(ids)
        ppl = math.exp(nll / max(count, 1))
        out.append(
            {
                "steps": steps,
                "nfe": nfe,
                "gen_ppl": ppl,
                "tokens": count,
                "entropy": entropy,
                "example": texts[0],
            }
        )
    return out


def generative_perplexity_of(
    path: str,
    cfg: GenPplConfig,
    dtype: str = "float32",
    device: str | None = None,
    revision: str | None = None,
) -> list[dict[str, Any]]:
    """Load a diffusion checkpoint (at `revision` when a Hub id) and its judge (cfg.judge or the recorded
    source) and run the protocol."""
    check_gen_ppl(path, cfg, dtype, device, revision)
    model, tokenizer, settings = load_any(path, dtype, device, revision_for(path, revision))
    if settings is None:
        raise AdaptError(f"{path} is not a diffusion checkpoint; generative perplexity needs one")
    judge_path = cfg.judge or settings.source_model
    if not judge_path:
        raise AdaptError(f"{path} records no source model; pass --judge AR_MODEL")
    judge, judge_tok, judge_settings = load_any(judge_path, dtype, device)
    if judge_settings is not None:
        raise AdaptError(f"judge {judge_path} is a diffusion checkpoint; it must be an autoregressive model")
    return generative_perplexity(model, tokenizer, settings, judge, judge_tok, cfg)


@torch.no_grad()
def judge_nll(judge: Any, tokenizer: Any, texts: list[str]) -> tuple[float, int]:
    """Total causal NLL of `texts` under the AR judge (each prefixed by BOS when it has one), and tokens."""
    device = next(judge.parameters()).device
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    total, count = 0.0, 0
    for text in texts:
        ids = start + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], device=device)  # [1, l]
        logits = judge(input_ids=x).logits[0, :-1].float()  # [l-1, V]
        total += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
        count += len(ids) - 1
    return total, count


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy in nats of the token frequency distribution of one sample."""
    if not ids:
        return 0.0
    counts = torch.bincount(torch.tensor(list(ids))).double()
    p = counts[counts > 0] / len(ids)
    return float(-(p * p.log()).sum())
