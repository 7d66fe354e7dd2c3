"""Speed and quality of the sampler: engine (threshold decoding + KV cache) vs a plain LLaDA loop.

python bench/sample_speed.py                                   # builds a tiny llama and converts it
python bench/sample_speed.py --model out/llama-diffusion --judge meta-llama/Llama-3.2-1B --device cuda

Every row decodes the same prompts with the same gen length and block length, one prompt at a time,
without EOS stopping. Reported: tokens/s, NFE per token, the judge perplexity of the outputs under the
original AR model (conditioned on the prompt), and the token agreement with uncached threshold decoding
(the accuracy cost of the approximate cache).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from reference_sampler import reference_generate  # noqa: E402

from adapt.checkpoint import load_diffusion_model  # noqa: E402
from adapt.sampling import SamplingConfig, generate  # noqa: E402


def build_default(root: Path) -> tuple[Path, Path]:
    """A tiny llama (4 layers, 256 wide, 1024 context) and its conversion."""
    from adapt.convert import convert
    from adapt.tiny import build_tiny_model

    src = build_tiny_model("llama", root / "src", hidden=256, layers=4, max_position_embeddings=1024)
    return convert(str(src), root / "diffusion").out, src


def prompts_from(tokenizer, n: int, length: int) -> list[list[int]]:
    from adapt.tiny import SAMPLE_TEXT

    ids = tokenizer(SAMPLE_TEXT * 8, add_special_tokens=False)["input_ids"]
    return [ids[i * 37 : i * 37 + length] for i in range(n)]


@torch.no_grad()
def judge_ppl(judge, prompts: list[list[int]], outputs: list[list[int]], device: str) -> float:
    """exp(mean NLL) of the generated tokens under the AR judge, conditioned on each prompt."""
    nll, count = 0.0, 0
    for p, o in zip(prompts, outputs, strict=True):
        x = torch.tensor([p + o], device=device)
        logp = judge(input_ids=x).logits[0, len(p) - 1 : -1].float().log_softmax(-1)
        nll -= logp.gather(-1, x[0, len(p) :, None]).sum().item()
        count += len(o)
    return math.exp(nll / max(count, 1))


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusion checkpoint (default: build a tiny one)")
    ap.add_argument("--judge", help="AR judge model (default: the checkpoint's recorded source)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-length", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model_path, judge_path = (args.model, args.judge)
    if model_path is None:
        model_path, judge_path = build_default(Path(tmp.name))
    model, tok, settings = load_diffusion_model(model_path, dtype=args.dtype, device=args.device)
    judge_path = judge_path or settings.source_model
    from transformers import AutoModelForCausalLM

    judge = AutoModelForCausalLM.from_pretrained(judge_path, dtype=model.dtype).to(args.device).eval()
    prompts = prompts_from(tok, args.prompts, args.prompt_length)
    L, B = args.gen_length, args.block_length
    base = dict(gen_length=L, block_length=B, stop_at_eos=False)
    rows: dict[str, dict] = {}

    def run_engine(name: str, config: SamplingConfig) -> None:
        outs, nfe, secs = [], 0, 0.0
        for p in prompts:
            out = generate(model, tok, [p], config, settings)
            outs.append(out.sequences[0])
            nfe, secs = nfe + out.nfe, secs + out.seconds
        rows[name] = dict(outputs=outs, nfe=nfe, seconds=secs)

    generate(model, tok, [prompts[0]], SamplingConfig(gen_length=8), settings)  # warm-up
    mask_id, shift, vocab = settings.mask_token_id, settings.shift, len(tok)
    outs, secs = timed(
        lambda: [reference_generate(model, p, mask_id, shift, L, L, B, vocab) for p in prompts]
    )
    rows["reference loop (low-confidence, no cache)"] = dict(outputs=outs, nfe=L * len(prompts), seconds=secs)
    run_engine("engine low-confidence, no cache", SamplingConfig(**base))
    threshold = dict(base, strategy="threshold", threshold=args.threshold)
    run_engine("engine threshold, no cache", SamplingConfig(**threshold))
    run_engine("engine threshold + prefix cache", SamplingConfig(**threshold, cache="prefix"))
    run_engine("engine threshold + dual cache", SamplingConfig(**threshold, cache="dual"))

    exact = rows["engine threshold, no cache"]["outputs"]
    ref_speed = None
    print(f"model {model_path} · judge {judge_path} · {args.device} · {len(prompts)} prompts")
    print(f"prompt {args.prompt_length} tokens, gen {L}, block {B}, threshold {args.threshold}\n")
    print(f"{'':44s} {'tok/s':>8s} {'speedup':>8s} {'NFE/tok':>8s} {'judge ppl':>10s} {'agree':>6s}")
    for name, r in rows.items():
        tokens = sum(len(o) for o in r["outputs"])
        r["tokens_per_second"] = tokens / r["seconds"]
        r["nfe_per_token"] = r["nfe"] / tokens
        r["judge_ppl"] = judge_ppl(judge, prompts, r["outputs"], args.device)
        pairs = zip(r["outputs"], exact, strict=True)
        same = sum(a == b for o, e in pairs for a, b in zip(o, e, strict=True))
        r["agreement"] = same / tokens
        ref_speed = ref_speed or r["tokens_per_second"]
        r["speedup"] = r["tokens_per_second"] / ref_speed
        print(
            f"{name:44s} {r['tokens_per_second']:8.1f} {r['speedup']:7.2f}x {r['nfe_per_token']:8.3f}"
            f" {r['judge_ppl']:10.2f} {r['agreement']:6.3f}"
        )
    if args.json:
        summary = {k: {m: v for m, v in r.items() if m != "outputs"} for k, r in rows.items()}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
