"""Speed and quality of the sampler: engine (threshold decoding + KV cache) vs a plain LLaDA loop.

python bench/sample_speed.py                                   # builds a tiny llama and converts it
python bench/sample_speed.py --model CKPT --prompts-from held_out.jsonl --prompts 4
python bench/sample_speed.py --model CKPT --judge AR_MODEL --device cuda --thresholds 0.9,0.7

Every row decodes the same prompts (the first --prompt-length tokens of held-out documents) with the
same gen length and block length, one prompt at a time, without EOS stopping. Reported per row:
tokens/s and its ratio to the reference loop, NFE per token, the judge perplexity of the outputs under
the original AR model (conditioned on each prompt) with a standard error across prompts, the unigram
entropy of the outputs (a collapse into repeated tokens lowers perplexity and entropy together), and
the token agreement with uncached decoding at the same threshold (the accuracy cost of the cache).
The last line says whether a row is >= 3x faster than the reference at a judge perplexity no worse.
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

from adapt.evaluation.evaluate import summarize, unigram_entropy  # noqa: E402
from adapt.loading.model import load_diffusion_model  # noqa: E402
from adapt.sampling import SamplingConfig, generate  # noqa: E402

TARGET = 3.0


def build_default(root: Path) -> tuple[Path, Path]:
    """A tiny llama (4 layers, 256 wide, 1024 context) and its conversion."""
    from adapt.conversion.convert import convert
    from adapt.tiny import build_tiny_model

    src = build_tiny_model("llama", root / "src", hidden=256, layers=4, max_position_embeddings=1024)
    return convert(str(src), root / "diffusion").out, src


def read_documents(path: Path | None) -> list[str]:
    """Documents of a .jsonl ("text" field) or a text file (blank-line paragraphs); default sample text."""
    if path is None:
        from adapt.tiny import SAMPLE_TEXT

        return [SAMPLE_TEXT * 8]
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    return [d for d in path.read_text().split("\n\n") if d.strip()]


def prompts_from(tokenizer, documents: list[str], n: int, length: int) -> list[list[int]]:
    """The first `length` tokens of the first `n` documents that have that many; when too few do,
    windows starting every 37 tokens of the longest document make up the rest."""
    docs = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in documents]
    long = [d[:length] for d in docs if len(d) >= length]
    if len(long) < n and docs:
        stream = max(docs, key=len)
        long += [stream[i : i + length] for i in range(0, len(stream) - length + 1, 37)]
    if len(long) < n:
        raise SystemExit(f"only {len(long)} prompts of {length} tokens in the documents; lower --prompts")
    return long[:n]


@torch.no_grad()
def judge_nlls(judge, prompts: list[list[int]], outputs: list[list[int]], device: str) -> list[float]:
    """Mean NLL per generated token under the AR judge, conditioned on the prompt, for each output."""
    nlls = []
    for p, o in zip(prompts, outputs, strict=True):
        x = torch.tensor([p + o], device=device)
        logp = judge(input_ids=x).logits[0, len(p) - 1 : -1].float().log_softmax(-1)
        nlls.append(-logp.gather(-1, x[0, len(p) :, None]).mean().item())
    return nlls


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusion checkpoint (default: build a tiny one)")
    ap.add_argument("--judge", help="AR judge model (default: the checkpoint's recorded source)")
    ap.add_argument("--prompts-from", type=Path, help="held-out documents (.jsonl with text, or .txt)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-length", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--thresholds", default="0.9", help="comma-separated confidence thresholds")
    ap.add_argument("--caches", default="prefix,dual", help="comma-separated cache modes besides none")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", type=Path, help="also write the results here")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    model_path, judge_path = (args.model, args.judge)
    if model_path is None:
        model_path, judge_path = build_default(Path(tmp.name))
    model, tok, settings = load_diffusion_model(model_path, dtype=args.dtype, device=args.device)
    judge_path = judge_path or settings.source_model
    from transformers import AutoModelForCausalLM

    judge = AutoModelForCausalLM.from_pretrained(judge_path, dtype=model.dtype).to(args.device).eval()
    prompts = prompts_from(tok, read_documents(args.prompts_from), args.prompts, args.prompt_length)
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
    reference = "reference loop (low-confidence, no cache)"
    rows[reference] = dict(outputs=outs, nfe=L * len(prompts), seconds=secs)
    run_engine("engine low-confidence, no cache", SamplingConfig(**base))
    exact: dict[str, str] = {}  # row -> the uncached row its agreement is measured against
    for tau in (float(t) for t in args.thresholds.split(",")):
        plain = f"engine threshold {tau:g}, no cache"
        run_engine(plain, SamplingConfig(**base, strategy="threshold", threshold=tau))
        exact[plain] = plain
        for cache in args.caches.split(","):
            name = f"engine threshold {tau:g} + {cache} cache"
            run_engine(name, SamplingConfig(**base, strategy="threshold", threshold=tau, cache=cache))
            exact[name] = plain
    ar_row(rows, judge, prompts, L)
    score(rows, judge, prompts, exact, args.device)
    report(rows, reference, args, model_path, judge_path, len(prompts))


@torch.no_grad()
def ar_row(rows: dict[str, dict], judge, prompts: list[list[int]], length: int) -> None:
    """The AR source's own greedy continuation with its KV cache: context for the numbers, not a baseline."""
    outs, secs = [], 0.0
    for p in prompts:
        x = torch.tensor([p], device=judge.device)
        out, s = timed(
            lambda x=x: judge.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=length,
                min_new_tokens=length,
                do_sample=False,
                top_p=None,
                top_k=None,
                temperature=None,
                pad_token_id=0,
            )
        )
        outs.append(out[0, len(p) :].tolist())
        secs += s
    rows["AR source, greedy with KV cache (context)"] = dict(
        outputs=outs, nfe=length * len(prompts), seconds=secs
    )


def score(rows: dict[str, dict], judge, prompts, exact: dict[str, str], device: str) -> None:
    reference_speed = None
    for name, r in rows.items():
        tokens = sum(len(o) for o in r["outputs"])
        nlls = torch.tensor(judge_nlls(judge, prompts, r["outputs"], device), dtype=torch.float64)
        judged = summarize(nlls, torch.tensor([len(o) for o in r["outputs"]]))  # s.e. across prompts
        r.update(tokens_per_second=tokens / r["seconds"], nfe_per_token=r["nfe"] / tokens)
        r.update(judge_ppl=judged["ppl"], judge_nll=judged["nll"], judge_nll_se=judged["nll_stderr"])
        r["entropy"] = sum(unigram_entropy(o) for o in r["outputs"]) / len(r["outputs"])
        if name in exact:
            pairs = zip(r["outputs"], rows[exact[name]]["outputs"], strict=True)
            r["agreement"] = sum(a == b for o, e in pairs for a, b in zip(o, e, strict=True)) / tokens
        reference_speed = reference_speed or r["tokens_per_second"]
        r["speedup"] = r["tokens_per_second"] / reference_speed


def report(rows: dict[str, dict], reference: str, args, model_path, judge_path, n: int) -> None:
    print(f"model {model_path} · judge {judge_path} · {args.device} · {n} prompts")
    print(f"prompt {args.prompt_length} tokens, gen {args.gen_length}, block {args.block_length}\n")
    print("| run | tok/s | speedup | NFE/token | judge ppl (± s.e.) | entropy | agreement |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        band = math.exp(r["judge_nll"] + r["judge_nll_se"]) - r["judge_ppl"]
        agree = f"{r['agreement']:.3f}" if "agreement" in r else ""
        print(
            f"| {name} | {r['tokens_per_second']:.1f} | {r['speedup']:.2f}x | {r['nfe_per_token']:.3f}"
            f" | {r['judge_ppl']:.2f} ± {band:.2f} | {r['entropy']:.2f} | {agree} |"
        )
    ref = rows[reference]
    ok = [
        (r["speedup"], name)
        for name, r in rows.items()
        if name.startswith("engine") and r["speedup"] >= TARGET and r["judge_nll"] <= ref["judge_nll"]
    ]
    verdict = f"met by {max(ok)[1]} ({max(ok)[0]:.2f}x)" if ok else "not met"
    print(f"\ntarget >= {TARGET:g}x tokens/s at judge perplexity <= the reference loop's: {verdict}")
    if args.json:
        summary = {k: {m: v for m, v in r.items() if m != "outputs"} for k, r in rows.items()}
        summary["settings"] = {k: str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
