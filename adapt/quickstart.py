"""The main job: convert a real pretrained causal LM, diffusion-fine-tune it, evaluate, sample.

Everything comes from packages (see adapt/sources.py), so it runs offline on a CPU in minutes:

    python -m adapt.demo              # SmolLM2-135M-Instruct on Wikipedia text
    python -m adapt.demo --tiny       # a tiny random llama on the embedded sample text (seconds)
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapt.core.errors import AdaptError

if TYPE_CHECKING:
    from adapt.sampling.config import GenerationOutput

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
PROMPTS = ("The history of the city", "In mathematics, a function is", "The river")


@dataclass
class QuickstartResult:
    """What the job measured; printed as a report and saved as quickstart.json."""

    source: str
    exported: str
    seconds: dict[str, float] = field(default_factory=dict)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)


FOLDER_MARKER = ".adapt-quickstart"
WRITES = {"tiny-source", "tiny-train.jsonl", "tiny-eval.jsonl", "converted", "run", "quickstart.json"}
"""What the quickstart writes in its folder; a folder holding anything else is refused."""


def claim_folder(out: Path) -> Path:
    """The quickstart's working folder: new, empty, or an earlier quickstart's (its marker inside and
    nothing the quickstart does not write), so that no file of the user's is overwritten."""
    if out.exists() and not out.is_dir():
        raise AdaptError(f"--out {out} is a file; choose a new or empty directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [n for n in entries if n not in WRITES and n != FOLDER_MARKER]
    if entries and (foreign or not (out / FOLDER_MARKER).is_file()):
        named = ", ".join((foreign or entries)[:3])
        raise AdaptError(
            f"--out {out} holds files the quickstart did not write ({named}); choose a new or empty directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / FOLDER_MARKER).write_text("adapt quickstart working folder\n")
    return out


def discard_earlier_run(run_dir: Path) -> None:
    """An earlier quickstart's run (checkpoints, metrics, export) is the quickstart's own: removed, except
    any file adapt did not write, which is kept and named."""
    from adapt.core.ownership import remove_owned
    from adapt.training.metrics import METRICS
    from adapt.training.outdir import EARLIER, ENGINE_FILE, set_aside

    if not any((run_dir / name).exists() for name in EARLIER):
        return
    aside = set_aside(run_dir)
    for d in [*sorted(aside.glob("checkpoints/*")), aside / "final"]:
        if d.is_dir():
            remove_owned(d)
    for name in (METRICS, ENGINE_FILE):
        (aside / name).unlink(missing_ok=True)
    for d in (aside / "checkpoints", aside):
        with contextlib.suppress(OSError):
            d.rmdir()


def prepare(out: Path, tiny: bool) -> tuple[Path, Path, Path]:
    """(AR source model, train file, eval file): the packaged real ones, or tiny offline stand-ins."""
    if not tiny:
        from adapt.sources import smollm2, write_corpus

        train, held_out = write_corpus("wiki")
        return smollm2(), train, held_out
    from adapt.tiny import SAMPLE_TEXT, build_tiny_model

    source = out / "tiny-source"
    if not (source / "config.json").is_file():
        build_tiny_model("llama", source, tie_word_embeddings=True)  # tied, as SmolLM2 is
    docs = [p for p in SAMPLE_TEXT.split("\n") if p.strip()]
    train, held_out = out / "tiny-train.jsonl", out / "tiny-eval.jsonl"
    train.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs * 8))
    held_out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return source, train, held_out


def run_quickstart(
    out: str | Path = "out/quickstart", tiny: bool = False, steps: int | None = None
) -> QuickstartResult:
    """convert -> fine-tune -> evaluate (before/after, vs the AR source) -> sample; returns the figures."""
    from adapt.conversion.convert import convert
    from adapt.training.config import load_recipe
    from adapt.training.run import run

    out = claim_folder(Path(out))
    clock = time.perf_counter()
    source, train_file, eval_file = prepare(out, tiny)
    converted = out / "converted"
    if not (converted / "config.json").is_file():
        convert(str(source), converted)
    seconds = {"prepare+convert": time.perf_counter() - clock}

    overrides = [
        f"model.path={converted}",
        f"data.path={train_file}",
        f"data.eval_path={eval_file}",
        f"training.output_dir={out / 'run'}",
        "training.resume=false",
        "logging.progress_bar=true",
    ]
    if steps is not None:
        overrides.append(f"training.max_steps={steps}")
    recipe = load_recipe(RECIPE, overrides)
    discard_earlier_run(out / "run")
    clock = time.perf_counter()
    state, exported = run(recipe)
    seconds["fine-tune"] = time.perf_counter() - clock
    if exported is None:
        raise AdaptError("training was interrupted; the last checkpoint is in " + str(out / "run"))

    result = QuickstartResult(source=str(source), exported=str(exported), seconds=seconds)
    result.train_loss = _loss_curve(out / "run")
    clock = time.perf_counter()
    result.eval_rows = _evaluate([str(source), str(converted), str(exported)], eval_file, tiny)
    seconds["evaluate"] = time.perf_counter() - clock
    clock = time.perf_counter()
    result.samples = _sample(exported, source)
    seconds["sample"] = time.perf_counter() - clock
    (out / "quickstart.json").write_text(json.dumps(result.__dict__, indent=2, default=str))
    return result


def _loss_curve(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def _evaluate(models: list[str], eval_file: Path, tiny: bool) -> list[dict[str, Any]]:
    from adapt.evaluation.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(data=str(eval_file), seq_len=64, max_sequences=4 if tiny else 16, mc_samples=4)
    return evaluate(models, cfg)["models"]


def _sample(exported: Path, source: Path) -> list[dict[str, Any]]:
    """The AR source's own greedy output and tokens/s beside the adapted model's: `verify` (its AR greedy
    output, drafted by diffusion) and threshold decoding (diffusion alone), prompt by prompt, float32."""
    from transformers import AutoModelForCausalLM

    from adapt.loading.model import load_diffusion_model
    from adapt.sampling import SamplingConfig, generate

    model, tokenizer, settings = load_diffusion_model(exported)
    judge = AutoModelForCausalLM.from_pretrained(source).eval()
    ar = [_ar_source(judge, tokenizer, p) for p in PROMPTS]
    rows = [_row("AR source, greedy generate", ar, judge, tokenizer)]
    configs = {"adapted, threshold 0.9": SamplingConfig(gen_length=GEN, strategy="threshold")}
    if settings.block_size and settings.clean_attention == "causal" and settings.ar_loss_weight:
        configs = {"adapted, verify": SamplingConfig(gen_length=GEN, strategy="verify"), **configs}
    for name, cfg in configs.items():
        outputs = [generate(model, tokenizer, [p], cfg, settings) for p in PROMPTS]
        rows.append(_row(name, outputs, judge, tokenizer))
    return rows


GEN = 32


def _ar_source(model: Any, tokenizer: Any, prompt: str) -> GenerationOutput:
    """The AR source's greedy `generate` with its KV cache (one forward pass per token)."""
    import torch

    from adapt.sampling.config import GenerationOutput

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    clock = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=GEN, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - clock
    new = out[0, ids.shape[1] :].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    return GenerationOutput([new], [text], len(new), len(new), seconds, len(new))


def _row(name: str, outputs: list[GenerationOutput], judge: Any, tokenizer: Any) -> dict[str, Any]:
    """One sample row over the prompts (one output each): texts, passes, tokens/s, acceptance, judge ppl."""
    from adapt.evaluation.evaluate import judge_nll
    from adapt.sampling.config import acceptance, add_counts

    texts = [p + o.texts[0] for p, o in zip(PROMPTS, outputs, strict=True)]
    nll, count = judge_nll(judge, tokenizer, texts)
    drafted, accepted = [], []
    for o in outputs:
        drafted, accepted = add_counts(drafted, o.drafted), add_counts(accepted, o.accepted)
    tokens = sum(len(o.sequences[0]) for o in outputs)
    return {
        "strategy": name,
        "nfe": sum(o.nfe for o in outputs),
        "tokens": tokens,
        "tokens_per_second": tokens / max(sum(o.seconds for o in outputs), 1e-9),
        "acceptance": acceptance(accepted, drafted),
        "judge_perplexity": math.exp(nll / max(count, 1)),
        "texts": texts,
    }


def report(result: QuickstartResult) -> str:
    """A plain-text report of the run for the terminal."""
    lines = [f"source model: {result.source}", f"exported diffusion checkpoint: {result.exported}", ""]
    if result.train_loss:
        lines.append(f"train loss: {result.train_loss[0]:.3f} -> {result.train_loss[-1]:.3f}")
    lines.append("held-out text (perplexity: exact for the AR model, ELBO bound for diffusion):")
    names = ["AR source", "converted (no training)", "fine-tuned diffusion"]
    for name, row in zip(names, result.eval_rows, strict=True):
        acc = row.get("masked_accuracy", {})
        accs = "  ".join(f"acc@{k}={v:.3f}" for k, v in acc.items())
        lines.append(f"  {name:<26} ppl={row['ppl']:>10.2f}  {accs}")
    for s in result.samples:
        lines.append("")
        accepted = (
            " (drafts accepted by position: " + " ".join(f"{a:.2f}" for a in s["acceptance"]) + ")"
            if s.get("acceptance")
            else ""
        )
        lines.append(
            f"samples, {s['strategy']}: {s['tokens']} tokens in {s['nfe']} forward passes, "
            f"{s['tokens_per_second']:.1f} tok/s, judge perplexity {s['judge_perplexity']:.1f}{accepted}"
        )
        lines += [f"  > {t!r}" for t in s["texts"]]
    lines.append("")
    lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items()))
    return "\n".join(lines)
