"""fp32 vs bf16 on this machine's CPU: a diffusion training step and inference forwards, in one run.

python bench/cpu_dtype.py      # llama-like, hidden 256, 4 layers, seq 256, batch 8
python bench/cpu_dtype.py --json bench/results/cpu_dtype.json
python bench/cpu_dtype.py --model /root/.cache/adapt/smollm2-135m-instruct --batch 1 --seq 128 \
    --json bench/results/cpu_dtype_smollm2.json

Training step (adapt's diffusion step: `noise_batch` + `TokenLoss`, backward, AdamW),
from the same initial weights, on the same batch and masks:
  - fp32: fp32 weights, fp32 math;
  - bf16 autocast: fp32 weights and optimizer, forward under torch.autocast(cpu, bfloat16), which is
    what `training.mixed_precision=bf16` (Accelerate) does on a CPU;
  - bf16 weights + fp32 master: the model in bf16, AdamW on fp32 master copies, copied back each step;
  - bf16 weights, bf16 AdamW: what `model.dtype=bfloat16` does today (no master copy).
Inference: a no-grad forward of the same (bidirectional) model with full logits, batch 1, on a
--query-tokens canvas (a sampling step) and on a full --seq forward, with fp32 vs bf16 weights.

All variants are timed in interleaved rounds (the CPU may be shared) and the median is reported, with
tokens/s and the ratio to fp32. The first training step's loss of each variant (identical weights and
masks) shows what bf16 does to the numbers. The CPU capability and the bf16 detection that
`adapt.loading.precision` uses for `auto` are printed first.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from train_step import build, timed  # noqa: E402

from adapt.core.checkpoint import DiffusionSettings  # noqa: E402
from adapt.loading.precision import bf16_support, resolve_inference_dtype, resolve_mixed_precision  # noqa: E402
from adapt.training.config import DiffusionConfig  # noqa: E402
from adapt.training.objectives.loss import TokenLoss  # noqa: E402
from adapt.training.objectives.masked import noise_batch  # noqa: E402


class MasterWeights:
    """bf16 model weights whose AdamW state and fp32 master copies live apart; copied back each step."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=lr)

    def step(self) -> None:
        for p, m in zip(self.params, self.master, strict=True):
            m.grad, p.grad = p.grad.float(), None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # step() already dropped the bf16 grads


def train_step(loss_module, opt, ids, step, settings, autocast: bool, mask_dtype) -> float:  # noqa: ANN001
    """One diffusion step; the masks depend only on `step`, so every variant sees the same ones."""
    gen = torch.Generator().manual_seed(step)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs = noise_batch(batch, step, gen, DiffusionConfig(), settings, mask_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _, _ = loss_module(**inputs)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


@torch.no_grad()
def forward(model: torch.nn.Module, ids: torch.Tensor) -> float:
    return float(model(input_ids=ids, use_cache=False).logits[0, -1, 0])


def load(args: argparse.Namespace) -> torch.nn.Module:
    """The fp32 model to measure: a random llama-like one, or --model's weights."""
    if args.model is None:
        return build(args.vocab, args.hidden, args.layers, args.seq)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")


def variants(args: argparse.Namespace, base: torch.nn.Module) -> dict[str, dict]:
    """name -> {fn(step) -> loss or value, tokens per call, kind, baseline name}."""
    base.config.is_causal = False  # a diffusion model: bidirectional attention
    vocab = base.config.vocab_size
    settings = DiffusionSettings(mask_token_id=vocab - 1, shift=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - 1, (args.batch, args.seq), generator=gen)
    fp32 = copy.deepcopy(base).train()
    auto = copy.deepcopy(base).train()
    master = copy.deepcopy(base).to(torch.bfloat16).train()
    pure = copy.deepcopy(base).to(torch.bfloat16).train()
    opts = {
        "fp32": torch.optim.AdamW(fp32.parameters(), lr=args.lr),
        "auto": torch.optim.AdamW(auto.parameters(), lr=args.lr),
        "master": MasterWeights(master, args.lr),
        "pure": torch.optim.AdamW(pure.parameters(), lr=args.lr),
    }
    f32, b16 = torch.float32, torch.bfloat16
    train = args.batch * args.seq

    def step(model, opt, autocast, dtype) -> Callable[[int], float]:  # noqa: ANN001
        loss_module = TokenLoss(model, fast=True)
        return lambda s: train_step(loss_module, opt, ids, s, settings, autocast, dtype)

    rows = {
        "train fp32": (step(fp32, opts["fp32"], False, f32), train, "train", "train fp32"),
        "train bf16 autocast": (step(auto, opts["auto"], True, b16), train, "train", "train fp32"),
        "train bf16 weights + fp32 master": (step(master, opts["master"], False, b16), train, "train",
                                             "train fp32"),
        "train bf16 weights, bf16 AdamW": (step(pure, opts["pure"], False, b16), train, "train",
                                           "train fp32"),
    }  # fmt: skip
    infer = {"fp32": copy.deepcopy(base).eval(), "bf16": copy.deepcopy(base).to(torch.bfloat16).eval()}
    for length in (args.query_tokens, args.seq):
        query = ids[:1, :length]
        for name, model in infer.items():
            fn = (lambda m, q: lambda s: forward(m, q))(model, query)
            rows[f"forward {length} tok {name}"] = (fn, length, "forward", f"forward {length} tok fp32")
    return {
        name: {"fn": fn, "tokens": tokens, "kind": kind, "baseline": baseline}
        for name, (fn, tokens, kind, baseline) in rows.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a causal LM directory instead of the random model")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="training length and the full forward's")
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--query-tokens", type=int, default=32, help="tokens of the short (sampling) forward")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per variant per round")
    parser.add_argument("--forwards", type=int, default=10, help="timed forwards per variant per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for all variants")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    support = bf16_support("cpu")
    print(f"CPU capability: {support.capability}; hardware bf16: {support.fast} ({support.why()})")
    train_mp = resolve_mixed_precision("auto", "cpu", support)
    infer_dtype = resolve_inference_dtype("auto", "cpu", support)
    print(f"auto resolves to: training mixed_precision={train_mp[0]}, inference dtype={infer_dtype[0]}")
    base = load(args)
    rows = variants(args, base)
    first_loss = {n: r["fn"](0) for n, r in rows.items() if r["kind"] == "train"}  # identical weights
    for r in rows.values():
        for i in range(args.warmup):
            r["fn"](1 + i)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for k in range(args.rounds):
        for name, r in rows.items():
            n = args.steps if r["kind"] == "train" else args.forwards
            times[name] += timed(r["fn"], 1000 * (k + 1), n)

    model_name = args.model or f"llama-like vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers"
    n_params = sum(p.numel() for p in base.parameters())
    print(
        f"{model_name} ({n_params / 1e6:.1f}M params); train batch {args.batch} x seq {args.seq}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds"
    )
    results: dict[str, dict] = {}
    print("| variant | ms (median) | tokens/s | vs fp32 | first-step loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        ms = 1000 * statistics.median(times[name])
        base_ms = 1000 * statistics.median(times[r["baseline"]])
        row = {"ms": round(ms, 2), "tokens_per_s": round(r["tokens"] * 1000 / ms, 1)}
        row["speedup_vs_fp32"] = round(base_ms / ms, 3)
        row["tokens"], row["timed_calls"] = r["tokens"], len(times[name])
        if name in first_loss:
            row["first_step_loss"] = round(first_loss[name], 5)
        results[name] = row
        loss = f"{row['first_step_loss']:.4f}" if "first_step_loss" in row else ""
        print(f"| {name} | {ms:.1f} | {row['tokens_per_s']:.0f} | {row['speedup_vs_fp32']:.2f}x | {loss} |")
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        record = {
            "cpu": {
                "capability": support.capability,
                "hardware_bf16": support.fast,
                "why": support.why(),
                "machine": platform.machine(),
                "processor": cpu_model_name(),
            },
            "auto": {"mixed_precision": train_mp[0], "inference_dtype": infer_dtype[0]},
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "params": n_params,
            "settings": settings,
            "rows": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


def cpu_model_name() -> str:
    """The 'model name' line of /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
