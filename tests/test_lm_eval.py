"""lm-eval as users run it: `adapt lm-eval` end to end, batching, two processes, each checkpoint's bound."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

pytest.importorskip("lm_eval")

from adapt.cli import app  # noqa: E402
from adapt.core.errors import AdaptError  # noqa: E402
from adapt.evaluation.evaluate import elbo_samples  # noqa: E402
from adapt.evaluation.lm_eval_model import AdaptLM, request_seed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parent.parent
TASKS = [
    "--tasks",
    "adapt_tiny_mc,adapt_tiny_rolling,adapt_tiny_gen",
    "--include_path",
    "tests/lm_eval_tasks",
]
PAIRS = [
    ("The river ran", " slowly past the old mill"),
    ("Question: what is two plus three? Answer:", " five"),
    ("A", " traveller came to the mill one evening and asked for bread"),
    ("Every morning she counted the", " sacks"),
    ("", " The mill"),
]
TEXTS = ["The river ran slowly past the old mill.", "A traveller came to the mill one evening."]


@pytest.fixture(scope="module", autouse=True)
def lm_eval_logs_to_the_real_stderr() -> None:
    """lm-eval binds its log handler to sys.stderr once per process: bound to the stream of one
    CliRunner call, it would fail to write during the next one."""
    import logging

    from lm_eval.utils import setup_logging

    setup_logging()
    for handler in logging.getLogger("lm_eval").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.__stderr__)


@pytest.fixture(scope="module")
def block_llama(converted: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama recorded as a block-diffusion checkpoint of block size 4."""
    path = tmp_path_factory.mktemp("block") / "llama"
    shutil.copytree(converted["llama"], path)
    config = json.loads((path / "config.json").read_text())
    config["diffusion"]["block_size"] = 4
    (path / "config.json").write_text(json.dumps(config))
    return path


def requests(*args: tuple) -> list[SimpleNamespace]:
    return [SimpleNamespace(args=a) for a in args]


def run_all(lm: AdaptLM, batch_size: int) -> tuple[list, list, list]:
    lm.batch_size = batch_size
    gen = {"until": ["\n"], "max_gen_toks": 8}
    return (
        lm.loglikelihood(requests(*PAIRS)),
        lm.loglikelihood_rolling(requests(*[(t,) for t in TEXTS])),
        lm.generate_until(requests(*[(c, gen) for c, _ in PAIRS[:4]])),
    )


@pytest.mark.parametrize("kind", ["full", "block"])
def test_batched_scores_equal_unbatched(kind: str, llama_diffusion: Path, block_llama: Path) -> None:
    lm = AdaptLM(str(block_llama if kind == "block" else llama_diffusion), mc_samples=4)
    alone, rolling_alone, texts_alone = run_all(lm, 1)
    batched, rolling_batched, texts_batched = run_all(lm, 4)  # rows of different lengths, right-padded
    diffs = [abs(a[0] - b[0]) for a, b in zip(alone, batched, strict=True)]
    diffs += [abs(a - b) for a, b in zip(rolling_alone, rolling_batched, strict=True)]
    assert max(diffs) < 1e-4, diffs
    assert [g for _, g in alone] == [g for _, g in batched]
    assert texts_alone == texts_batched
    assert alone[-1][0] < 0 and len({round(ll, 3) for ll, _ in alone}) == len(PAIRS)


@pytest.mark.parametrize("kind", ["full", "block"])
def test_a_request_is_scored_with_the_checkpoints_own_bound(
    kind: str, llama_diffusion: Path, block_llama: Path
) -> None:
    """The lm-eval score is `adapt eval`'s estimator (per-block t for block checkpoints) on the request,
    with the request's own generator; the full-attention bound on a block checkpoint is another number."""
    lm = AdaptLM(str(block_llama if kind == "block" else llama_diffusion), mc_samples=8, seed=5)
    ctx, cont = lm.split_pair(*PAIRS[2])
    ((ll, _),) = lm.loglikelihood(requests(PAIRS[2]))
    window = torch.tensor([ctx + cont])
    prompt = torch.zeros_like(window, dtype=torch.bool)
    prompt[:, : len(ctx)] = True

    def bound(settings: object) -> float:
        gen = torch.Generator().manual_seed(request_seed(5, ctx, cont))
        est, tokens = elbo_samples(lm.model, window, settings, 8, 64, 1e-3, gen, prompt)
        return -float(est.mean()) * int(tokens[0])

    assert ll == pytest.approx(bound(lm.settings), rel=1e-6)
    if kind == "block":
        assert lm.settings.block_size == 4
        assert abs(ll - bound(lm.settings.with_block_size(None))) > 1e-3


def in_repo_root(args: list[str]) -> Result:
    """`adapt ARGS` run from the repository root (the task files name their data relative to it)."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return CliRunner().invoke(app, args)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def one_process(llama_diffusion: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`adapt lm-eval` on the three tiny tasks in this process: (output dir, its console output)."""
    out = tmp_path_factory.mktemp("lm_eval") / "one"
    model_args = f"pretrained={llama_diffusion},mc_samples=3,seed=7,max_gen_toks=8"
    args = ["lm-eval", "--model_args", model_args, *TASKS, "--batch_size", "2", "--output_path", str(out),
            "--log_samples", "--device", "cpu"]  # fmt: skip
    res = in_repo_root(args)
    assert res.exit_code == 0, res.output
    return out, res.output


def results(out: Path) -> dict:
    (path,) = out.glob("*/results_*.json")
    return json.loads(path.read_text())


def samples(out: Path) -> dict[str, dict[int, list]]:
    """Per task, per document: the responses scored (files are samples_TASK_TIMESTAMP.jsonl).

    `filtered_resps`: under several processes lm-eval pads a rank's requests with repeats of its last
    one, whose extra responses it appends to `resps` and leaves out of the metrics."""
    found: dict[str, dict[int, list]] = {}
    for path in out.glob("*/samples_*.jsonl"):
        task = re.match(r"samples_(.+)_\d{4}-", path.name).group(1)  # type: ignore[union-attr]
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        found[task] = {r["doc_id"]: r["filtered_resps"] for r in rows}
    return found


def leaves(x: object) -> list[object]:
    return [leaf for item in x for leaf in leaves(item)] if isinstance(x, list) else [x]


def same_responses(a: list, b: list) -> bool:
    """Texts equal, log-likelihoods to float tolerance (they come from differently padded batches);
    the files hold every value as text, the worker's record numbers and booleans."""
    pairs = list(zip(leaves(a), leaves(b), strict=True))
    return all(str(x) == str(y) or abs(float(x) - float(y)) < 1e-5 for x, y in pairs)  # type: ignore[arg-type]


def test_adapt_lm_eval_writes_results_with_seed_and_mc_samples(one_process: tuple[Path, str]) -> None:
    out, console = one_process
    r = results(out)
    assert r["config"]["model"] == "adapt"
    info = r["config"]["adapt"]
    assert info["seed"] == 7 and info["mc_samples"] == 3 and info["batch_size"] == 2
    assert info["world_size"] == 1 and info["sampler"]["strategy"] == "low_confidence"
    assert set(r["results"]) == {"adapt_tiny_mc", "adapt_tiny_rolling", "adapt_tiny_gen"}
    assert 0 <= r["results"]["adapt_tiny_mc"]["acc,none"] <= 1
    assert len(list(out.glob("*/samples_*.jsonl"))) == 3
    assert "loglikelihood: 100%" in console and "|adapt_tiny_mc" in console  # progress, then the table


# Each changes the tiny model's greedy text (checked below). Not threshold decoding at 0.5: no confidence of
# the random tiny model comes near it (they are near 1/vocab), so it decodes as low_confidence would.
SAMPLER = {"strategy": "margin", "steps": 4, "block_length": 4}


def test_sampler_model_args_few_shot_and_limit_reach_the_run(llama_diffusion: Path, tmp_path: Path) -> None:
    """Non-default sampler options with --num_fewshot 1 and --limit 2: recorded in the results, and the
    responses are what adapt's sampler gives with those options and differ without any one of them."""
    out = tmp_path / "out"
    options = ",".join(f"{k}={v}" for k, v in SAMPLER.items())
    model_args = f"pretrained={llama_diffusion},seed=7,max_gen_toks=8,{options}"
    args = ["lm-eval", "--model_args", model_args, "--tasks", "adapt_tiny_gen", "--include_path",
            "tests/lm_eval_tasks", "--num_fewshot", "1", "--limit", "2", "--batch_size", "2",
            "--output_path", str(out), "--log_samples", "--device", "cpu"]  # fmt: skip
    res = in_repo_root(args)
    assert res.exit_code == 0, res.output
    r = results(out)
    assert {k: r["config"]["adapt"]["sampler"][k] for k in SAMPLER} == SAMPLER
    assert r["n-shot"]["adapt_tiny_gen"] == 1 and r["config"]["limit"] == 2
    (path,) = out.glob("*/samples_adapt_tiny_gen_*.jsonl")
    logged = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(logged) == 2
    lm = AdaptLM(str(llama_diffusion), device="cpu")
    requests = [(row["arguments"]["gen_args_0"]["arg_0"], row["arguments"]["gen_args_0"]["arg_1"]["until"])
                for row in logged]  # fmt: skip
    assert all(prompt.count("Question:") == 2 for prompt, _ in requests)  # one example shot, the question
    responses = [row["resps"][0][0] for row in logged]
    assert responses == [sampled(lm, prompt, until, SAMPLER) for prompt, until in requests]
    for dropped in SAMPLER:
        without = {k: v for k, v in SAMPLER.items() if k != dropped}
        assert responses != [sampled(lm, prompt, until, without) for prompt, until in requests], dropped


def sampled(lm: AdaptLM, prompt: str, until: list[str], options: dict) -> str:
    """adapt's sampler on `prompt` with `options` (8 tokens, greedy), cut at the first stop string."""
    from adapt.sampling import SamplingConfig, generate

    config = SamplingConfig(gen_length=8, stop=tuple(until), seed=7, **options)
    text = generate(lm.model, lm.tokenizer, [prompt], config, lm.settings).texts[0]
    for stop in until:
        text = text.split(stop)[0]
    return text


# `--cpu` would start one process: torchrun's launcher with accelerate forced onto the CPU (gloo)
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def launch_two(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env |= {"ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([*LAUNCH, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_same_scores(one: dict, two: dict, per_doc_one: dict, per_doc_two: dict) -> None:
    for task, metrics in one.items():
        for name, value in metrics.items():
            if isinstance(value, float) and "stderr" not in name:  # the worker skips the bootstrap
                assert two[task][name] == pytest.approx(value, rel=1e-6), (task, name)
    assert per_doc_one.keys() == per_doc_two.keys()
    for task, docs in per_doc_one.items():
        other = {int(k): v for k, v in per_doc_two[task].items()}
        assert docs.keys() == other.keys()
        for doc_id, resps in docs.items():
            assert same_responses(resps, other[doc_id]), (task, doc_id)


def test_two_processes_give_the_same_scores(
    llama_diffusion: Path, one_process: tuple[Path, str], tmp_path: Path
) -> None:
    """Two gloo processes (lm-eval's simple_evaluate, without indexing its own tasks) against one
    process of `adapt lm-eval` with the same arguments: the same metrics and per-document scores."""
    out = tmp_path / "two.json"
    launch_two("tests/lm_eval_worker.py", str(llama_diffusion), str(out))
    two = json.loads(out.read_text())
    assert two["config"]["adapt"]["world_size"] == 2
    one = one_process[0]
    assert_same_scores(results(one)["results"], two["results"], samples(one), two["responses"])


@pytest.mark.slow
def test_adapt_lm_eval_module_under_accelerate_launch(
    llama_diffusion: Path, one_process: tuple[Path, str], tmp_path: Path
) -> None:
    """`accelerate launch -m adapt.lm_eval_model` as users run it: rank 0 alone writes the results."""
    out = tmp_path / "two"
    model_args = f"pretrained={llama_diffusion},mc_samples=3,seed=7,max_gen_toks=8"
    launch_two("-m", "adapt.lm_eval_model", "--model_args", model_args, *TASKS, "--batch_size", "2",
               "--output_path", str(out), "--log_samples", "--device", "cpu")  # fmt: skip
    assert len(list(out.glob("*/results_*.json"))) == 1
    two, one = results(out), results(one_process[0])
    assert two["config"]["adapt"]["world_size"] == 2
    assert_same_scores(one["results"], two["results"], samples(one_process[0]), samples(out))


REJECTED = [
    (["--bogus", "1", "--tasks", "x"], "lm-eval: unrecognized arguments: --bogus 1"),
    (["--num_fewshot", "many", "--tasks", "x"], "lm-eval: argument --num_fewshot/-f: invalid int value"),
    (["--model_args", "pretrained=CKPT,cache_size=3", *TASKS], "unknown model arg(s) cache_size; valid: "),
    # lm-eval indexes its thousands of task files before it finds none: ~10 s
    pytest.param(
        ["--tasks", "no_such_task"], "lm-eval: Tasks not found: no_such_task", marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize(("args", "expected"), REJECTED)
def test_rejected_arguments_are_one_line_errors(
    args: list[str], expected: str, llama_diffusion: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    args = [a.replace("CKPT", str(llama_diffusion)) for a in args]
    res = CliRunner().invoke(app, ["lm-eval", *args, "--device", "cpu"])
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], res.output
    assert "Traceback" not in res.output


def test_chat_template_hooks_use_the_tokenizers_template(llama_diffusion: Path) -> None:
    lm = AdaptLM(str(llama_diffusion))
    turn = [{"role": "user", "content": "hi"}]
    assert lm.apply_chat_template(turn) == "<|user|>hi<|end|><|assistant|>"
    assert lm.chat_template(True) == lm.tokenizer.chat_template and lm.chat_template(False) is None
    lm.tokenizer.chat_template = None
    with pytest.raises(AdaptError, match="has no chat template"):
        lm.apply_chat_template(turn)


@pytest.mark.parametrize(
    ("model_args", "expected"),
    [
        ({"strategy": "best"}, "unknown strategy 'best'"),
        ({"block_length": 0}, "block_length (0) must divide"),
        ({"batch_size": "auto"}, "--batch_size auto"),
        ({"chat": True}, "--apply_chat_template"),
        ({"mc_samples": 0}, "mc_samples must be at least 1"),
    ],
)
def test_bad_model_args_fail_before_the_first_request(
    model_args: dict, expected: str, llama_diffusion: Path
) -> None:
    with pytest.raises(AdaptError) as e:
        AdaptLM(str(llama_diffusion), **model_args)
    assert expected in str(e.value)
