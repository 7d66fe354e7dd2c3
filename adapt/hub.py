"""Publish a diffusion checkpoint to the Hugging Face Hub with a generated model card.

The card (README.md with YAML metadata) is built from what the checkpoint records: the diffusion
settings in config.json, and `recipe.yaml`, `training_summary.json` and `eval_results.json` when
present. It is uploaded beside the checkpoint's files in one commit and never written into the
checkpoint directory. The token comes from the caller, `HF_TOKEN` or the standard login; it is only
handed to huggingface_hub and never printed, logged or written.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapt.checkpoint import DiffusionSettings, load_settings
from adapt.errors import AdaptError, first_line

TAGS = ["diffusion", "masked-diffusion", "adapt", "text-generation"]
BLOCK_TAG = "block-diffusion"
CARD_NAME = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SKIP_DIRS = {"__pycache__", "runs", "logs"}


@dataclass
class PushPlan:
    """What a push would upload: the checkpoint's files and the generated card."""

    checkpoint: Path
    files: list[str]
    """Paths relative to the checkpoint directory, uploaded unchanged (README.md excluded)."""
    card: str
    """The generated README.md."""

    @property
    def repo_files(self) -> list[str]:
        return sorted([*self.files, CARD_NAME])


def push(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    license: str | None = None,
    allow_non_finite: bool = False,
) -> list[str]:
    """Upload a diffusion checkpoint and its model card to `repo_id`; returns the repo paths uploaded.

    With `dry_run` nothing is contacted; the returned list is exactly what would be uploaded.
    """
    plan = plan_push(checkpoint_dir, repo_id, license=license, allow_non_finite=allow_non_finite)
    if dry_run:
        return plan.repo_files
    upload(plan, repo_id, private=private, revision=revision, token=token, commit_message=commit_message)
    return plan.repo_files


def plan_push(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    license: str | None = None,
    allow_non_finite: bool = False,
) -> PushPlan:
    """Validate the checkpoint, its recorded metrics and the repo id, list the files and build the card
    (no network)."""
    settings = load_settings(checkpoint_dir)  # refuses a non-diffusion checkpoint
    check_repo_id(repo_id)
    ckpt = Path(checkpoint_dir)
    if not allow_non_finite:
        check_recorded_metrics(ckpt)
    card = build_card(ckpt, repo_id, settings, license=license)
    return PushPlan(checkpoint=ckpt, files=checkpoint_files(ckpt), card=card)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as e:
        raise AdaptError(f"invalid repo id {repo_id!r}: {first_line(e)}") from None
    if "/" not in repo_id:
        raise AdaptError(f"invalid repo id {repo_id!r}: expected NAMESPACE/NAME")


def check_recorded_metrics(ckpt: Path) -> None:
    """Refuse to publish a checkpoint whose training summary or evaluation records NaN or infinity."""
    for name in ("training_summary.json", "eval_results.json"):
        bad = non_finite_keys(read_json(ckpt / name))
        if bad:
            raise AdaptError(
                f"{ckpt / name} records non-finite metrics ({', '.join(bad[:3])}): the model is probably "
                "broken; retrain it, or pass --allow-non-finite to publish it anyway"
            )


def non_finite_keys(data: Any, where: str = "") -> list[str]:
    """Dotted keys of NaN or infinite numbers (standard errors, undefined for one window, excepted)."""
    if isinstance(data, float):
        return [] if math.isfinite(data) or where.endswith("stderr") else [f"{where}={data}"]
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    return [bad for k, v in items for bad in non_finite_keys(v, f"{where}.{k}" if where else str(k))]


def checkpoint_files(ckpt: Path) -> list[str]:
    """Files to upload: everything but hidden files, caches, logs and an existing README.md."""
    out = []
    for p in sorted(ckpt.rglob("*")):
        rel = p.relative_to(ckpt)
        if any(part.startswith(".") or part in _SKIP_DIRS for part in rel.parts):
            continue
        if p.is_file() and rel.as_posix() != CARD_NAME:
            out.append(rel.as_posix())
    return out


# ---------------------------------------------------------------- the model card


def build_card(ckpt: Path, repo_id: str, settings: DiffusionSettings, license: str | None = None) -> str:
    """The README.md text; its metadata is validated with huggingface_hub's card tools."""
    from huggingface_hub import ModelCard, ModelCardData

    source = settings.source_model or ""
    base_model = source if is_hub_id(source) else None
    license = license or source_license(source)
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=card_tags(settings),
        license=license,
    )
    summary = read_json(ckpt / "training_summary.json")
    recipe = read_text(ckpt / "recipe.yaml")
    results = read_json(ckpt / "eval_results.json")
    sections = [
        f"# {repo_id.split('/')[-1]}",
        intro(source, base_model),
        adaptation_section(settings, summary, recipe),
        settings_section(settings),
        usage_section(repo_id, settings),
        evaluation_section(results),
    ]
    if not license:
        sections.insert(2, "License: not recorded by the source; the base model's license applies.")
    body = "\n\n".join(s for s in sections if s) + "\n"
    text = f"---\n{data.to_yaml()}\n---\n\n{body}"
    validate_card(text, ModelCard)
    return text


def card_tags(settings: DiffusionSettings) -> list[str]:
    """The card's tags: `block-diffusion` added for a block checkpoint."""
    return [*TAGS, BLOCK_TAG] if settings.block_size else list(TAGS)


def validate_card(text: str, card_cls: Any) -> None:
    """Parse the card back and check the metadata round-trips (a broken card is our bug, not the user's)."""
    try:
        card = card_cls(text, ignore_metadata_errors=False)
    except Exception as e:
        raise AdaptError(f"generated model card is invalid: {e}") from e
    meta = card.data.to_dict()
    for key in ("library_name", "tags", "pipeline_tag"):
        if not meta.get(key):
            raise AdaptError(f"generated model card is invalid: metadata lacks {key}")


def is_hub_id(name: str) -> bool:
    """True for `owner/name` strings that are not an existing local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def source_license(source: str) -> str | None:
    """License from the source model's card: a local README.md, or the Hub card (cached or fetched)."""
    if not source:
        return None
    path = Path(source)
    card_path: Path | None = path / CARD_NAME if path.is_dir() else None
    if card_path is None and is_hub_id(source):
        card_path = _cached_hub_card(source)
    if card_path is None or not card_path.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        lic = ModelCard(card_path.read_text(), ignore_metadata_errors=True).data.license
    except Exception:
        return None
    return lic if isinstance(lic, str) else None


def _cached_hub_card(repo: str) -> Path | None:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, CARD_NAME))
    except Exception:
        return None  # no card, offline, or unreachable: the license is then stated as unknown


def intro(source: str, base_model: str | None) -> str:
    if base_model:
        origin = f"[{base_model}](https://huggingface.co/{base_model})"
    elif source:
        origin = f"a local model (`{Path(source).name}`)"
    else:
        origin = "an autoregressive model"
    return (
        f"A masked diffusion language model adapted from {origin} with adapt. The causal mask was "
        "removed (`is_causal: false` in config.json) and a mask token added, so stock `transformers` "
        "loads it with bidirectional attention and no remote code. Text is generated by iteratively "
        "unmasking, not left to right."
    )


def adaptation_section(settings: DiffusionSettings, summary: dict | None, recipe: str | None) -> str:
    lines = ["## How it was adapted", ""]
    lines.append(f"- Converted with adapt {settings.adapt_version or '(unknown version)'}.")
    if summary:
        lines.append(f"- Fine-tuned on the masked-diffusion objective: {summary.get('steps', '?')} steps, ")
        lines[-1] += f"{_count(summary.get('tokens_seen'))} tokens seen"
        lines[-1] += " (LoRA, merged)." if summary.get("lora") else " (full fine-tuning)."
        for key, label in (("train_loss", "final training loss"), ("eval_loss", "final evaluation loss")):
            if isinstance(summary.get(key), (int, float)):
                lines.append(f"- {label.capitalize()}: {summary[key]:.4f}")
    else:
        lines.append("- Not fine-tuned after conversion (no training_summary.json).")
    if recipe:
        lines += ["", "Recipe:", "", "```yaml", recipe.strip(), "```"]
    return "\n".join(lines)


def settings_section(settings: DiffusionSettings) -> str:
    rows = [
        ("mask token", f"`{settings.mask_token}` (id {settings.mask_token_id})"),
        ("shift", f"{settings.shift} (logits at i predict token i+1)" if settings.shift else "False"),
        *block_rows(settings),
        ("source model", f"`{settings.source_model}`" if settings.source_model else "unknown"),
        ("source revision", settings.source_revision or "-"),
        ("format version", str(settings.format_version)),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## Diffusion settings\n\n| setting | value |\n|---|---|\n{table}"


def block_rows(settings: DiffusionSettings) -> list[tuple[str, str]]:
    """The settings row of a block checkpoint (none for full attention)."""
    b = settings.block_size
    if not b:
        return []
    how = f"autoregressive over blocks of {b} tokens, diffusion inside each block; exact KV cache"
    return [("block size", f"{b} (block diffusion: {how})")]


def usage_section(repo_id: str, settings: DiffusionSettings) -> str:
    with_adapt = (
        "import adapt\n"
        "from adapt.checkpoint import load_diffusion_model\n\n"
        f'model, tok, settings = load_diffusion_model("{repo_id}")\n'
        'out = adapt.generate(model, tok, ["The river"], adapt.SamplingConfig(gen_length=64, steps=64))\n'
        "print(out.texts[0])\n"
    )
    loop = "a minimal confidence-ordered unmasking loop"
    sample = f'adapt sample {repo_id} "The river"'
    cache = ""
    if settings.block_size:
        loop += f", block by block under the block-causal mask, blocks of {settings.block_size} tokens"
        sample = f'adapt sample {repo_id} --prompt "The river" --cache prefix'
        cache = (
            "`--cache prefix` keeps the keys and values of committed blocks: they never change, so the cache "
            "is exact (the same tokens as `--cache none`, with fewer tokens recomputed per step).\n\n"
        )
    cli = f"{sample}\nadapt eval {repo_id} --data text.txt"
    return (
        f"## Usage\n\nWith stock transformers ({loop}):\n\n"
        f"```python\n{stock_snippet(repo_id, settings)}```\n\nWith adapt installed:\n\n"
        f"```python\n{with_adapt}```\n\n{cache}```bash\n{cli}\n```"
    )


def stock_snippet(repo_id: str, settings: DiffusionSettings) -> str:
    """Sampling with stock transformers; a block checkpoint runs block-causal, earliest open block first."""
    block = settings.block_size
    shift = (
        "    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # shift: token i is read at i-1\n"
        if settings.shift
        else ""
    )
    block_mask = (
        'block = torch.arange(x.shape[1]) // model.config.diffusion["block_size"]\n'
        "attn = torch.full((len(block), len(block)), torch.finfo(model.dtype).min, dtype=model.dtype)\n"
        "attn = attn.masked_fill(block[None, :] <= block[:, None], 0.0)[None, None]  # block-causal\n"
        if block
        else ""
    )
    attend = ", attention_mask=attn" if block else ""
    earliest = (
        "    conf[:, block != block[x[0] == mask_id].min()] = -1.0  # the earliest unfinished block\n"
        if block
        else ""
    )
    return (
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'repo = "{repo_id}"\n'
        "tok = AutoTokenizer.from_pretrained(repo)\n"
        "model = AutoModelForCausalLM.from_pretrained(repo).eval()  # bidirectional: is_causal is false\n"
        "mask_id = model.config.mask_token_id\n"
        'prompt = tok("The river", return_tensors="pt").input_ids\n'
        "x = torch.cat([prompt, torch.full((1, 16), mask_id)], dim=1)\n"
        f"{block_mask}"
        "for _ in range(16):  # unmask the most confident masked position, one per step\n"
        "    with torch.no_grad():\n"
        f"        logits = model(x{attend}).logits\n"
        f"{shift}"
        "    conf, pred = logits.softmax(-1).max(-1)\n"
        "    conf[x != mask_id] = -1.0\n"
        f"{earliest}"
        "    i = conf.view(-1).argmax()\n"
        "    x.view(-1)[i] = pred.view(-1)[i]\n"
        "print(tok.decode(x[0, prompt.shape[1]:]))\n"
    )


def evaluation_section(results: dict | None) -> str:
    if not results or not results.get("models"):
        return ""
    lines = [
        "## Evaluation",
        "",
        f"On `{Path(str(results.get('dataset', '?'))).name}`, "
        f"windows of {results.get('seq_len', '?')} tokens. "
        "Diffusion rows give the ELBO bound on perplexity (Monte Carlo over t, ± one standard error); "
        "autoregressive rows give the exact perplexity.",
        "",
        "| model | kind | perplexity | NLL/token | ± s.e. | MC samples | tokens "
        "| acc@0.15 | acc@0.5 | acc@0.9 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["models"]:
        acc = row.get("masked_accuracy") or {}
        cells = [
            f"`{Path(str(row.get('model', '?'))).name}`",
            "diffusion (bound)" if row.get("kind") == "diffusion" else "autoregressive",
            _fmt(row.get("ppl"), ".2f", "≤ " if row.get("kind") == "diffusion" else ""),
            _fmt(row.get("nll"), ".4f"),
            _fmt(row.get("nll_stderr"), ".4f"),
            str(row.get("mc_samples", "-")),
            str(row.get("tokens", "-")),
            *(_fmt(acc.get(r), ".3f") for r in ("0.15", "0.5", "0.9")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    gen = results.get("gen_ppl")
    if gen:
        lines += ["", "Generative perplexity (samples judged by the source model):", ""]
        lines += ["| steps | NFE | gen. perplexity | unigram entropy |", "|---|---|---|---|"]
        for g in gen:
            lines.append(
                f"| {g.get('steps')} | {g.get('nfe')} | {_fmt(g.get('gen_ppl'), '.2f')} "
                f"| {_fmt(g.get('entropy'), '.3f')} |"
            )
    return "\n".join(lines)


def _fmt(value: Any, spec: str, prefix: str = "") -> str:
    return f"{prefix}{value:{spec}}" if isinstance(value, (int, float)) else "-"


def _count(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise AdaptError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else None


def read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


# ---------------------------------------------------------------- upload


def upload(
    plan: PushPlan,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> None:
    """One commit with the checkpoint's files (read in place) and the card (from memory)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(plan.checkpoint / f)) for f in plan.files]
    ops.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=plan.card.encode()))
    message = commit_message or f"Upload diffusion model adapted with adapt ({len(ops)} files)"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.create_commit(repo_id, ops, commit_message=message, revision=revision)
    except Exception as e:
        raise AdaptError(hub_error(e, api.endpoint, repo_id, token)) from None


def hub_error(e: Exception, endpoint: str, repo_id: str, token: str | None) -> str:
    """A one-line message for a failed upload, with any token redacted."""
    from huggingface_hub import get_token

    first = (str(e).strip().splitlines() or [""])[0]
    for secret in (token, os.environ.get("HF_TOKEN"), get_token()):
        if secret:
            first = first.replace(secret, "***")
    kind = type(e).__name__
    return f"could not push to {repo_id} on {endpoint}: {kind}: {first}; no files were committed"
