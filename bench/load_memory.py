"""Peak host memory per rank while the weights load: whole on every rank against sharded, under DDP, FSDP2
and DeepSpeed ZeRO-3, 2 processes on CPU (gloo).

python bench/load_memory.py [--model DIR] [--out DIR] [--engines ddp fsdp zero3] [--teacher]

Builds (unless --model names a converted checkpoint) a random llama of about 220M parameters (hidden
1024, 12 layers, vocab 32000, untied head: 0.88 GB in float32), converts it with `adapt convert`, and runs
one training step under each engine and loading: `whole` is how every engine read the weights before
sharded loading (reproduced with the launch options that turn it off, --fsdp_cpu_ram_efficient_loading
false and --zero3_init_flag false), `sharded` the default (FSDP2: rank 0 + broadcast; ZeRO-3: zero.Init).
Each rank's peak resident memory (ru_maxrss) before it loaded anything, right after loading, and once
the engine holds the weights (before the first step) are read from OUTPUT_DIR/engine.json
(`load.ranks`). The table gives the peak before loading, what loading added to it, and what it had grown
by once the engine was set up (partitioning, DeepSpeed's fp32 and gradient partitions, FSDP's broadcast
into the shards), in GB and as a multiple of W.

--teacher trains the joint objective against an AR teacher of the same size (the model's source, read
from disk: `diffusion.ar_teacher`) under each engine's sharded loading and prints, per rank, the host
memory resident before the teacher is read, what reading it added, what sharding it (after the model's
engine is set up) changed, and their sum: what the teacher costs the rank (engine.json's
`teacher.ranks`; resident memory at each point rather than the peak).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
RUNS = {  # engine -> (accelerate config, extra launch options, loading)
    "ddp": [("ddp.yaml", [], "whole")],
    "fsdp": [
        ("fsdp.yaml", ["--fsdp_cpu_ram_efficient_loading", "false"], "whole"),
        ("fsdp.yaml", [], "sharded"),
    ],
    "zero3": [
        ("deepspeed.yaml", ["--zero_stage", "3", "--zero3_init_flag", "false"], "whole"),
        ("deepspeed.yaml", ["--zero_stage", "3"], "sharded"),
    ],
}
RECIPE = [
    "data.max_length=32",
    "training.batch_size=1",
    "training.grad_accumulation=1",
    "training.max_steps=1",
    "training.eval_batches=1",
    "training.checkpoint_every=0",
    "training.export=false",
    "logging.report_to=[]",
    "logging.progress_bar=false",
]


def build_model(out: Path) -> Path:
    """A ~220M-parameter llama (random weights) saved and converted (once); returns the converted
    directory."""
    from adapt.tiny import build_tiny_model, build_tokenizer

    if (out / "converted/config.json").is_file():
        return out / "converted"

    spare = 32000 - len(build_tokenizer())
    source = build_tiny_model(
        "llama",
        out / "source",
        spare_rows=spare,
        hidden=1024,
        layers=12,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    )
    subprocess.run(
        [sys.executable, "-m", "adapt", "convert", str(source), str(out / "converted")], check=True
    )
    return out / "converted"


def weight_bytes(model: Path) -> int:
    from adapt.core.bounds import read_weights

    return read_weights(model).stored_bytes


def launch(config: str, options: list[str], model: Path, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """One training step under `config`; engine.json's load facts."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"recipes/accelerate/{config}",
        *options,
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "finetune.py",
        "recipes/multi_process.yaml",
        f"model.path={model}",
        f"training.output_dir={out}",
        *RECIPE,
        *extra,
    ]
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "engine.json").read_text())


def rows(facts: dict, engine: str, loading: str, weights: int) -> list[str]:
    """Per rank: peak RSS before loading, then what loading added, then what the engine's set-up added."""
    out = []
    for rank, r in enumerate(facts["load"]["ranks"]):
        before, loaded, ready = (r[f"peak_rss_{k}bytes"] for k in ("before_load_", "loaded_", ""))
        cells = [f"{before / GB:.2f} GB"]
        cells += [
            f"+{(b - a) / GB:.2f} GB ({(b - a) / weights:.2f} W)"
            for a, b in ((before, loaded), (before, ready))
        ]
        out.append(f"| {engine} | {loading} ({facts['load']['how']}) | {rank} | " + " | ".join(cells) + " |")
    return out


def teacher_rows(facts: dict, teacher_bytes: int) -> list[str]:
    """Per rank: resident memory before the teacher was read, what reading it added, what sharding it
    changed, and the sum (T: the teacher's weights)."""
    t = facts["teacher"]
    out = []
    for rank, r in enumerate(t["ranks"]):
        read, held = r["loaded"], r["held"]
        steps = (read["rss_bytes"] - read["rss_before_bytes"], held["rss_bytes"] - held["rss_before_bytes"])
        cells = [f"{held['local'] / held['full']:.2f}", f"{read['rss_before_bytes'] / GB:.2f} GB"]
        cells += [f"{b / GB:+.2f} GB ({b / teacher_bytes:+.2f} T)" for b in (*steps, sum(steps))]
        out.append(f"| {facts['engine']} | {t['how']} | {rank} | " + " | ".join(cells) + " |")
    return out


def run_teacher(args: argparse.Namespace, model: Path) -> None:
    """The joint objective against the model's AR source as teacher, each engine's default loading."""
    source = json.loads((model / "config.json").read_text())["diffusion"]["source_model"]
    teacher = Path(source)
    extra = ("diffusion.block_size=4", "diffusion.anneal_steps=0", "diffusion.clean_attention=causal")
    extra += ("diffusion.ar_loss_weight=1", f"diffusion.ar_teacher={teacher}")
    t_bytes = weight_bytes(teacher)
    print(f"teacher {teacher}: T = {t_bytes / GB:.2f} GB of weights\n")
    print("| engine | teacher read | rank | share | resident before | reading | sharding | teacher in all |")
    print("|---|---|---|---|---|---|---|---|")
    for engine in args.engines:
        config, options, _ = RUNS[engine][-1]
        facts = launch(config, options, model, args.out / f"{engine}-teacher", extra)
        print("\n".join(teacher_rows(facts, t_bytes)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a converted checkpoint (default: build the 220M llama)")
    ap.add_argument("--out", type=Path, default=ROOT / "out/bench-load-memory")
    ap.add_argument("--engines", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        help="MALLOC_MMAP_THRESHOLD_ for the ranks (glibc then "
        "returns each freed block above it at once; by default it keeps many in its heap)",
    )
    ap.add_argument("--teacher", action="store_true", help="the joint objective's AR teacher, per engine")
    args = ap.parse_args()
    if args.mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    model = args.model or build_model(args.out)
    weights = weight_bytes(model)
    print(f"model {model}: W = {weights / GB:.2f} GB of weights; 2 processes on CPU (gloo)\n")
    if args.teacher:
        run_teacher(args, model)
        return
    print("| engine | load | rank | peak RSS before loading | loaded | engine set up |")
    print("|---|---|---|---|---|---|")
    for engine in args.engines:
        for config, options, loading in RUNS[engine]:
            facts = launch(config, options, model, args.out / f"{engine}-{loading}")
            print("\n".join(rows(facts, facts["engine"], loading, weights)), flush=True)


if __name__ == "__main__":
    main()
