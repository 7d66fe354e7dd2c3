"""`adapt serve` under load: N clients at once vs the same N requests one at a time, same server.

python bench/serve_speed.py                                   # tiny llama (4 x 256), converted, float32
python bench/serve_speed.py --model CKPT --clients 32 --max-tokens 32 --max-batch 8,32 --json out.json

A real server process per `--max-batch` value (`python -m adapt serve`, float32 so that a batch row equals
its alone answer), greedy completions of N different prompts. Reported per row: seconds for the N
requests one at a time (the baseline) and all at once (N threads), the speed-up, tokens/s both ways, and
how many concurrent answers equal their one-at-a-time answer (must be all of them).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

WORDS = [
    "river",
    "mill",
    "stone",
    "bridge",
    "winter",
    "harbour",
    "lantern",
    "orchard",
    "meadow",
    "forest",
    "valley",
    "tower",
]


def build_default(root: Path) -> Path:
    from adapt.conversion.convert import convert
    from adapt.tiny import build_tiny_model

    src = build_tiny_model("llama", root / "src", hidden=256, layers=4, max_position_embeddings=1024)
    return convert(str(src), root / "ckpt").out


def start(model: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "adapt", "serve", str(model), "--port", "0", "--dtype", "float32",
            "--device", "cpu", "--max-batch", str(max_batch), "--batch-window", "0.05"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    while proc.stdout is not None and (line := proc.stdout.readline()):
        seen += line
        found = re.search(r"at (http://\S+)/v1 ", line)
        if found:
            return proc, found.group(1)
    raise SystemExit(f"the server did not start:\n{seen}")


def complete(url: str, name: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()
    if "choices" not in reply:
        raise SystemExit(f"refused: {reply}")
    return reply["choices"][0]["text"], reply["usage"]["completion_tokens"]


def model_name(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]


def measure(model: Path, max_batch: int, prompts: list[str], max_tokens: int) -> dict[str, object]:
    proc, url = start(model, max_batch)
    try:
        name = model_name(url)

        def ask(prompt: str) -> tuple[str, int]:
            return complete(url, name, prompt, max_tokens)

        ask(prompts[0])  # warm-up
        t0 = time.perf_counter()
        alone = [ask(p) for p in prompts]
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(ask, prompts))
        concurrent = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    tokens = sum(n for _, n in alone)
    return {
        "max_batch": max_batch,
        "clients": len(prompts),
        "max_tokens": max_tokens,
        "one_at_a_time_s": round(sequential, 3),
        "all_at_once_s": round(concurrent, 3),
        "speedup": round(sequential / concurrent, 2),
        "tok_s_one_at_a_time": round(tokens / sequential, 1),
        "tok_s_all_at_once": round(tokens / concurrent, 1),
        "equal_to_alone": sum(a[0] == b[0] for a, b in zip(alone, together, strict=True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="a diffusion checkpoint (default: a tiny llama, converted)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", default="8,32", help="comma-separated --max-batch values")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_default(Path(tmp))
        prompts = [f"The {WORDS[i % len(WORDS)]} and the {WORDS[(3 * i + 1) % len(WORDS)]}" for i in
                   range(args.clients)]  # fmt: skip
        rows = [measure(model, int(b), prompts, args.max_tokens) for b in args.max_batch.split(",")]
    import torch

    for row in rows:
        print(json.dumps(row))
    meta = {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
