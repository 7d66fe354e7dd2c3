"""Sampling quality at several NFE budgets, judged by the source AR model, vs the AR model's own text.

For the diffusion checkpoint: unconditional samples (from BOS) at each step count, scored by the
source AR model (generative perplexity, MDLM's protocol) with their unigram entropy (a collapse to
repeated tokens lowers perplexity and entropy together). For the AR source itself: greedy and
sampled (temperature 1) generations of the same length, scored by the same judge.

    python bench/sample_quality.py --model bench/out/adaptation/adapted/final
    python bench/sample_quality.py --model CKPT --judge SOURCE --steps 16,32,64 --samples 8
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def ar_baseline(judge, tokenizer, n: int, length: int, greedy: bool, seed: int) -> dict:
    """The judge's own generations from BOS, scored by itself."""
    from adapt.evaluation.evaluate import judge_nll, unigram_entropy

    torch.manual_seed(seed)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    start = torch.full((n, 1), bos)
    out = judge.generate(
        start,
        attention_mask=torch.ones_like(start),
        max_new_tokens=length,
        min_new_tokens=length,
        do_sample=not greedy,
        temperature=None if greedy else 1.0,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )[:, 1:]
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    nll, count = judge_nll(judge, tokenizer, texts)
    entropy = sum(unigram_entropy(row.tolist()) for row in out) / n
    run = "AR greedy" if greedy else "AR sampled (T=1)"
    ppl = math.exp(nll / count)
    return {"run": run, "nfe": length, "gen_ppl": ppl, "entropy": entropy, "example": texts[0]}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapt.evaluation.evaluate import GenPplConfig, generative_perplexity
    from adapt.loading.model import load_diffusion_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--judge", default=None, help="AR judge; default the checkpoint's source model")
    parser.add_argument("--steps", default="8,16,32,64")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/out/sample_quality.json"))
    args = parser.parse_args()

    model, tokenizer, settings = load_diffusion_model(args.model)
    judge_path = args.judge or settings.source_model
    judge = AutoModelForCausalLM.from_pretrained(judge_path).eval()
    judge_tok = AutoTokenizer.from_pretrained(judge_path)
    cfg = GenPplConfig(
        steps=tuple(int(s) for s in args.steps.split(",")),
        num_samples=args.samples,
        gen_length=args.length,
        batch_size=args.samples,
        extra={"block_length": min(32, args.length)},
    )
    with torch.inference_mode():
        rows = generative_perplexity(model, tokenizer, settings, judge, judge_tok, cfg)
        baselines = [ar_baseline(judge, judge_tok, args.samples, args.length, g, 0) for g in (True, False)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"diffusion": rows, "ar": baselines}, indent=2, default=str))
    print(f"{args.samples} samples x {args.length} tokens from BOS; judge {judge_path}")
    print("| run | NFE | judge ppl | unigram entropy |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| diffusion, {r['steps']} steps | {r['nfe']} | {r['gen_ppl']:.1f} | {r['entropy']:.2f} |")
    for b in baselines:
        print(f"| {b['run']} | {b['nfe']} | {b['gen_ppl']:.1f} | {b['entropy']:.2f} |")
    print("example (diffusion, most steps):", repr(rows[-1].get("example", "")))
    print("example (AR sampled):", repr(baselines[1]["example"]))


if __name__ == "__main__":
    main()
