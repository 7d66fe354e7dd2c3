"""Evaluation: the ELBO estimator against exact enumeration, AR perplexity by hand, the CLI end to end."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapt.cli import app
from adapt.evaluation.evaluate import (
    EvalConfig,
    elbo_samples,
    evaluate_model,
    masked_accuracy,
    summarize,
    token_windows,
    unigram_entropy,
)
from adapt.loading.model import load_diffusion_model
from adapt.tiny import SAMPLE_TEXT


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("evaldata") / "eval.jsonl"
    docs = [line for line in SAMPLE_TEXT.splitlines() if line.strip()] * 2
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return p


def beta(k: int, n: int) -> float:
    """Integral over t in (0, 1) of (1/t) t^k (1 - t)^(n - k): weight of one k-subset in the ELBO."""
    return math.factorial(k - 1) * math.factorial(n - k) / math.factorial(n)


def exact_elbo(model, window: torch.Tensor, mask_id: int) -> float:
    """E_t[(1/t) sum_masked CE] / n by enumerating every mask pattern (shift: position 0 is context)."""
    n = window.numel() - 1
    total = 0.0
    for k in range(1, n + 1):
        for subset in itertools.combinations(range(1, n + 1), k):
            x = window.clone()
            x[list(subset)] = mask_id
            with torch.no_grad():
                logp = model(input_ids=x[None]).logits[0].float().log_softmax(-1)  # [l, V]
            ce = sum(-float(logp[j - 1, window[j]]) for j in subset)  # shift: token j is read at j - 1
            total += beta(k, n) * ce
    return total / n


def test_elbo_monte_carlo_matches_exact_enumeration(llama_diffusion: Path) -> None:
    model, tok, settings = load_diffusion_model(llama_diffusion)
    assert settings.shift
    window = torch.tensor(tok("The river ran slowly")["input_ids"][:5])  # 4 predicted tokens, 15 patterns
    exact = exact_elbo(model, window, settings.mask_token_id)
    gen = torch.Generator().manual_seed(0)
    est, tokens = elbo_samples(model, window[None], settings, mc_samples=768, batch_size=256, generator=gen)
    assert tokens.tolist() == [4]
    mean, se = float(est.mean()), float(est.std() / math.sqrt(est.numel()))
    assert abs(mean - exact) < 4 * se + 0.01 * exact, (mean, exact, se)
    # the estimate is not trivially the plain masked CE: a wrong weighting (no 1/t) is far off
    assert se < 0.1 * exact


def test_ar_perplexity_is_exp_mean_nll_by_hand(llama_src: Path, text_file: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = EvalConfig(data=str(text_file), seq_len=16, max_sequences=6, batch_size=4)
    row = evaluate_model(str(llama_src), cfg)
    model = AutoModelForCausalLM.from_pretrained(llama_src).eval()
    tok = AutoTokenizer.from_pretrained(llama_src)
    windows = token_windows(str(text_file), tok, 16, 6)
    with torch.no_grad():
        logp = model(input_ids=windows).logits.log_softmax(-1)  # [n, l, V]
    nll = -logp[:, :-1].gather(-1, windows[:, 1:, None]).squeeze(-1)  # [n, l-1]
    assert row["kind"] == "ar" and row["tokens"] == nll.numel() == 6 * 15
    assert row["ppl"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    assert row["nll_stderr"] == pytest.approx(float(nll.mean(1).std() / math.sqrt(6)), rel=1e-4)


def test_token_windows_are_the_document_stream_cut(llama_src: Path, text_file: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_src)
    docs = [json.loads(line)["text"] for line in text_file.read_text().splitlines()]
    stream = [t for d in docs for t in tok(d)["input_ids"] + [tok.eos_token_id]]
    w = token_windows(str(text_file), tok, 10, 1000)
    assert w.shape == (len(stream) // 10, 10)
    assert w.flatten().tolist() == stream[: w.numel()]


def test_masked_accuracy_with_known_predictions(llama_diffusion: Path) -> None:
    model, _, settings = load_diffusion_model(llama_diffusion)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: argmax is token 0 everywhere
    zeros = torch.zeros(4, 12, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    acc, n = masked_accuracy(model, zeros, settings, 0.5, generator=gen)
    assert acc == 1.0 and 0 < n <= 4 * 11  # position 0 never masked with shift
    acc, n = masked_accuracy(model, zeros + 7, settings, 0.9, generator=gen)
    assert acc == 0.0 and n > 0
    _, n_all = masked_accuracy(model, zeros + 7, settings, 1.0, generator=gen)
    assert n_all == 4 * 11


def test_summary_and_entropy_by_hand() -> None:
    s = summarize(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([10, 10, 10]))
    assert s["nll"] == pytest.approx(2.0) and s["ppl"] == pytest.approx(math.exp(2.0))
    assert s["nll_stderr"] == pytest.approx(1 / math.sqrt(3)) and s["tokens"] == 30
    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy([5, 5, 5]) == 0.0


def test_cli_eval_side_by_side_save_plot_and_card(
    llama_diffusion: Path, llama_src: Path, text_file: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(llama_diffusion, ckpt)
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    args = ["eval", str(ckpt), str(llama_src), "--data", str(text_file), "--seq-len", "16"]
    args += ["--max-sequences", "4", "--mc-samples", "2", "--json", str(out_json), "--save"]
    args += ["--plot", str(out_png), "--gen-steps", "2,4", "--gen-samples", "2", "--gen-length", "8"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    results = json.loads(out_json.read_text())
    kinds = [r["kind"] for r in results["models"]]
    assert kinds == ["diffusion", "ar"]
    diff, ar = results["models"]
    assert diff["tokens"] == ar["tokens"] == 4 * 15  # the same predicted tokens
    assert diff["mc_samples"] == 2 and set(diff["masked_accuracy"]) == {"0.15", "0.5", "0.9"}
    assert math.isfinite(diff["nll_stderr"]) and diff["ppl"] > 1
    assert [g["steps"] for g in results["gen_ppl"]] == [2, 4]
    assert [g["nfe"] for g in results["gen_ppl"]] == [2, 4]
    assert all(g["gen_ppl"] > 1 and g["tokens"] > 0 for g in results["gen_ppl"])
    assert json.loads((ckpt / "eval_results.json").read_text()) == results
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in ckpt.glob(".*")] == [".adapt-owner.json"]  # no temporary file left
    assert "eval_results.json" in json.loads((ckpt / ".adapt-owner.json").read_text())["files"]

    from adapt.publishing.hub import plan_push

    card = plan_push(ckpt, "someone/tiny").card
    assert "## Evaluation" in card and "| `llama` | autoregressive |" in card
    assert f"{ar['ppl']:.2f}" in card


def test_cli_eval_bad_input_is_one_line_error(llama_diffusion: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["eval", str(llama_diffusion), "--data", str(tmp_path / "nope.txt")])
    assert res.exit_code == 1 and res.output.startswith("error: ") and "nope.txt" in res.output
    short = tmp_path / "short.txt"
    short.write_text("tiny\n")
    res = CliRunner().invoke(app, ["eval", str(llama_diffusion), "--data", str(short), "--seq-len", "64"])
    assert res.exit_code == 1 and "fewer than one window" in res.output


TASKS = Path(__file__).parent / "lm_eval_tasks"


def test_lm_eval_model_on_local_tasks(llama_diffusion: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import adapt.evaluation.lm_eval_model  # noqa: F401  (registers model type "adapt")

    monkeypatch.chdir(TASKS.parent.parent)  # the task files name their data relative to the repo root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    tasks = ["adapt_tiny_mc", "adapt_tiny_rolling", "adapt_tiny_gen"]
    out = lm_eval.simple_evaluate(
        model="adapt", model_args=f"pretrained={llama_diffusion},mc_samples=2,max_gen_toks=8",
        tasks=tasks, task_manager=tm, bootstrap_iters=0,
    )  # fmt: skip
    res = out["results"]
    assert 0.0 <= res["adapt_tiny_mc"]["acc,none"] <= 1.0 and res["adapt_tiny_mc"]["sample_len"] == 3
    assert math.isfinite(res["adapt_tiny_rolling"]["bits_per_byte,none"])
    assert res["adapt_tiny_rolling"]["bits_per_byte,none"] > 0
    assert res["adapt_tiny_gen"]["exact_match,none"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_lm_eval_loglikelihood_of_one_token_is_its_masked_nll(llama_diffusion: Path) -> None:
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from adapt.evaluation.lm_eval_model import AdaptLM

    lm = AdaptLM(str(llama_diffusion), mc_samples=4096, batch_size=512)
    ctx, cont = lm.split_pair("The river ran", " slowly")
    cont = cont[:1]
    # one scored token: every mask pattern is "that token masked", so the ELBO is exact
    x = torch.tensor([ctx + [lm.settings.mask_token_id]])
    with torch.no_grad():
        logp = lm.model(input_ids=x).logits[0, -2].log_softmax(-1)  # shift: read at the previous position
    exact = float(logp[cont[0]])
    text = lm.tokenizer.decode(cont)
    ((ll, greedy),) = lm.loglikelihood([SimpleNamespace(args=("The river ran", text))])
    assert ll == pytest.approx(exact, rel=0.15)
    assert greedy == (int(logp.argmax()) == cont[0])
