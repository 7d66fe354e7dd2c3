"""Block decoding with the exact KV cache vs the AR source's own `model.generate` (greedy, KV cache).

python bench/block_speed.py                                       # tiny llama marked as block 8 (untrained)
python bench/block_speed.py --model CKPT --prompts-from held_out.jsonl --prompt-lengths 64,256 \
    --batches 1,8 --gen-length 64 --thresholds 0.9,0.7 --json bench/results/block_speed.json

Same prompts (the first N tokens of held-out documents), same number of new tokens, same process, no EOS
stopping, for every batch size and prompt length. Rows: the AR source's greedy `generate` (the baseline),
block decoding with the exact cache at each confidence threshold (Fast-dLLM v2's parallel decoding
inside a block), at each `--entropy-bounds` budget (EB-sampler) and with one token per step (low
confidence), and uncached block decoding at the first threshold (the reference the cache must equal:
its agreement column). Rows take turns batch by batch
(a shared machine's slow spells fall on all of them); `--repeats N` keeps each batch's fastest of N runs.
Reported per row: tokens/s and its ratio to the AR row, forward passes per generated position, the cost
of one pass in AR steps (seconds per pass / the AR row's), the judge perplexity of the outputs
under the AR source (conditioned on the prompt; ± one standard error across prompts) and their unigram
entropy. The last line per setting says whether a block row reaches >= 1.0x the AR tokens/s at a judge
perplexity within 1.5x of the AR source's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from sample_speed import judge_nlls, prompts_from, read_documents  # noqa: E402

from adapt.evaluation.evaluate import summarize, unigram_entropy  # noqa: E402
from adapt.loading.model import load_diffusion_model  # noqa: E402
from adapt.sampling import SamplingConfig, generate  # noqa: E402

SPEED_TARGET, QUALITY_TARGET = 1.0, 1.5


def build_default(root: Path, block: int) -> tuple[Path, Path]:
    """A tiny llama (4 x 256, 1024 context), converted and recorded as a block checkpoint (untrained)."""
    from adapt.conversion.convert import convert
    from adapt.tiny import build_tiny_model

    src = build_tiny_model("llama", root / "src", hidden=256, layers=4, max_position_embeddings=1024)
    out = convert(str(src), root / "block").out
    config = json.loads((out / "config.json").read_text())
    config["diffusion"]["block_size"] = block
    (out / "config.json").write_text(json.dumps(config))
    return out, src


def clock(fn):  # noqa: ANN001, ANN201
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


@torch.no_grad()
def ar_generate(
    source, prompts: list[list[int]], gen_length: int, device: str
) -> tuple[list[list[int]], int]:  # noqa: ANN001
    """Greedy `generate` with the KV cache: gen_length new tokens per prompt (prompts of equal length)."""
    ids = torch.tensor(prompts, device=device)
    out = source.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=gen_length,
        min_new_tokens=gen_length,
        do_sample=False,
        pad_token_id=source.generation_config.eos_token_id or 0,
    )
    return out[:, ids.shape[1] :].tolist(), gen_length  # one forward pass per new token


def block_generate(
    model, tokenizer, settings, prompts, config: SamplingConfig
) -> tuple[list[list[int]], int]:  # noqa: ANN001
    out = generate(model, tokenizer, prompts, config, settings)
    return out.sequences, out.nfe


def run_setting(args, model, tokenizer, settings, source, prompts: list[list[int]]) -> dict[str, dict]:  # noqa: ANN001
    """Every row for one (prompt length, batch size): outputs, seconds, forward passes."""
    gen = args.gen_length
    taus = [float(t) for t in args.thresholds.split(",")]
    rows: dict[str, object] = {
        "AR source, greedy generate + KV cache": lambda p: ar_generate(source, p, gen, args.device)
    }
    for tau in taus:
        cfg = SamplingConfig(
            gen_length=gen, strategy="threshold", threshold=tau, cache="prefix", stop_at_eos=False
        )
        rows[f"block, threshold {tau} + exact cache"] = lambda p, c=cfg: block_generate(
            model, tokenizer, settings, p, c
        )
    for bound in [float(b) for b in args.entropy_bounds.split(",") if b]:
        cfg = SamplingConfig(
            gen_length=gen, strategy="entropy_bounded", entropy_bound=bound, cache="prefix", stop_at_eos=False
        )
        rows[f"block, entropy bound {bound} + exact cache"] = lambda p, c=cfg: block_generate(
            model, tokenizer, settings, p, c
        )
    cfg = SamplingConfig(gen_length=gen, strategy="low_confidence", cache="prefix", stop_at_eos=False)
    rows["block, 1 token/step + exact cache"] = lambda p, c=cfg: block_generate(
        model, tokenizer, settings, p, c
    )
    cfg = SamplingConfig(
        gen_length=gen, strategy="threshold", threshold=taus[0], cache="none", stop_at_eos=False
    )
    rows[f"block, threshold {taus[0]}, no cache (reference)"] = lambda p, c=cfg: block_generate(
        model, tokenizer, settings, p, c
    )
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    results = {name: {"outputs": [], "seconds": 0.0, "passes": 0, "batches": len(batches)} for name in rows}
    for fn in rows.values():
        fn(batches[0])  # warm-up
    # batch by batch, every row in turn, so that a slow spell of a shared machine falls on all rows alike;
    # each batch's time is the fastest of --repeats runs (the outputs are deterministic)
    for b in batches:
        for name, fn in rows.items():
            timed = [clock(lambda b=b, fn=fn: fn(b)) for _ in range(args.repeats)]
            (seqs, nfe), _ = timed[0]
            r = results[name]
            r["outputs"] += seqs
            r["seconds"] += min(s for _, s in timed)
            r["passes"] += nfe
    return results


def score(results: dict[str, dict], judge, prompts, gen_length: int, device: str) -> None:  # noqa: ANN001
    base = results["AR source, greedy generate + KV cache"]
    reference = next(r for n, r in results.items() if "reference" in n)
    cached = next(r for n, r in results.items() if "threshold" in n and "exact cache" in n)
    for r in results.values():
        tokens = sum(len(o) for o in r["outputs"])
        r["tokens_per_s"] = tokens / r["seconds"]
        r["speedup"] = r["tokens_per_s"] / (sum(len(o) for o in base["outputs"]) / base["seconds"])
        r["passes_per_token"] = r["passes"] / (r["batches"] * gen_length)
        r["pass_cost"] = (r["seconds"] / r["passes"]) / (base["seconds"] / base["passes"])  # AR steps
        nlls = torch.tensor(judge_nlls(judge, prompts, r["outputs"], device), dtype=torch.float64)
        judged = summarize(nlls, torch.tensor([len(o) for o in r["outputs"]]))
        r["judge_ppl"], r["judge_nll_se"] = judged["ppl"], judged["nll_stderr"]
        r["entropy"] = sum(unigram_entropy(o) for o in r["outputs"]) / len(r["outputs"])
    reference["agreement"] = sum(
        a == b
        for x, y in zip(reference["outputs"], cached["outputs"], strict=True)
        for a, b in zip(x, y, strict=True)
    ) / sum(len(x) for x in reference["outputs"])


def report(results: dict[str, dict], title: str) -> str:
    import math

    base = results["AR source, greedy generate + KV cache"]
    lines = [
        f"\n{title}",
        "| run | tok/s | vs AR | passes/token | pass cost (AR steps) | judge ppl (± s.e.) | entropy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        band = (
            r["judge_ppl"] * (math.exp(r["judge_nll_se"]) - 1)
            if r["judge_nll_se"] == r["judge_nll_se"]
            else 0
        )
        extra = f" (agreement with the exact cache {r['agreement']:.3f})" if "agreement" in r else ""
        lines.append(
            f"| {name}{extra} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['passes_per_token']:.3f} "
            f"| {r['pass_cost']:.2f} | {r['judge_ppl']:.2f} ± {band:.2f} | {r['entropy']:.2f} |"
        )
    limit = QUALITY_TARGET * base["judge_ppl"]
    good = [
        n
        for n, r in results.items()
        if "block" in n and r["speedup"] >= SPEED_TARGET and r["judge_ppl"] <= limit
    ]
    verdict = f"met by: {', '.join(good)}" if good else "not met"
    lines.append(
        f"target (>= {SPEED_TARGET:.1f}x the AR source's tokens/s at judge ppl <= {QUALITY_TARGET}x "
        f"{base['judge_ppl']:.2f}): {verdict}"
    )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="block-diffusion checkpoint (default: a tiny untrained one)")
    ap.add_argument(
        "--source", help="AR source: generates the baseline and judges (default: recorded source)"
    )
    ap.add_argument("--prompts-from", type=Path, help="held-out documents (.jsonl with text, or .txt)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per setting")
    ap.add_argument("--prompt-lengths", default="64,256")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block", type=int, default=8, help="block size of the default tiny checkpoint")
    ap.add_argument("--thresholds", default="0.9,0.7", help="comma-separated confidence thresholds")
    ap.add_argument(
        "--entropy-bounds", default="", help="comma-separated entropy budgets (nats) of EB-sampler rows"
    )
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each batch; its fastest is kept")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", type=Path, help="also write the results here")
    return ap.parse_args()


def main() -> None:
    from transformers import AutoModelForCausalLM

    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    model_path, source_path = args.model, args.source
    if model_path is None:
        model_path, source_path = build_default(Path(tmp.name), args.block)
    model, tokenizer, settings = load_diffusion_model(model_path, dtype=args.dtype, device=args.device)
    if not settings.block_size:
        raise SystemExit(f"{model_path} is not a block-diffusion checkpoint (no block_size recorded)")
    source_path = source_path or settings.source_model
    dtype = getattr(torch, args.dtype)
    source = AutoModelForCausalLM.from_pretrained(source_path, dtype=dtype).to(args.device).eval()
    documents = read_documents(args.prompts_from)
    print(
        f"model {model_path} (block size {settings.block_size}), AR source {source_path}; {args.device} "
        f"{args.dtype}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}; "
        f"{args.prompts} prompts, {args.gen_length} new tokens each"
    )
    record = {"settings": vars(args) | {"model": str(model_path), "source": str(source_path)}, "rows": {}}
    for length in (int(x) for x in args.prompt_lengths.split(",")):
        prompts = prompts_from(tokenizer, documents, args.prompts, length)
        prompts = [[tokenizer.bos_token_id, *p] if tokenizer.bos_token_id is not None else p for p in prompts]
        for batch in (int(x) for x in args.batches.split(",")):
            args.batch = batch
            results = run_setting(args, model, tokenizer, settings, source, prompts)
            score(results, source, prompts, args.gen_length, args.device)
            title = f"prompt {length} tokens, batch {batch}"
            print(report(results, title), flush=True)
            record["rows"][title] = {
                n: {k: v for k, v in r.items() if k != "outputs"} for n, r in results.items()
            }
            record["rows"][title]["samples"] = {
                n: tokenizer.decode(r["outputs"][0]) for n, r in results.items()
            }
    if args.json:
        args.json.write_text(json.dumps(record, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
