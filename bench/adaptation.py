"""Adaptation evidence: diffusion-train the same architecture on the same data, same steps, from

- `adapted`:    the pretrained AR weights (SmolLM2-135M-Instruct, converted on the fly), the defaults;
- `scratch`:    random initialisation of the same config (same tokenizer);
- `no-anneal`:  pretrained, attention annealing off (bidirectional from step 0);
- `no-shift`:   pretrained, shift off (logits at i predict token i instead of i + 1);

then report held-out ELBO perplexity bound and masked-token accuracy, plus the held-out diffusion loss
curve of each run (PNG + JSON + markdown table). Slow: a script, not a test.

    python bench/adaptation.py --steps 100 --set training.lr=5e-5   # the README's figures
    python bench/adaptation.py --steps 30 --variants adapted,scratch
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# This bench measures the full-attention objective (the quickstart recipe now adapts with blocks;
# bench/block_adaptation.py compares the two objectives).
FULL_ATTENTION = [
    "diffusion.block_size=null",
    "diffusion.block_schedule=null",
    "diffusion.clean_attention=block",  # (the quickstart recipe trains the joint objective)
    "diffusion.ar_loss_weight=0",
    "diffusion.anneal_steps=10",
]
VARIANTS = {
    "adapted": [],
    "scratch": ["@scratch"],
    "no-anneal": ["diffusion.anneal_steps=0"],
    "no-shift": ["model.shift=false"],
}


def scratch_model(source: Path, root: Path) -> Path:
    """The source's architecture and tokenizer with random weights (seed 0), saved once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = root / "scratch-init"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def run_variant(name: str, args: argparse.Namespace, source: Path, data: tuple[Path, Path]) -> dict:
    from adapt.evaluation.evaluate import EvalConfig, evaluate_model
    from adapt.training.config import load_recipe
    from adapt.training.run import run

    out = args.out / name
    extra = [o for o in VARIANTS[name] if not o.startswith("@")]
    path = scratch_model(source, args.out) if "@scratch" in VARIANTS[name] else source
    overrides = [
        f"model.path={path}",
        f"data.path={data[0]}",
        f"data.eval_path={data[1]}",
        f"training.output_dir={out}",
        f"training.max_steps={args.steps}",
        f"training.eval_every={max(args.steps // 6, 1)}",
        f"training.checkpoint_every={args.steps}",
        "training.resume=false",
        "logging.progress_bar=false",
        *FULL_ATTENTION,
        *extra,
        *args.set,
    ]
    clock = time.perf_counter()
    _, exported = run(load_recipe(args.recipe, overrides), force=True)  # a rerun replaces its own run
    seconds = time.perf_counter() - clock
    cfg = EvalConfig(data=str(data[1]), seq_len=64, max_sequences=args.eval_windows, mc_samples=4)
    row = evaluate_model(str(exported), cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    row["eval_curve"] = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    row["accuracy_curve"] = [(m["step"], m["eval_accuracy"]) for m in metrics if "eval_accuracy" in m]
    row["train_seconds"] = seconds
    return row


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in rows.items():
        for ax, key in ((loss_ax, "eval_curve"), (acc_ax, "accuracy_curve")):
            if row.get(key):
                steps, values = zip(*row[key], strict=True)
                ax.plot(steps, values, marker="o", label=name)
    loss_ax.set_ylabel("held-out diffusion loss (nats/token, ELBO)")
    acc_ax.set_ylabel("held-out masked-token accuracy")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("optimizer step")
        ax.legend()
    fig.suptitle("SmolLM2-135M: diffusion adaptation vs from scratch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| run | ELBO ppl bound | ± s.e. (nll) | acc@0.15 | acc@0.5 | acc@0.9 | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        acc = r["masked_accuracy"]
        lines.append(
            f"| {name} | {r['ppl']:.1f} | {r['nll_stderr']:.3f} | {acc['0.15']:.3f} | {acc['0.5']:.3f} "
            f"| {acc['0.9']:.3f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    from adapt.sources import smollm2, write_corpus

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument(
        "--recipe", default=str(Path(__file__).resolve().parents[1] / "recipes/quickstart.yaml")
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/adaptation"))
    parser.add_argument("--set", nargs="*", default=[], help="extra recipe overrides, key.sub=value")
    args = parser.parse_args()
    source, data = smollm2(), write_corpus("wiki")
    rows = {name: run_variant(name, args, source, data) for name in args.variants.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / "adaptation.png")
    print(f"{args.steps} steps each, batch 4 x 64 tokens, held-out Wikipedia text")
    print(table(rows))
    print(f"plot: {args.out / 'adaptation.png'}")


if __name__ == "__main__":
    main()
