"""What a cached forward of M new tokens costs, in steps of the model's own greedy `generate`.

python bench/pass_cost.py                      # tiny llama (hidden 256, 4 layers), offline
python bench/pass_cost.py --model ~/.cache/adapt/smollm2-135m-instruct --threads 2 \
    --json bench/results/pass_cost_smollm2.json

Block decoding pays one forward per step over the columns it feeds: B + the committed columns the cache
has not taken yet. Whether a block size pays on a machine depends on how that cost grows with M, which is
the hardware's (small-M GEMM kernels on a CPU, memory bandwidth on a GPU), not the sampler's. Over a
cached prompt of --prompt-length tokens this times forwards of M = 1..--max-new new tokens with an
additive 4D mask and the logits of at most two columns (what `BlockDenoiser` asks for), against the
per-token time of `generate` (greedy, KV cache, --new tokens) on the same prompt, in interleaved rounds
(medians), so a shared machine's slow spells fall on every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def load(path: str | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if path is None:
        from train_step import build

        return build(vocab=4096, hidden=256, layers=4, seq=512).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def measure(model: torch.nn.Module, prompt: int, max_new: int, new: int, rounds: int) -> dict:
    """Median ms of a cached M-token forward (M = 1..max_new) and of one `generate` token."""
    from transformers import DynamicCache

    from adapt.sampling.cache import forward_signature

    keyword = forward_signature(model)[0]  # `cache` or `past_key_values`, whichever forward takes
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt), generator=gen)
    passes: dict[int, list[float]] = {m: [] for m in range(1, max_new + 1)}
    steps: list[float] = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(ids, use_cache=True, **{keyword: cache})
        for _ in range(rounds):
            for m in passes:
                x = torch.randint(0, vocab, (1, m), generator=gen)
                mask = torch.zeros(1, 1, m, prompt + m)
                positions = torch.arange(prompt, prompt + m)[None]
                start = time.perf_counter()
                model(x, attention_mask=mask, position_ids=positions, **{keyword: cache},
                      use_cache=True, logits_to_keep=min(m, 2))  # fmt: skip
                passes[m].append(time.perf_counter() - start)
                cache.crop(-m)
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False)  # fmt: skip
            steps.append((time.perf_counter() - start) / new)
    step = statistics.median(steps) * 1e3
    return {
        "ar_step_ms": step,
        "passes": {
            m: {"ms": statistics.median(t) * 1e3, "ar_steps": statistics.median(t) * 1e3 / step}
            for m, t in passes.items()
        },  # fmt: skip
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a causal LM (default: a tiny random llama)")
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--max-new", type=int, default=8, help="largest M timed")
    p.add_argument("--new", type=int, default=32, help="tokens per `generate` call")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model)
    result = measure(model, args.prompt_length, args.max_new, args.new, args.rounds)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"model {args.model or 'tiny llama'}; cpu {capability}, {torch.get_num_threads()} threads, fp32; "
          f"prompt {args.prompt_length} tokens cached; medians of {args.rounds} rounds")  # fmt: skip
    print(f"AR generate: {result['ar_step_ms']:.1f} ms per token")
    print("| new tokens M | ms | AR steps |\n|---|---|---|")
    for m, row in result["passes"].items():
        print(f"| {m} | {row['ms']:.1f} | {row['ar_steps']:.2f} |")
    if args.json:
        settings = {**vars(args), "cpu_capability": capability, "threads": torch.get_num_threads()}
        Path(args.json).write_text(json.dumps({"settings": settings, **result}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
