"""Draft by diffusion, verify autoregressively: the adapted model's decoders against its AR source.

python bench/verify_speed.py                        # tiny llama recorded as a joint checkpoint (untrained)
python bench/verify_speed.py --model CKPT --prompts-from held_out.jsonl --prompts 16 \
    --prompt-lengths 64,256 --batches 1,8 --gen-length 128 --dtype auto --json bench/results/verify.json

Rows, in one process, taking turns batch by batch (a shared machine's slow spells fall on all of them;
`--repeats N` keeps each batch's fastest of N runs), on the same prompts (the first N tokens of held-out
documents), the same number of new tokens, no EOS stopping:
- the AR source's greedy `generate` with its KV cache (the baseline),
- the adapted model's own AR stream (`--strategy ar`): the output `verify` must reproduce,
- threshold decoding of its diffusion stream (`--thresholds`),
- `--strategy verify` at each `--drafts` setting (draft length, `cK`: K candidates for the next token,
  `mM`: mask blocks of M masks, `r` / `n`: redraft on / off; e.g. d,3n,1m2r,c3m2r).
Reported per row: tokens/s and its ratio to the AR source, tokens committed per pass, the cost of one pass in
AR steps, the acceptance rate by draft position, the judge perplexity of the outputs under the AR source
(conditioned on the prompt, ± one standard error across prompts), and the share of tokens equal to the
adapted model's `ar` output (agreement; greedy verify must give 1.000 in float32). Once per run: the
held-out perplexity of the adapted model's AR stream against the AR source's (teacher-forced, causal).
The last line per setting says whether a verify row reaches the target (>= 1.5x the AR source's tokens/s,
output identical to `ar`, judge perplexity within 1.1x of the AR source's greedy output).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from block_speed import ar_generate, clock  # noqa: E402
from block_speed import build_default as block_default  # noqa: E402
from sample_speed import judge_nlls, prompts_from, read_documents  # noqa: E402

from adapt.evaluation.evaluate import summarize  # noqa: E402
from adapt.loading.model import load_diffusion_model  # noqa: E402
from adapt.sampling import SamplingConfig, generate  # noqa: E402
from adapt.sampling.ar_stream import check_checkpoint  # noqa: E402
from adapt.sampling.config import acceptance, add_counts  # noqa: E402

SPEED_TARGET, QUALITY_TARGET = 1.5, 1.1
BASE = "AR source, greedy generate + KV cache"
OWN_AR = "adapted, --strategy ar"


def build_default(root: Path, block: int) -> tuple[Path, Path]:
    """block_speed's tiny llama (4 x 256, 1024 context), recorded as a joint checkpoint (untrained)."""
    out, src = block_default(root, block)
    config = json.loads((out / "config.json").read_text())
    config["diffusion"].update(clean_attention="causal", ar_loss_weight=1.0)
    (out / "config.json").write_text(json.dumps(config))
    return out, src


def draft_settings(text: str) -> list[dict]:
    """'3,1m2r,c3m2n,d' -> the SamplingConfig fields each verify row sets (the others keep their defaults):
    a draft length (d or none: the default), `cK` K candidates for the next token, `mM` mask blocks of M
    masks, `r` / `n` redraft on / off."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        m = re.fullmatch(r"(d|\d+)?(?:c(\d+))?(?:m(\d+))?([rn])?", item)
        if m is None:
            raise SystemExit(f"--drafts: cannot read {item!r} (e.g. 3, 1m2r, c3m2n, d)")
        length, candidates, masks, redraft = m.groups()
        fields: dict = {}
        if length and length != "d":
            fields["draft_length"] = int(length)
        if candidates:
            fields["candidates"] = int(candidates)
        if masks:
            fields["mask_block"] = int(masks)
        if redraft:
            fields["redraft"] = redraft == "r"
        out.append(fields)
    return out


def row_name(config: SamplingConfig, settings) -> str:  # noqa: ANN001
    """The verify row's name, from the settings it resolves to."""
    length, masks = check_checkpoint(config, settings)
    what = f"{config.candidates} candidates" if config.candidates > 1 else f"{length} drafts"
    return f"adapted, verify, {what}, mask blocks of {masks}{' + redraft' if config.redraft else ''}"


def rows_for(args, model, tokenizer, settings, source) -> dict[str, object]:  # noqa: ANN001
    """name -> fn(prompts) -> (outputs, passes, GenerationOutput | None)."""
    gen = args.gen_length

    def adapted(config: SamplingConfig):  # noqa: ANN202
        def fn(prompts):  # noqa: ANN001, ANN202
            out = generate(model, tokenizer, prompts, config, settings)
            return out.sequences, out.nfe, out

        return fn

    rows: dict[str, object] = {BASE: lambda p: (*ar_generate(source, p, gen, args.device), None)}
    rows[OWN_AR] = adapted(SamplingConfig(gen_length=gen, strategy="ar", stop_at_eos=False))
    for tau in [float(t) for t in args.thresholds.split(",") if t]:
        cfg = SamplingConfig(gen_length=gen, strategy="threshold", threshold=tau, stop_at_eos=False)
        rows[f"adapted, threshold {tau}"] = adapted(cfg)
    for fields in draft_settings(args.drafts):
        cfg = SamplingConfig(gen_length=gen, strategy="verify", stop_at_eos=False, **fields)
        rows[row_name(cfg, settings)] = adapted(cfg)
    return rows


def run_setting(args, rows: dict[str, object], prompts: list[list[int]]) -> dict[str, dict]:  # noqa: ANN001
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    results = {
        name: {
            "outputs": [],
            "seconds": 0.0,
            "passes": 0,
            "batches": len(batches),
            "drafted": [],
            "accepted": [],
        }
        for name in rows
    }
    for fn in rows.values():
        fn(batches[0])  # warm-up
    for b in batches:
        for name, fn in rows.items():
            timed = [clock(lambda b=b, fn=fn: fn(b)) for _ in range(args.repeats)]
            (seqs, passes, out), _ = timed[0]
            r = results[name]
            r["outputs"] += seqs
            r["seconds"] += min(s for _, s in timed)
            r["passes"] += passes
            if out is not None:
                r["drafted"] = add_counts(r["drafted"], out.drafted)
                r["accepted"] = add_counts(r["accepted"], out.accepted)
    return results


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    same = sum(a == b for x, y in zip(outputs, reference, strict=True) for a, b in zip(x, y, strict=True))
    return same / sum(len(y) for y in reference)


def score(results: dict[str, dict], judge, prompts, gen_length: int, device: str) -> None:  # noqa: ANN001
    base, own = results[BASE], results[OWN_AR]
    base_rate = sum(len(o) for o in base["outputs"]) / base["seconds"]
    for r in results.values():
        tokens = sum(len(o) for o in r["outputs"])
        r["tokens_per_s"] = tokens / r["seconds"]
        r["speedup"] = r["tokens_per_s"] / base_rate
        r["tokens_per_pass"] = tokens / r["passes"] / (len(r["outputs"]) / r["batches"])  # per row
        r["pass_cost"] = (r["seconds"] / r["passes"]) / (base["seconds"] / base["passes"])  # AR steps
        r["acceptance"] = acceptance(r["accepted"], r["drafted"])
        nlls = torch.tensor(judge_nlls(judge, prompts, r["outputs"], device), dtype=torch.float64)
        judged = summarize(nlls, torch.tensor([len(o) for o in r["outputs"]]))
        r["judge_ppl"], r["judge_nll_se"] = judged["ppl"], judged["nll_stderr"]
        r["agreement_with_ar"] = agreement(r["outputs"], own["outputs"])


def report(results: dict[str, dict], title: str) -> str:
    base = results[BASE]
    lines = [
        f"\n{title}",
        "| run | tok/s | vs AR source | tokens/pass | pass cost (AR steps) | acceptance by draft position "
        "| judge ppl (± s.e.) | agreement with ar |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        se = r["judge_nll_se"]
        band = r["judge_ppl"] * (math.exp(se) - 1) if se == se else 0.0
        accept = " ".join(f"{a:.2f}" for a in r["acceptance"]) or "-"
        lines.append(
            f"| {name} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['tokens_per_pass']:.2f} "
            f"| {r['pass_cost']:.2f} | {accept} | {r['judge_ppl']:.2f} ± {band:.2f} "
            f"| {r['agreement_with_ar']:.3f} |"
        )
    limit = QUALITY_TARGET * base["judge_ppl"]
    good = [
        n
        for n, r in results.items()
        if "verify" in n
        and r["speedup"] >= SPEED_TARGET
        and r["agreement_with_ar"] == 1.0
        and r["judge_ppl"] <= limit
    ]
    verdict = f"met by: {', '.join(good)}" if good else "not met"
    near = [
        f"{n} ({r['agreement_with_ar']:.3f})"
        for n, r in results.items()
        if "verify" in n and n not in good and r["speedup"] >= SPEED_TARGET and r["judge_ppl"] <= limit
    ]
    if near:  # bf16: the two decoders' passes differ in shape, so their roundings (and near-ties) differ
        verdict += (
            "; speed and judge ppl met, output agreeing with ar on a share of tokens, by: " + ", ".join(near)
        )
    lines.append(
        f"target (>= {SPEED_TARGET}x the AR source's tokens/s, output = ar, judge ppl <= {QUALITY_TARGET}x "
        f"{base['judge_ppl']:.2f}): {verdict}"
    )
    return "\n".join(lines)


@torch.no_grad()
def held_out_ppl(model, documents, tokenizer, windows: int, length: int, device: str, never=()) -> dict:  # noqa: ANN001
    """Teacher-forced perplexity of a causal model on the first `windows` windows of `length` tokens, over
    the tokens it can produce (`never`: ids left out, as adapt's decoders leave out the mask token and the
    embedding rows past the tokenizer)."""
    chunks = prompts_from(tokenizer, documents, windows, length)
    nlls = []
    for c in chunks:
        x = torch.tensor(
            [[tokenizer.bos_token_id, *c] if tokenizer.bos_token_id is not None else c], device=device
        )
        logits = model(input_ids=x).logits[0, :-1].float()
        logits[:, list(never)] = float("-inf")
        logp = logits.log_softmax(-1)
        nlls.append(-logp.gather(-1, x[0, 1:, None]).mean().item())
    s = summarize(torch.tensor(nlls, dtype=torch.float64), torch.full((len(nlls),), length))
    return {"ppl": s["ppl"], "nll_stderr": s["nll_stderr"], "windows": len(nlls), "length": length}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="joint checkpoint (default: a tiny untrained one)")
    ap.add_argument("--source", help="AR source: the baseline and the judge (default: recorded source)")
    ap.add_argument("--prompts-from", type=Path, help="held-out documents (.jsonl with text, or .txt)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per setting")
    ap.add_argument("--prompt-lengths", default="64,256")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block", type=int, default=4, help="block size of the default tiny checkpoint")
    ap.add_argument("--thresholds", default="0.9", help="comma-separated thresholds of threshold rows")
    ap.add_argument(
        "--drafts",
        default="d,3n",
        help="verify rows: draft length, cK = K candidates, mM = mask blocks of M, r/n = redraft on/off",
    )
    ap.add_argument("--ppl-windows", type=int, default=16, help="held-out windows for the AR stream's ppl")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each batch; its fastest is kept")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, or auto (adapt's rule)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    return ap.parse_args()


def main() -> None:
    from transformers import AutoModelForCausalLM

    from adapt.loading.precision import weights_dtype

    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    model_path, source_path = args.model, args.source
    if model_path is None:
        model_path, source_path = build_default(Path(tmp.name), args.block)
    chosen, why = weights_dtype(args.dtype, args.device)
    dtype_name = str(chosen).removeprefix("torch.")
    model, tokenizer, settings = load_diffusion_model(model_path, dtype=dtype_name, device=args.device)
    source_path = source_path or settings.source_model
    source = AutoModelForCausalLM.from_pretrained(source_path, dtype=chosen).to(args.device).eval()
    documents = read_documents(args.prompts_from)
    print(
        f"model {model_path} (block size {settings.block_size}, ar_loss_weight {settings.ar_loss_weight}), "
        f"AR source {source_path}; {args.device} {dtype_name} ({why}), {torch.get_num_threads()} threads, "
        f"CPU {torch.backends.cpu.get_cpu_capability()}; {args.prompts} prompts, {args.gen_length} new tokens"
    )
    stream = (
        AutoModelForCausalLM.from_pretrained(model_path, dtype=chosen, is_causal=True).to(args.device).eval()
    )
    vocab_rows = stream.get_output_embeddings().weight.shape[0]
    never = [settings.mask_token_id, *range(len(tokenizer), vocab_rows)]
    quality = {
        "adapted AR stream": held_out_ppl(
            stream, documents, tokenizer, args.ppl_windows, 128, args.device, never
        ),
        "AR source": held_out_ppl(source, documents, tokenizer, args.ppl_windows, 128, args.device),
    }
    del stream
    print(
        "held-out perplexity (teacher-forced, 128-token windows): "
        + ", ".join(f"{k} {v['ppl']:.2f}" for k, v in quality.items())
        + f" ({quality['adapted AR stream']['ppl'] / quality['AR source']['ppl']:.3f}x)"
    )
    rows = rows_for(args, model, tokenizer, settings, source)
    record = {
        "settings": vars(args) | {"model": str(model_path), "source": str(source_path), "dtype": dtype_name},
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "held_out_ppl": quality,
        "rows": {},
    }
    for length in (int(x) for x in args.prompt_lengths.split(",")):
        prompts = prompts_from(tokenizer, documents, args.prompts, length)
        prompts = [[tokenizer.bos_token_id, *p] if tokenizer.bos_token_id is not None else p for p in prompts]
        for batch in (int(x) for x in args.batches.split(",")):
            args.batch = batch
            results = run_setting(args, rows, prompts)
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
