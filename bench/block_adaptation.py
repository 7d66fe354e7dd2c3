"""Block diffusion vs full-attention diffusion adapted from the same AR model at the same token budget.

Train the runs first (same model, data, steps, batch and lr; only the objective differs), e.g. on
SmolLM2-135M-Instruct and the quickstart's Wikipedia text (`python -m adapt.demo` prepares both):

    C=~/.cache/adapt; COMMON="model.path=$C/smollm2-135m-instruct data.path=$C/corpora/wiki-train.jsonl \
      data.eval_path=$C/corpora/wiki-eval.jsonl data.max_length=128 training.batch_size=8 \
      training.max_steps=300 training.warmup_steps=10 training.lr=2e-4 training.eval_every=25 \
      training.eval_batches=8 training.mixed_precision=bf16"
    python finetune.py recipes/quickstart.yaml $COMMON diffusion.block_size=8 \
      "diffusion.block_schedule=[[0, 1], [50, 4], [100, 8]]" diffusion.clean_attention=block \
      diffusion.ar_loss_weight=0 training.output_dir=runs/block
    python finetune.py recipes/quickstart.yaml $COMMON diffusion.block_size=null \
      diffusion.block_schedule=null diffusion.clean_attention=block diffusion.ar_loss_weight=0 \
      diffusion.anneal_steps=10 training.output_dir=runs/full
    python bench/block_adaptation.py --runs block=runs/block full=runs/full

Then this script reports, for each run: the held-out bound (each checkpoint's own: the block bound for
block diffusion, the ELBO for full attention; both upper-bound the NLL per token, with s.e.) beside the
AR source's exact perplexity on the same windows; samples continuing held-out prompts, judged by the AR
source (perplexity, unigram entropy, forward passes per token); and one plot of the held-out bound
logged during training against tokens seen (with the from-scratch curve of bench/adaptation.py when
its results are there, at its own window length).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from sample_speed import judge_nlls, prompts_from, read_documents  # noqa: E402

from adapt.evaluation.evaluate import EvalConfig, evaluate_model, summarize, unigram_entropy  # noqa: E402
from adapt.loading.model import load_diffusion_model  # noqa: E402
from adapt.sampling import SamplingConfig, generate  # noqa: E402


def curve(run: Path) -> list[tuple[int, float]]:
    """(tokens seen, held-out loss) at every evaluation the run logged."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens = {m["step"]: m["tokens_seen"] for m in rows if "tokens_seen" in m}
    steps = sorted(tokens)
    per_step = tokens[steps[-1]] / steps[-1] if steps else 0
    return [
        (int(tokens.get(m["step"], m["step"] * per_step)), m["eval_loss"]) for m in rows if "eval_loss" in m
    ]


def sampling_config(block_size: int | None, gen_length: int, threshold: float) -> SamplingConfig:
    """Each objective decoded its best known way: block diffusion with threshold decoding and its exact
    cache; full attention one token per step in semi-autoregressive blocks of 16, no approximate cache."""
    if block_size:
        return SamplingConfig(
            gen_length=gen_length,
            strategy="threshold",
            threshold=threshold,
            cache="prefix",
            stop_at_eos=False,
        )
    return SamplingConfig(gen_length=gen_length, block_length=16, cache="none", stop_at_eos=False)


def sample_row(path: Path, judge, prompts: list[list[int]], args) -> dict:  # noqa: ANN001
    model, tokenizer, settings = load_diffusion_model(path, dtype=args.dtype, device="cpu")
    config = sampling_config(settings.block_size, args.gen_length, args.threshold)
    outputs, nfe, seconds = [], 0, 0.0
    for p in prompts:
        out = generate(model, tokenizer, [p], config, settings)
        outputs += out.sequences
        nfe += out.nfe
        seconds += out.seconds
    return judged(outputs, judge, prompts, tokenizer) | {
        "passes_per_token": nfe / (len(prompts) * args.gen_length),
        "tokens_per_s": sum(len(o) for o in outputs) / seconds,
    }


def judged(outputs: list[list[int]], judge, prompts: list[list[int]], tokenizer) -> dict:  # noqa: ANN001
    nlls = torch.tensor(judge_nlls(judge, prompts, outputs, "cpu"), dtype=torch.float64)
    summary = summarize(nlls, torch.tensor([len(o) for o in outputs]))
    return {
        "judge_ppl": summary["ppl"],
        "judge_nll_se": summary["nll_stderr"],
        "entropy": sum(unigram_entropy(o) for o in outputs) / len(outputs),
        "samples": [tokenizer.decode(o) for o in outputs[:3]],
    }


@torch.no_grad()
def ar_row(judge, prompts: list[list[int]], gen_length: int, tokenizer) -> dict:  # noqa: ANN001
    outputs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = judge.generate(
            input_ids=ids, max_new_tokens=gen_length, min_new_tokens=gen_length, do_sample=False
        )
        outputs.append(out[0, ids.shape[1] :].tolist())
    return judged(outputs, judge, prompts, tokenizer) | {"passes_per_token": 1.0}


def plot(curves: dict[str, list[tuple[int, float]]], ar_nll: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in curves.items():
        if points:
            x, y = zip(*points, strict=True)
            ax.plot(x, y, marker="o", label=name)
    ax.axhline(ar_nll, color="grey", linestyle="--", label="AR source (exact NLL)")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("held-out bound on NLL (nats/token)")
    ax.set_title("SmolLM2-135M adapted on Wikipedia: block vs full-attention diffusion")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| model | held-out bound (ppl) | s.e. (nats) | judge ppl (± s.e.) | entropy | passes/token |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        band = r["judge_ppl"] * (math.exp(r["judge_nll_se"]) - 1)
        bound = f"{'<= ' if r.get('kind') == 'diffusion' else ''}{r['ppl']:.1f}" if "ppl" in r else ""
        se = f"{r['nll_stderr']:.3f}" if "nll_stderr" in r else ""
        lines.append(
            f"| {name} | {bound} | {se} | {r['judge_ppl']:.2f} ± {band:.2f} | {r['entropy']:.2f} "
            f"| {r['passes_per_token']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--runs", nargs="+", required=True, help="NAME=OUTPUT_DIR of finished runs (final/ inside)"
    )
    ap.add_argument("--source", default=str(Path("~/.cache/adapt/smollm2-135m-instruct").expanduser()))
    ap.add_argument("--eval-data", default=str(Path("~/.cache/adapt/corpora/wiki-eval.jsonl").expanduser()))
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--mc-samples", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-length", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = ap.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs)
    cfg = EvalConfig(
        data=args.eval_data,
        seq_len=args.seq_len,
        max_sequences=args.windows,
        mc_samples=args.mc_samples,
        device="cpu",
    )
    judge = AutoModelForCausalLM.from_pretrained(args.source).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.source)
    prompts = prompts_from(tokenizer, read_documents(Path(args.eval_data)), args.prompts, args.prompt_length)
    prompts = [[tokenizer.bos_token_id, *p] if tokenizer.bos_token_id is not None else p for p in prompts]
    rows: dict[str, dict] = {
        "AR source, greedy": evaluate_model(args.source, cfg)
        | ar_row(judge, prompts, args.gen_length, tokenizer)
    }
    curves = {}
    for name, run in runs.items():
        final = Path(run) / "final"
        rows[name] = evaluate_model(str(final), cfg) | sample_row(final, judge, prompts, args)
        curves[name] = curve(Path(run))
    scratch = ROOT / "bench/results/adaptation.json"
    if scratch.is_file() and "scratch" in (old := json.loads(scratch.read_text())):
        curves["from scratch, full attention (bench/adaptation.py, 64-token windows)"] = [
            (step * 4 * 64, loss) for step, loss in old["scratch"]["eval_curve"]
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    plot(curves, rows["AR source, greedy"]["nll"], args.out / "block_adaptation.png")
    record = {"settings": vars(args) | {"runs": runs}, "rows": rows, "curves": curves}
    (args.out / "block_adaptation.json").write_text(json.dumps(record, indent=2, default=str))
    print(table(rows))
    for name, r in rows.items():
        print(f"\n{name}:")
        for s in r["samples"]:
            print(f"  - {s[:300]!r}")
    print(f"\nplot: {args.out / 'block_adaptation.png'}")


if __name__ == "__main__":
    main()
