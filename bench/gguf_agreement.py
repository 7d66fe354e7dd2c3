"""Does llama.cpp decode an `adapt gguf` export as adapt does, and how fast? Token agreement and tokens/s.

python bench/gguf_agreement.py CKPT --json bench/results/gguf_smollm2.json
    # CKPT: a full-attention llama/qwen2 diffusion checkpoint, e.g. SmolLM2 converted:
    # adapt convert ~/.cache/adapt/smollm2-135m-instruct out/smollm2-diffusion

For each --type (f32, f16, q8_0) the checkpoint is exported, then each prompt (chat template, as
llama-diffusion-cli always applies it) is decoded by `adapt.generate` (float32, greedy, low_confidence)
and by llama-diffusion-cli (confidence-based, --temp 0: it still draws from the softmax) with the same
steps per block and block length. llama.cpp cuts the whole canvas (prompt included) in blocks, so each
question gets " Please answer." / " Thanks" until its templated prompt is a whole number of blocks.
Two modes: "confidence" (blocks of --block-length, llama.cpp --top-k 0: its softmax draw) and "argmax"
(blocks of 1 token, llama.cpp --top-k 1: both exactly greedy, left to right). llama.cpp prints text only,
without special tokens, so adapt's tokens are decoded the same way and the texts compared: identical
texts, and prefix agreement (characters of the common prefix / the longer text; reading llama.cpp's text
back into tokens is no measure: BPE merges what the model wrote as separate tokens, e.g. newlines).
Speed: generated tokens / decoding seconds (adapt: the
engine's own timer; llama.cpp: its "total time"), both with --threads threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from llama_cpp import ensure_built, run_diffusion  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits.",
]


def chat(tok: object, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--types", default="f32,f16,q8_0")
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--steps-per-block", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    import adapt
    from adapt.loading.model import load_diffusion_model

    torch.set_num_threads(args.threads)
    exe = ensure_built()
    model, tok, settings = load_diffusion_model(str(args.checkpoint), dtype="float32", device="cpu")
    specials = set(tok.all_special_ids) | {settings.mask_token_id}
    block = args.block_length
    ours: dict[str, list] = {"confidence": [], "argmax": []}
    for base in PROMPTS:
        for k in range(4 * block):  # llama.cpp needs prompt + output in whole blocks: pad the question
            prompt = base + " Please answer." * (k // 4) + " Thanks" * (k % 4)
            ids = tok(chat(tok, prompt), add_special_tokens=False).input_ids
            if len(ids) % block == 0:
                break
        gen = args.gen_length
        for mode, b, spb in (("confidence", block, args.steps_per_block), ("argmax", 1, 1)):
            config = adapt.SamplingConfig(
                gen_length=gen, block_length=b, steps=spb * gen // b, stop_at_eos=False
            )
            out = adapt.generate(model, tok, [ids], config, settings)
            ours[mode].append((prompt, len(ids), gen, list(out.sequences[0]), out.seconds))
    rows: dict[str, dict[str, dict[str, float | str]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types.split(","):
            gguf = Path(tmp) / f"m-{kind}.gguf"
            cmd = [sys.executable, "-m", "adapt", "gguf", str(args.checkpoint), str(gguf), "--type", kind]
            subprocess.run(cmd, check=True, cwd=ROOT)
            rows[kind] = {}
            for mode, b, spb, top_k in (("confidence", block, args.steps_per_block, 0), ("argmax", 1, 1, 1)):
                same = total = exact = 0
                their_tokens = their_seconds = 0.0
                for prompt, n_input, gen, seq, _ in ours[mode]:
                    text, seconds = run_diffusion(
                        exe, gguf, prompt, n_input, gen, b, spb, args.threads, top_k
                    )
                    mine = tok.decode([i for i in seq if i not in specials])
                    same += len(os.path.commonprefix([mine, text]))
                    total += max(len(mine), len(text))
                    exact += text == mine
                    their_tokens += gen
                    their_seconds += seconds
                rows[kind][mode] = {
                    "prefix_agreement": round(same / max(total, 1), 4),
                    "identical_texts": f"{exact}/{len(PROMPTS)}",
                    "llama_cpp_tokens_per_s": round(their_tokens / their_seconds, 1),
                }
            print(kind, rows[kind], flush=True)
    adapt_tps = {m: round(sum(r[2] for r in v) / sum(r[4] for r in v), 1) for m, v in ours.items()}
    result = {
        "settings": {
            **{k: str(v) for k, v in vars(args).items()},
            "prompts": [p for p, *_ in ours["argmax"]],
        },
        "adapt_float32_tokens_per_s": adapt_tps,
        "llama_cpp": rows,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
