"""Training at length: peak memory and step time of the AR, full-attention and block-diffusion objectives,
sdpa vs flex_attention, gradient checkpointing on and off, at growing sequence lengths.

python bench/long_context.py                       # tiny llama, L = 64, 128 (about a minute)
python bench/long_context.py --model ~/.cache/adapt/smollm2-135m-instruct --lengths 512,1024,2048,4096 \\
    --steps 2 --threads 2 --json bench/results/long_context_smollm2.json

Every configuration runs in its own process, so its peak memory is its own: RSS (ru_maxrss) on CPU,
torch.cuda.max_memory_allocated on CUDA; "step adds" is that peak over the memory held once the model is
loaded (freed memory trimmed back first): gradients, optimizer state, activations and logits. Every
row loads the model the same way (converted; the AR row is set causal again). One step is AdamW on fp32
weights: the AR objective is stock transformers (`labels=`, causal attention); the diffusion objectives are
adapt's (`objective.inputs` + `TokenLoss`), block diffusion (B = 16) with causal clean attention over
[x_t ; x_0] (2L tokens), under sdpa through the tiled pair kernel `adapt finetune` uses
(`adapt.core.pair_attention`). Ratios are to the AR step at the same length, batch, checkpointing and kernel.
flex_attention runs where torch can train it (CUDA; torch 2.13 has no FlexAttention backward on CPU: those
rows say so). The first step is timed apart (flex compiles there); the step time is the median of the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

OBJECTIVES = ("ar", "full", "block")  # and "joint": block + the AR term against a teacher, full mask


def build_tiny(out: Path) -> Path:
    from adapt.tiny import build_tiny_model

    if not (out / "config.json").exists():
        build_tiny_model("llama", out)
    return out


def load(
    model_path: str, objective: str, attn: str, checkpointing: bool, device: str, random: bool = False
) -> tuple[Any, Any]:
    """The model to train (converted in memory for the diffusion objectives) and its objective (None: AR).
    `random`: built from the directory's config with random weights (same shapes, memory and time)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from adapt.conversion.convert import ConvertOptions, convert_model
    from adapt.training.config import DiffusionConfig
    from adapt.training.objectives import make_objective

    if random:
        config = AutoConfig.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, attn_implementation=attn
        )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # every row is loaded the same way (converted), so that their memory differs by the step alone
    settings, _, _ = convert_model(model, tokenizer, ConvertOptions(attn_implementation=attn))
    objective_obj = None
    if objective == "ar":
        model.config.is_causal = True  # the AR source again: causal attention, its own loss
    else:
        block = {"block_size": 16, "clean_attention": "causal"} if objective in ("block", "joint") else {}
        teacher = None
        if objective == "joint":  # the draft-and-verify objective, against the source as its teacher
            block |= {"ar_loss_weight": 1.0, "full_mask": True, "ar_teacher": model_path}
            teacher = bench_teacher(model_path, tokenizer, model, random, device)
        objective_obj = make_objective(DiffusionConfig(**block), settings, teacher)
    if objective in ("block", "joint") and attn == "sdpa":  # what `adapt finetune` runs for block objectives
        from adapt.core.pair_attention import use_pair_sdpa

        use_pair_sdpa(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device).train(), objective_obj


def bench_teacher(model_path: str, tokenizer: Any, student: Any, random: bool, device: str) -> Any:
    """The joint objective's frozen teacher: the source model (random weights of its shapes under
    --random-weights), fp32 like the student's weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapt.conversion.verify import ordinary_token_ids
    from adapt.training.objectives.teacher import ProbabilitiesAt, Teacher, load_teacher

    if not random:
        probe = ordinary_token_ids(student, tokenizer)
        return load_teacher(model_path, tokenizer, student, device, torch.float32, probe)
    config = AutoConfig.from_pretrained(model_path)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    width = student.get_output_embeddings().weight.shape[0]
    return Teacher(ProbabilitiesAt(lm.requires_grad_(False).to(device).eval(), fast=True), width)


def id_limit(model: Any, objective: Any) -> int:
    """Random token ids stay below this: the model's vocabulary, or its teacher's (the source's, without
    the mask row)."""
    teacher = getattr(objective, "teacher", None)
    return (teacher.scorer.model if teacher is not None else model).config.vocab_size - 2


def step_fn(model: Any, objective: Any, ids: torch.Tensor, autocast: str = "no") -> Any:
    """One optimizer step of the objective on `ids` [b, l] (fp32 weights; under bf16 autocast if asked)."""
    from adapt.core.attention import MaskStyle
    from adapt.training.objectives.loss import TokenLoss

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_module = TokenLoss(model, fast=True)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    style = MaskStyle.for_model(model, torch.float32)

    def step(i: int) -> float:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
            if objective is None:
                loss = model(input_ids=ids, labels=ids).loss
            else:
                gen = torch.Generator(device=ids.device).manual_seed(i)
                loss = loss_module(**objective.inputs(batch, i, gen, style))[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def settled_bytes(device: str) -> int:
    """Memory held now, once freed memory went back to the system: the base a step's peak adds to."""
    import ctypes
    import gc

    gc.collect()
    if device == "cuda":
        return torch.cuda.memory_allocated()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this process: its step times and peak memory."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    model, objective = load(
        spec["model"],
        spec["objective"],
        spec["attn"],
        spec["checkpointing"],
        device,
        spec.get("random", False),
    )
    gen = torch.Generator().manual_seed(0)
    shape = (spec["batch"], spec["length"])
    ids = torch.randint(3, id_limit(model, objective), shape, generator=gen).to(device)
    step = step_fn(model, objective, ids, spec.get("autocast", "no"))
    base = settled_bytes(device)
    before = peak_bytes(device)
    times, losses = [], []
    for i in range(spec["steps"] + 1):
        t0 = time.perf_counter()
        losses.append(step(i))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times[1:]) if len(times) > 1 else times[0]
    tokens = spec["batch"] * spec["length"]
    return {
        **spec,
        "first_step_s": times[0],
        "step_s": median,
        "tokens_per_s": tokens / median,
        "peak_gib": peak_bytes(device) / 2**30,
        "loaded_gib": before / 2**30,
        "base_gib": base / 2**30,
        "step_gib": (peak_bytes(device) - base) / 2**30,
        "losses": losses,
        "checkpointing_active": bool(model.is_gradient_checkpointing),
        "mask": mask_kind(model, objective, ids),
        "kernel": model.config._attn_implementation,
    }


def mask_kind(model: Any, objective: Any, ids: torch.Tensor) -> str:
    """What reached the attention kernel: a BlockMask, a dense mask (dtype, shape), or the model's own."""
    if objective is None:
        return "the model's own causal mask"
    from adapt.core.attention import MaskStyle

    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    mask = objective.inputs(
        batch, 0, torch.Generator(device=ids.device), MaskStyle.for_model(model, torch.float32)
    )
    mask = mask["attention_mask"]
    if not isinstance(mask, torch.Tensor):
        return type(mask).__name__
    return f"{str(mask.dtype).removeprefix('torch.')} {list(mask.shape)}"


def run_interleaved(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    """Step times with the objectives' steps interleaved in one process (round after round), so that a
    machine shared with other work slows them alike; memory is not measured in this mode."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for spec in plan(args, device):
        if spec["objective"] == "ar":
            group = [dict(spec, objective=o) for o in args.objectives]
            rows += time_group(group, args.steps, device)
    return rows


def time_group(group: list[dict[str, Any]], steps: int, device: str) -> list[dict[str, Any]]:
    """One warm-up step each, then `steps` rounds of one step of each objective; medians."""
    runs = []
    for spec in group:
        model, objective = load(
            spec["model"], spec["objective"], spec["attn"], spec["checkpointing"], device, spec["random"]
        )
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, id_limit(model, objective), (spec["batch"], spec["length"]), generator=gen)
        runs.append((spec, step_fn(model, objective, ids.to(device), spec["autocast"]), []))
    for i in range(steps + 1):
        for _, step, times in runs:
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)
    out = []
    for spec, _, times in runs:
        median = statistics.median(times[1:])
        out.append({**spec, "first_step_s": times[0], "step_s": median, "interleaved": True})
        out[-1]["tokens_per_s"] = spec["batch"] * spec["length"] / median
        print(json.dumps(out[-1]), flush=True)
    return out


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """`run_one` in a fresh process; a configuration that dies (memory) or hangs is reported, not fatal."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {**spec, "failed": f"over {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {**spec, "failed": tail[:160]}
    return json.loads(lines[-1])


def flex_refusal(device: str) -> str | None:
    from adapt.core.flex import flex_cannot_train

    return flex_cannot_train(device)


def plan(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    specs = []
    for length in args.lengths:
        for batch in args.batches:
            for checkpointing in args.checkpointing:
                for attn in args.attn:
                    for objective in args.objectives:
                        specs.append(
                            {
                                "model": args.model,
                                "objective": objective,
                                "attn": attn,
                                "checkpointing": checkpointing,
                                "length": length,
                                "batch": batch,
                                "steps": args.steps,
                                "threads": args.threads,
                                "device": device,
                                "random": args.random_weights,
                                "autocast": args.autocast,
                            }
                        )
    return specs


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's memory and step time over the AR row of the same length, batch, checkpointing, kernel."""
    key = ("length", "batch", "checkpointing", "attn")
    ar = {tuple(r[k] for k in key): r for r in rows if r["objective"] == "ar" and "failed" not in r}
    for r in rows:
        base = ar.get(tuple(r[k] for k in key))
        if base is not None and "failed" not in r:
            if "peak_gib" in r:
                r["memory_vs_ar"] = r["peak_gib"] / base["peak_gib"]
                r["step_memory_vs_ar"] = r["step_gib"] / base["step_gib"]
            r["step_vs_ar"] = r["step_s"] / base["step_s"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown rows; memory columns are blank for interleaved timing rows."""
    head = (
        "| L | batch | checkpointing | kernel | objective | peak GiB | x AR | step adds GiB | x AR | step s |"
    )
    out = [head + " x AR | tokens/s | first step s |", "|" + "---|" * 13]
    for r in rows:
        cells = [r["length"], r["batch"], "on" if r["checkpointing"] else "off", r["attn"], r["objective"]]
        if "failed" in r:
            out.append("| " + " | ".join(map(str, cells)) + f" | {r['failed']} |" + " |" * 7)
            continue
        memory = ["", "", "", ""]
        if "peak_gib" in r:
            nan = float("nan")  # no AR row to compare with
            memory = [f"{r['peak_gib']:.2f}", f"{r.get('memory_vs_ar', nan):.2f}", f"{r['step_gib']:.2f}"]
            memory.append(f"{r.get('step_memory_vs_ar', nan):.2f}")
        cells += [*memory, f"{r['step_s']:.2f}"]
        cells += [
            f"{r.get('step_vs_ar', float('nan')):.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['first_step_s']:.1f}",
        ]
        out.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(out)


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    amx = "AMX" if "amx_tile" in flags else "no AMX"
    return f"CPU {torch.backends.cpu.get_cpu_capability()}, {amx}, {os.cpu_count()} cores"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="", help="AR model directory (default: a tiny random llama)")
    parser.add_argument("--lengths", default="64,128", help="sequence lengths L")
    parser.add_argument("--batches", default="1", help="batch sizes")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="ar, full, block, joint")
    parser.add_argument("--attn", default="sdpa,flex_attention", help="attention kernels")
    parser.add_argument("--checkpointing", default="off,on", help="gradient checkpointing: off, on")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument(
        "--random-weights", action="store_true", help="build --model from its config with random weights"
    )
    parser.add_argument(
        "--autocast", choices=["no", "bf16"], default="no", help="bf16 autocast (fp32 weights)"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time the objectives in one process, step by step (no memory)",
    )
    args = parser.parse_args()
    if args.one is None:
        args.lengths = [int(x) for x in args.lengths.split(",")]
        args.batches = [int(x) for x in args.batches.split(",")]
        args.objectives = args.objectives.split(",")
        args.attn = args.attn.split(",")
        args.checkpointing = [x == "on" for x in args.checkpointing.split(",")]
    return args


def main() -> None:
    args = parse()
    if args.one is not None:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.model:
        args.model = str(build_tiny(Path("out/bench-long-context-tiny")))
    if args.interleave:
        args.attn = [a for a in args.attn if a != "flex_attention" or flex_refusal(device) is None]
        write(args, device, with_ratios(run_interleaved(args, device)))
        return
    refusal = flex_refusal(device) if "flex_attention" in args.attn else None
    rows = []
    for spec in plan(args, device):
        if spec["attn"] == "flex_attention" and refusal is not None:
            rows.append({**spec, "failed": f"cannot train here: {refusal}"[:100]})
            continue
        rows.append(run_child(spec, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    write(args, device, with_ratios(rows))


def write(args: argparse.Namespace, device: str, rows: list[dict[str, Any]]) -> None:
    weights = "random weights" if args.random_weights else "its weights"
    precision = "fp32 weights under bf16 autocast" if args.autocast == "bf16" else "fp32"
    where = f"{machine(device)}; torch {torch.__version__}"
    print(f"\n{args.model} ({weights}); {where}; {precision}, AdamW; block B = 16")
    print(table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(device), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
