"""A self-distillation corpus: the AR source's own greedy continuations of windows of a training corpus.

python bench/distill_corpus.py --source ~/.cache/adapt/smollm2-135m-instruct \
    --documents ~/.cache/adapt/corpora/wiki-train.jsonl --out /work/runs/distill.jsonl --n 2400
# 1200 more sequences from windows that corpus did not use:
python bench/distill_corpus.py ... --out /work/runs/distill_more.jsonl --n 1200 --skip 2400

Each line is {"text": prompt + continuation}: a window of `--prompt-length` tokens of a training
document followed by `--gen-length` tokens the source writes greedily (KV cache, EOS suppressed).
Fine-tuning a block-diffusion checkpoint on it teaches the diffusion model the source's own
distribution, the usual recipe for a parallel drafter (Medusa's self-distillation); held-out prompts
(another corpus) then measure whether it decodes several tokens per forward pass at the source's
quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from sample_speed import read_documents  # noqa: E402


def windows(tokenizer, documents: list[str], length: int, stride: int, n: int) -> list[list[int]]:  # noqa: ANN001
    """Windows of `length` tokens every `stride` tokens, taken round-robin across documents."""
    docs = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in documents]
    per_doc = [[d[i : i + length] for i in range(0, len(d) - length + 1, stride)] for d in docs]
    out, depth = [], 0
    while len(out) < n and any(depth < len(w) for w in per_doc):
        out += [w[depth] for w in per_doc if depth < len(w)]
        depth += 1
    return out[:n]


@torch.no_grad()
def continue_greedily(model, tokenizer, prompts: list[list[int]], gen_length: int, batch: int, sink) -> None:  # noqa: ANN001
    """Greedy continuations, batch by batch; each finished batch is written to `sink` as JSON lines."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for s in range(0, len(prompts), batch):
        chunk = prompts[s : s + batch]
        ids = torch.tensor(chunk)  # equal lengths: no padding needed
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=gen_length,
            min_new_tokens=gen_length,
            do_sample=False,
            pad_token_id=pad,
        )
        new = gen[:, ids.shape[1] :].tolist()
        for p, c in zip(chunk, new, strict=True):
            sink.write(json.dumps({"text": tokenizer.decode(p + c)}) + "\n")
        sink.flush()
        print(f"{s + len(chunk)}/{len(prompts)}", file=sys.stderr, flush=True)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapt.loading.precision import resolve_inference_dtype

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--documents", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=2400)
    ap.add_argument(
        "--skip", type=int, default=0, help="windows to pass over (new text for a corpus made before)"
    )
    ap.add_argument("--prompt-length", type=int, default=32)
    ap.add_argument("--gen-length", type=int, default=96)
    ap.add_argument("--stride", type=int, default=48)
    ap.add_argument("--batch", type=int, default=48)
    args = ap.parse_args()

    dtype, why = resolve_inference_dtype("auto", "cpu")
    print(f"source in {dtype} ({why})", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(args.source)
    model = AutoModelForCausalLM.from_pretrained(args.source, dtype=getattr(torch, dtype)).eval()
    every = windows(
        tokenizer, read_documents(args.documents), args.prompt_length, args.stride, args.skip + args.n
    )
    prompts = every[args.skip :]
    if not prompts:
        raise SystemExit(
            f"{args.documents} has {len(every)} windows of {args.prompt_length} tokens: --skip {args.skip} "
            "leaves none"
        )
    t0 = time.perf_counter()
    partial = args.out.with_suffix(".partial")  # usable while it grows; renamed when complete
    with partial.open("w") as sink:
        continue_greedily(model, tokenizer, prompts, args.gen_length, args.batch, sink)
    seconds = time.perf_counter() - t0
    partial.replace(args.out)
    tokens = len(prompts) * args.gen_length
    print(f"wrote {len(prompts)} sequences to {args.out}: {tokens} generated tokens in {seconds:.0f} s")


if __name__ == "__main__":
    main()
