"""Distributed training with 2 real processes on CPU over gloo, through `accelerate launch finetune.py`:
launches that would not get what they ask for are refused; FSDP2 shards each decoder layer and DeepSpeed
ZeRO-2/3 partitions optimizer state (and, at stage 3, parameters); each trains like DDP, resumes from its
sharded checkpoints and exports (full, merged LoRA, adapter) what DDP exports; checkpoints move between
process counts; Ctrl-C and kill -9 under the launcher leave a resumable run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from adapt.training.engine import Request, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logging.report_to=[]", "logging.progress_bar=false", "logging.log_every=1"]
SMALL = ["data.max_length=32", "training.batch_size=2", "training.eval_batches=2", *QUIET]
FULL = ["training.max_steps=4", "training.checkpoint_every=2", "training.keep_checkpoints=5"]
LORA = ["training.max_steps=3", "lora.r=4", "training.lr=0.01"]
CONFIGS = {
    "ddp": "recipes/accelerate/ddp.yaml",
    "fsdp": "recipes/accelerate/fsdp.yaml",
    "zero2": "recipes/accelerate/deepspeed.yaml",
    "zero3": "recipes/accelerate/deepspeed.yaml",
}
LOSS_TOL = 1e-4  # per-step loss, FSDP/DeepSpeed against DDP (measured: FSDP identical, ZeRO-2/3 <= 1e-6)
LOGIT_TOL = 1e-4  # exported logits, FSDP/DeepSpeed against DDP (measured: 0 to 2.1e-7)

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NO_MP = ("--mixed_precision", "no")
DS_FILE = "ACCELERATE_DEEPSPEED_CONFIG_FILE"


def launch_args(
    config: str, out: Path, model: Path, overrides: tuple, cpu: bool = True, flags: tuple = NO_MP
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of `accelerate launch --config_file CONFIG [--zero_stage N] finetune.py
    recipes/multi_process.yaml ...` (2 processes; config zero2/zero3 is deepspeed.yaml at that stage)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    where = ["--config_file", CONFIGS[config]] if config in CONFIGS else []
    if config.startswith("zero"):
        where += ["--zero_stage", config.removeprefix("zero")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *where, *flags, "--main_process_port",
           str(free_port()), "finetune.py", "recipes/multi_process.yaml",
           f"model.path={model}", f"training.output_dir={out}", *SMALL, *overrides]  # fmt: skip
    return cmd, env


def launch(
    config: str, out: Path, model: Path, *overrides: str, cpu: bool = True, flags: tuple = NO_MP
) -> subprocess.CompletedProcess:
    """Run a launch to its end (first DeepSpeed launch on a machine: DeepSpeed compiles its CPU
    shared-memory op, about a minute)."""
    cmd, env = launch_args(config, out, model, overrides, cpu, flags)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def trained(config: str, out: Path, model: Path, *overrides: str, flags: tuple = NO_MP) -> Path:
    """A launch that must succeed; its stderr is kept beside OUT as OUT.stderr."""
    proc = launch(config, out, model, *overrides, flags=flags)
    out.with_suffix(".stderr").write_text(proc.stderr)
    assert proc.returncode == 0, failure(proc.stderr)
    return out


def failure(stderr: str) -> str:
    """What a failed launch said: each rank's error lines first (the end of stderr is the launcher's own
    traceback, which only says that a rank failed), then the end."""
    said = [line for line in stderr.splitlines() if "error" in line.lower() and "elastic" not in line]
    return "\n".join(said[:40]) + "\n...\n" + stderr[-1500:]


def start_lines(run: Path) -> list[str]:
    lines = run.with_suffix(".stderr").read_text().splitlines()
    return [line for line in lines if line.startswith("engine:")]


def loss_records(out: Path) -> list[dict]:
    """The training-loss lines of OUT/metrics.jsonl, in file order."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "loss" in m]


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in loss_records(out)}


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[3, 17, 42, 9, 11, 25, 60, 7]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def export_logits(path: Path, base: Path | None = None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if base is None:
        return probe_logits(AutoModelForCausalLM.from_pretrained(path))
    return probe_logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path))


# ----------------------------------------------------------------------------- the launch is checked


@pytest.mark.parametrize(
    ("recipe_choice", "launcher", "expected"),
    [
        ("auto", "bf16", ("bf16", "launcher's")),
        ("auto", "no", ("no", "launcher's")),
        ("no", "bf16", ("no", "recipe overrides launcher's bf16")),
        ("bf16", "bf16", ("bf16", "recipe")),
        ("fp16", None, ("fp16", "recipe")),
    ],
)
def test_mixed_precision_rule(recipe_choice: str, launcher: str | None, expected: tuple) -> None:
    assert resolve_precision(recipe_choice, Request("DDP", 2, launcher), "cpu") == expected


def test_auto_precision_outside_a_launcher_asks_the_hardware() -> None:
    precision, why = resolve_precision("auto", Request("single", 1, None), "cpu")
    assert precision in ("no", "bf16") and why.startswith("auto: CPU")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("fsdp-without-cpu-flag", "the launch asks for 2 processes but only 1 would train"),
        ("cpu-flag-with-2-processes", "the launch asks for 2 processes but only 1 would train"),
    ],
)
def test_launches_that_would_train_apart_are_refused(
    llama_diffusion: Path, tmp_path: Path, case: str, message: str
) -> None:
    """Accelerate turns both into independent single processes; adapt stops before any work."""
    out = tmp_path / "run"
    if case == "fsdp-without-cpu-flag":
        proc = launch("fsdp", out, llama_diffusion, cpu=False)
    else:
        proc = launch("none", out, llama_diffusion, flags=("--cpu", "--num_processes", "2"))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    fix = "prefix the launch with ACCELERATE_USE_CPU=1" if "fsdp" in case else "--cpu` starts one process"
    assert errors and all(message in line and fix in line for line in errors), proc.stderr
    assert not out.exists() or not any(out.iterdir()), "nothing written"


def finetune_in_process(model: Path, out: Path) -> Any:
    """`adapt finetune recipes/multi_process.yaml` in this process, as one rank of a launch would run it
    (the refusals stop it before any process group exists)."""
    from typer.testing import CliRunner

    from adapt.cli import app

    args = ["finetune", "recipes/multi_process.yaml", f"model.path={model}", f"training.output_dir={out}"]
    return CliRunner().invoke(app, [*args, *QUIET])


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "asks for DeepSpeed but it would run as single process"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "no deepspeed": ""}, "DeepSpeed, which is not installed"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", DS_FILE: "/nonexistent/ds.json"},
            "DeepSpeed config file /nonexistent/ds.json cannot be read (No such file or directory)",
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", DS_FILE: "recipes/quickstart.yaml"},
            "DeepSpeed config file recipes/quickstart.yaml is not JSON",
        ),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "4"}, "ZeRO stage 4 does"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "3"}, "FSDP version 3 does not exist"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "asks for FSDP but it would run as single"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "two"}, "FSDP_VERSION='two', which is not a whole"),
        ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "launcher's mixed precision 'fp8' is not one adapt trains"),
        ({"ACCELERATE_USE_MEGATRON_LM": "true"}, "asks for Megatron-LM, which adapt does not train with"),
        (
            {"ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_TP_SIZE": "2"},
            "asks for tensor parallelism, which adapt does not train with",
        ),
    ],
)
def test_engines_that_cannot_run_are_refused_in_one_line(
    llama_diffusion: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict, message: str
) -> None:
    for name, value in env.items():
        if name == "no deepspeed":  # as if not installed: the import system finds no such module
            monkeypatch.setitem(sys.modules, "deepspeed", None)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    out = tmp_path / "run"
    result = finetune_in_process(llama_diffusion, out)
    assert result.exit_code == 1 and message in result.output, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert not out.exists() or not any(out.iterdir()), "nothing written"


@pytest.mark.parametrize("declared", [True, False])
def test_fsdp_wraps_the_models_own_layer_class_or_says_which_it_falls_back_to(
    llama_diffusion: Path, caplog: pytest.LogCaptureFixture, declared: bool
) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM

    from adapt.training.engine import configure_wrapping
    from adapt.training.objectives.loss import TokenLoss

    model = AutoModelForCausalLM.from_pretrained(llama_diffusion)
    if not declared:
        model._no_split_modules = None  # as a model class that declares none
    loss_module = TokenLoss(model)
    own = loss_module._no_split_modules
    assert (set(own) == {"LlamaDecoderLayer"}) if declared else own is None, "the model's own, seen through"
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy=None)
    with caplog.at_level("WARNING", logger="adapt.training.engine"):
        configure_wrapping(plugin, loss_module, main=True)
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.auto_wrap_policy is not None, "per-layer wrapping even when the config names no policy"
    said = "declares no _no_split_modules; FSDP wraps each block of its decoder's layers list"
    assert (said in caplog.text) is not declared


def fake_accelerator(kind: str, stage: int = 3, zero3_init: bool = True, rank0_loads: bool = True) -> Any:
    from types import SimpleNamespace

    ds = SimpleNamespace(zero_stage=stage, zero3_init_flag=zero3_init)
    fsdp = SimpleNamespace(cpu_ram_efficient_loading=rank0_loads)
    state = SimpleNamespace(deepspeed_plugin=ds, fsdp_plugin=fsdp)
    return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), state=state, num_processes=2)


@pytest.mark.parametrize(
    ("kind", "options", "source", "line"),
    [
        ("MULTI_CPU", {}, "converted", "load: whole (DDP keeps every weight on every rank)"),
        ("DEEPSPEED", {"stage": 2}, "converted", "load: whole (DeepSpeed ZeRO-2 keeps every weight on"),
        ("DEEPSPEED", {}, "converted", "load: sharded (zero.Init)"),
        ("DEEPSPEED", {"zero3_init": False}, "converted", "load: whole (zero3_init_flag is off)"),
        ("DEEPSPEED", {}, "ar", "load: whole (the AR model is converted in memory; `adapt convert` it first"),
        ("FSDP", {}, "converted", "load: rank 0 + broadcast"),
        ("FSDP", {"rank0_loads": False}, "converted", "load: whole (fsdp_cpu_ram_efficient_loading is off)"),
        ("FSDP", {}, "ar", "load: whole (the AR model is converted in memory"),
    ],
)
def test_the_weights_load_sharded_where_the_engine_shards_a_converted_checkpoint(
    kind: str, options: dict, source: str, line: str, llama_diffusion: Path, llama_src: Path
) -> None:
    from adapt.training.config import ModelConfig
    from adapt.training.placement import choose

    path = llama_diffusion if source == "converted" else llama_src
    engine = "DeepSpeed ZeRO-2" if options.get("stage") == 2 else "DDP"
    load = choose(fake_accelerator(kind, **options), ModelConfig(path=str(path)), engine)
    assert load.line().startswith(line), load.line()
    shares = [load.host_share(rank, 4) for rank in range(4)]
    assert shares == ([1, 0.25, 0.25, 0.25] if load.sharded else [1, 1, 1, 1])


def test_the_memory_check_counts_this_ranks_share_of_the_weights(
    llama_diffusion: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused when the host holds less than the weights: whole on a rank, or its 1/N on a rank > 0."""
    from adapt.core.bounds import MEMORY_LIMIT_ENV, read_weights
    from adapt.core.errors import AdaptError
    from adapt.training.config import load_recipe
    from adapt.training.model import check_batch

    recipe = load_recipe(ROOT / "recipes/multi_process.yaml", [f"model.path={llama_diffusion}", *SMALL])
    weights = read_weights(llama_diffusion).bytes_in(torch.float32)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(weights // 2 + 50_000))  # + the logits of a micro-batch
    check_batch(recipe, "cpu", host_share=0.25)
    with pytest.raises(AdaptError, match="for the weights"):
        check_batch(recipe, "cpu", host_share=1.0)


# ----------------------------------------------------------------------------- FSDP2 against DDP


@pytest.fixture(scope="module")
def lora_runs(llama_diffusion: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRA under DDP (merged export) and FSDP2 (adapter export), same recipe and seed."""
    root = tmp_path_factory.mktemp("lora")
    # DDP: the launcher's bf16 (ddp.yaml, no --mixed_precision flag) against the recipe's 'no' (quoted:
    # YAML reads a bare no as false); its step-3 checkpoint serves the change of process count
    ddp = [*LORA, "training.mixed_precision='no'", "training.checkpoint_every=3"]
    return {
        "ddp": trained("ddp", root / "ddp", llama_diffusion, *ddp, flags=()),
        "fsdp": trained("fsdp", root / "fsdp", llama_diffusion, *LORA, "lora.export=adapter"),
    }


def check_sharded_per_layer(run: Path) -> None:
    """engine.json: FSDP2 on 2 processes, one unit per decoder layer, each rank holding half of each."""
    facts = json.loads((run / "engine.json").read_text())
    assert facts["engine"] == "FSDP2" and facts["processes"] == 2 and facts["device"] == "cpu"
    ranks = facts["fsdp_ranks"]
    layers = [name for name, unit in ranks[0].items() if unit["class"] == "LlamaDecoderLayer"]
    assert [n.rsplit(".", 2)[-2:] for n in layers] == [["layers", "0"], ["layers", "1"]], ranks[0]
    for name in [*layers, "<root>"]:
        full = ranks[0][name]["full"]
        assert sum(rank[name]["local"] for rank in ranks) == full
        assert all(0.4 * full <= rank[name]["local"] <= 0.6 * full for rank in ranks), (name, ranks)


def check_loaded(run: Path, how: str) -> None:
    """engine.json's `load` and the `load:` line: how the weights were read, and what each rank held right
    after (before Accelerate prepared the model): all of it (whole), half (its zero.Init partition), or
    rank 0 all and rank 1 nothing (the meta device, until rank 0's weights are broadcast); and the fast-path
    probe, which runs where the weights are (rank 0's, or the prepared ZeRO-3 engine), found it."""
    facts = json.loads((run / "engine.json").read_text())
    load = facts["load"]
    assert load["how"] == how, load
    assert facts["fast_path"] is True, "the probe found the decoder + head fast path on the loaded model"
    held = [r["local"] / r["full"] for r in load["ranks"]]
    expected = {"whole": [1, 1], "zero.Init": [0.5, 0.5], "rank 0 + broadcast": [1, 0]}[how]
    assert held == pytest.approx(expected, abs=0.02), load
    assert all(r["peak_rss_bytes"] >= r["peak_rss_before_load_bytes"] > 0 for r in load["ranks"]), load
    said = [line for line in run.with_suffix(".stderr").read_text().splitlines() if line.startswith("load:")]
    line = "load: sharded (zero.Init)" if how == "zero.Init" else f"load: {how}"
    assert len(said) == 1 and said[0].startswith(line), said


def check_losses_agree(ddp: Path, fsdp: Path, steps: int) -> None:
    a, b = losses(ddp), losses(fsdp)
    assert sorted(b) == list(range(1, steps + 1)) and sorted(a) == sorted(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=LOSS_TOL), (step, a, b)


def test_fsdp_lora_shards_each_layer_trains_like_ddp_and_its_adapter_loads_in_peft(
    lora_runs: dict[str, Path], llama_diffusion: Path
) -> None:
    check_sharded_per_layer(lora_runs["fsdp"])
    assert json.loads((lora_runs["ddp"] / "engine.json").read_text())["engine"] == "DDP"
    check_loaded(lora_runs["fsdp"], "rank 0 + broadcast")
    check_loaded(lora_runs["ddp"], "whole")
    assert start_lines(lora_runs["fsdp"]) == [
        "engine: FSDP2, 2 processes, mixed precision: no (launcher's), device: cpu/gloo"
    ]
    assert start_lines(lora_runs["ddp"]) == [
        "engine: DDP, 2 processes, mixed precision: no (recipe overrides launcher's bf16), device: cpu/gloo"
    ]
    check_losses_agree(lora_runs["ddp"], lora_runs["fsdp"], 3)
    reference = export_logits(lora_runs["ddp"] / "final")  # merged
    assert (reference - export_logits(llama_diffusion)).abs().max() > 1e-3, "LoRA changed the model"
    adapter = lora_runs["fsdp"] / "final"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    from_adapter = export_logits(adapter, base=llama_diffusion)
    torch.testing.assert_close(from_adapter, reference, atol=LOGIT_TOL, rtol=0)


def one_process_session(out: Path, model: Path, *overrides: str) -> Any:
    from adapt.training.config import load_recipe
    from adapt.training.setup import setup

    base = [f"model.path={model}", f"training.output_dir={out}", *SMALL, *LORA, "training.export=false"]
    return setup(load_recipe(ROOT / "recipes/multi_process.yaml", [*base, *overrides]))


def test_a_two_process_checkpoint_resumes_on_one_process_at_the_same_data_position(
    lora_runs: dict[str, Path], llama_diffusion: Path, tmp_path: Path
) -> None:
    """DDP wrote step 3 after 3 steps x 2 micro-batches on each of 2 processes: one process goes on with
    micro-batch 12 of the shared shuffled order, the one a fresh single process reads 13th."""
    from adapt.training.step import micro_batches

    out = tmp_path / "one"
    shutil.copytree(lora_runs["ddp"] / "checkpoints", out / "checkpoints")
    session = one_process_session(out, llama_diffusion, "training.max_steps=4")
    assert session.state.step == 3 and session.state.batches_in_epoch == 12
    resumed = next(micro_batches(session))["input_ids"]
    session.accelerator.end_training()
    fresh = micro_batches(one_process_session(tmp_path / "fresh", llama_diffusion))
    expected = [next(fresh)["input_ids"] for _ in range(13)]
    assert torch.equal(resumed, expected[12]) and not torch.equal(resumed, expected[11])


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_processes(llama_diffusion: Path, tmp_path: Path) -> None:
    from adapt.training.loop import fit

    out = tmp_path / "run"
    session = one_process_session(out, llama_diffusion, "training.checkpoint_every=3")
    fit(session)  # 3 steps x 2 micro-batches on one process
    session.accelerator.end_training()
    session.lock.release()  # what `run` does when the session ends: the folder is free for the next run
    proc = launch("ddp", out, llama_diffusion, *LORA, "training.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("data position: 6 micro-batches over 1 processes -> 3 per process") == 2
    assert sorted(losses(out))[-1] == 4


def check_teacher(run: Path, how: str, loaded: list[float], held: list[float]) -> None:
    """engine.json's `teacher`: how the frozen teacher was read, the share of it each rank held right after
    reading (rank 0 + broadcast: rank 0 all, rank 1 nothing) and holds after a forward (half under FSDP2
    and ZeRO-3: every unit, the root too, resharded), and that its fast-path probe ran where its weights
    were."""
    facts = json.loads((run / "engine.json").read_text())["teacher"]
    assert facts["how"] == how and facts["fast_path"] is True, facts
    for when, expected in (("loaded", loaded), ("held", held)):
        shares = [r[when]["local"] / r[when]["full"] for r in facts["ranks"]]
        assert shares == pytest.approx(expected, abs=0.02), (when, facts)


def teacher_recipe(teacher: Path) -> list[str]:
    """A block recipe with the joint objective's KL term against `teacher`, through the tiled pair kernel
    with gradient checkpointing."""
    block = ["diffusion.block_size=4", "diffusion.clean_attention=causal", "diffusion.anneal_steps=0"]
    block += ["diffusion.ar_loss_weight=1", f"diffusion.ar_teacher={teacher}"]
    return [*block, "training.max_steps=3", "training.gradient_checkpointing=true", "training.eval_every=0"]


def check_like_ddp(runs: dict[str, Path]) -> None:
    """Every run trained through the tiled kernel, its AR term a KL (near 0 at the start, where the
    tokens' cross-entropy is about ln V), with DDP's losses."""
    for run in runs.values():
        assert json.loads((run / "engine.json").read_text())["attention"] == "adapt_pair_sdpa"
        records = loss_records(run)
        assert all(0 <= m["ar_loss"] < 0.5 for m in records), records
    ddp = losses(runs["ddp"])
    assert sorted(ddp) == [1, 2, 3]
    for config, run in runs.items():
        assert ddp == pytest.approx(losses(run), abs=LOSS_TOL), config


def test_a_block_recipe_with_a_teacher_trains_alike_under_ddp_fsdp_and_zero3_each_holding_half_a_teacher(
    llama_diffusion: Path, llama_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The joint objective's KL term against its AR teacher under each engine: DDP's losses, with the
    teacher read and held as the model is (FSDP2: rank 0 reads it; ZeRO-3: zero.Init). The logits (the
    model's and the teacher's) are computed 3 rows at a time, so the ranks' different row counts must
    still call the head equally often (ZeRO-3 gathers its weight at each call)."""
    monkeypatch.setenv("ADAPT_LOGITS_CHUNK", "1000")  # 2 rows of the 384-row head, 3 of the teacher's 320
    recipe = teacher_recipe(llama_src)
    runs = {c: trained(c, tmp_path / c, llama_diffusion, *recipe) for c in ("ddp", "fsdp", "zero3")}
    check_like_ddp(runs)
    check_teacher(runs["ddp"], "whole", [1, 1], [1, 1])
    check_teacher(runs["fsdp"], "rank 0 + broadcast", [1, 0], [0.5, 0.5])
    check_teacher(runs["zero3"], "zero.Init", [0.5, 0.5], [0.5, 0.5])


@pytest.mark.slow
def test_with_sharded_loading_turned_off_the_teacher_is_read_whole_then_sharded(
    llama_diffusion: Path, llama_src: Path, tmp_path: Path
) -> None:
    recipe = teacher_recipe(llama_src)
    off = {"fsdp": ("--fsdp_cpu_ram_efficient_loading", "false"), "zero3": ("--zero3_init_flag", "false")}
    runs = {c: trained(c, tmp_path / c, llama_diffusion, *recipe, flags=(*NO_MP, *o)) for c, o in off.items()}
    runs["ddp"] = trained("ddp", tmp_path / "ddp", llama_diffusion, *recipe)
    check_like_ddp(runs)
    for config in off:
        check_teacher(runs[config], "whole", [1, 1], [0.5, 0.5])


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fsdp", "zero3"])
def test_a_run_with_a_sharded_teacher_resumes_to_the_uninterrupted_numbers(
    llama_diffusion: Path, llama_src: Path, tmp_path: Path, config: str
) -> None:
    """The teacher is not in the checkpoint: a resumed run reads and shards it again, and continues with
    the uninterrupted run's losses."""
    recipe = [r for r in teacher_recipe(llama_src) if not r.startswith("training.max_steps")] + FULL
    whole = trained(config, tmp_path / "whole", llama_diffusion, *recipe)
    step2, out = "checkpoints/step-00000002", tmp_path / "resumed"
    shutil.copytree(whole / step2, out / step2)
    trained(config, out, llama_diffusion, *recipe)
    reference, again = losses(whole), losses(out)
    assert sorted(again) == [3, 4]
    assert all(again[s] == pytest.approx(reference[s], abs=1e-6) for s in again), (reference, again)


@pytest.mark.parametrize(("batches", "saved", "now", "expected"), [(6, 2, 1, 12), (6, 1, 2, 3), (4, 2, 2, 4)])
def test_the_data_position_converts_between_process_counts(
    batches: int, saved: int, now: int, expected: int
) -> None:
    from adapt.training.checkpoints import convert_position
    from adapt.training.session import TrainState

    state = TrainState(batches_in_epoch=batches, processes=saved)
    convert_position(state, now, Path("ckpt"))
    assert (state.batches_in_epoch, state.processes) == (expected, now)


def test_a_data_position_that_does_not_split_is_refused() -> None:
    from adapt.core.errors import AdaptError
    from adapt.training.checkpoints import convert_position
    from adapt.training.session import TrainState

    with pytest.raises(AdaptError, match="by 1 process after 3 micro-batches of epoch 0, which do not split"):
        convert_position(TrainState(batches_in_epoch=3, processes=1), 2, Path("ckpt"))


@pytest.mark.slow
def test_fsdp_lora_merged_export_equals_ddps(
    lora_runs: dict[str, Path], llama_diffusion: Path, tmp_path: Path
) -> None:
    merged = trained("fsdp", tmp_path / "merged", llama_diffusion, *LORA) / "final"
    from safetensors import safe_open

    keys = [k for f in merged.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]  # noqa: SIM118
    assert keys and not any("lora" in k or "trainable_tokens" in k for k in keys), keys
    reference = export_logits(lora_runs["ddp"] / "final")
    torch.testing.assert_close(export_logits(merged), reference, atol=LOGIT_TOL, rtol=0)


class Runs(dict):
    """Module-wide runs of one recipe under several engines, each launched the first time a test asks."""

    def __init__(self, root: Path, model: Path, *overrides: str) -> None:
        super().__init__()
        self.root, self.model, self.overrides = root, model, overrides

    def __missing__(self, config: str) -> Path:
        self[config] = trained(config, self.root / config, self.model, *self.overrides)
        return self[config]


@pytest.fixture(scope="module")
def full_runs(llama_diffusion: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Full fine-tuning, 4 steps with checkpoints at 2 and 4, under DDP, FSDP2, ZeRO-2 and ZeRO-3."""
    return Runs(tmp_path_factory.mktemp("full"), llama_diffusion, *FULL)


def test_fsdp_full_finetune_trains_and_exports_like_ddp(full_runs: Runs, llama_diffusion: Path) -> None:
    check_sharded_per_layer(full_runs["fsdp"])
    check_loaded(full_runs["fsdp"], "rank 0 + broadcast")
    check_losses_agree(full_runs["ddp"], full_runs["fsdp"], 4)
    ddp, fsdp = (export_logits(full_runs[c] / "final") for c in ("ddp", "fsdp"))
    torch.testing.assert_close(fsdp, ddp, atol=LOGIT_TOL, rtol=0)
    assert (fsdp - export_logits(llama_diffusion)).abs().max() > 1e-3, "training changed the model"
    shards = list((full_runs["fsdp"] / "checkpoints/step-00000004").rglob("*.distcp"))
    assert len(shards) >= 2, "sharded checkpoint: one file per rank"


def test_fsdp_resumes_from_its_sharded_checkpoint(
    full_runs: Runs, llama_diffusion: Path, tmp_path: Path
) -> None:
    """A run that died right after its step-2 checkpoint continues to the uninterrupted run's numbers."""
    out = tmp_path / "resumed"
    step2 = "checkpoints/step-00000002"
    shutil.copytree(full_runs["fsdp"] / step2, out / step2)
    trained("fsdp", out, llama_diffusion, *FULL)
    reference, again = losses(full_runs["fsdp"]), losses(out)
    assert sorted(again) == [3, 4]
    for step in again:
        assert again[step] == pytest.approx(reference[step], abs=1e-6), (step, reference, again)
    torch.testing.assert_close(export_logits(out / "final"), export_logits(full_runs["fsdp"] / "final"))


# ----------------------------------------------------------------------------- DeepSpeed against DDP


def check_partitioned(run: Path, stage: int, trainable: int) -> None:
    """engine.json: DeepSpeed's engine wraps the model on both ranks at the asked stage; each rank holds
    half of the fp32 optimizer state (ZeRO-1/2/3) and, at stage 3, half of the parameters."""
    facts = json.loads((run / "engine.json").read_text())
    assert facts["engine"] == f"DeepSpeed ZeRO-{stage}" and facts["processes"] == 2, facts
    ranks = facts["deepspeed_ranks"]
    assert len(ranks) == 2 and {r["wrapper"] for r in ranks} == {"DeepSpeedEngine"}
    assert {r["zero_stage"] for r in ranks} == {stage}
    optimizer = "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
    assert {r["optimizer"] for r in ranks} == {optimizer}
    parts = ["optimizer_state", "parameters"] if stage == 3 else ["optimizer_state"]
    assert ("parameters" in ranks[0]) is (stage == 3)
    for part in parts:
        full = ranks[0][part]["full"]
        assert (part == "parameters" or full == trainable) and all(r[part]["full"] == full for r in ranks)
        assert sum(r[part]["local"] for r in ranks) >= full  # DeepSpeed pads partitions to align them
        assert all(0.4 * full <= r[part]["local"] <= 0.6 * full for r in ranks), (part, ranks)


def trainable_parameters(model: Path, lora: bool) -> int:
    """Parameters the optimizer holds: all of the model's, or LoRA's adapters and the mask token's row."""
    from transformers import AutoModelForCausalLM

    from adapt.training.config import LoraSettings
    from adapt.training.lora import apply_lora

    m = AutoModelForCausalLM.from_pretrained(model)
    if lora:
        m = apply_lora(m, LoraSettings(r=4), m.config.mask_token_id)
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize(("stage", "export"), [(2, "adapter"), (3, "merged")])
def test_deepspeed_lora_partitions_trains_like_ddp_and_exports_what_ddp_does(
    lora_runs: dict[str, Path], llama_diffusion: Path, tmp_path: Path, stage: int, export: str
) -> None:
    run = trained(f"zero{stage}", tmp_path / "run", llama_diffusion, *LORA, f"lora.export={export}")
    check_partitioned(run, stage, trainable_parameters(llama_diffusion, lora=True))
    check_loaded(run, "zero.Init" if stage == 3 else "whole")
    assert start_lines(run) == [
        f"engine: DeepSpeed ZeRO-{stage}, 2 processes, mixed precision: no (launcher's), device: cpu/gloo"
    ]
    check_losses_agree(lora_runs["ddp"], run, 3)
    reference = export_logits(lora_runs["ddp"] / "final")  # merged
    if export == "adapter":
        assert (run / "final/adapter_config.json").is_file()
        assert not (run / "final/model.safetensors").exists()
        logits = export_logits(run / "final", base=llama_diffusion)
    else:
        logits = export_logits(run / "final")
    torch.testing.assert_close(logits, reference, atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_full_finetune_trains_and_exports_like_ddp(
    full_runs: Runs, llama_diffusion: Path, stage: int
) -> None:
    run = full_runs[f"zero{stage}"]
    check_partitioned(run, stage, trainable_parameters(llama_diffusion, lora=False))
    check_loaded(run, "zero.Init" if stage == 3 else "whole")
    check_losses_agree(full_runs["ddp"], run, 4)
    exported = export_logits(run / "final")
    torch.testing.assert_close(exported, export_logits(full_runs["ddp"] / "final"), atol=LOGIT_TOL, rtol=0)
    assert (exported - export_logits(llama_diffusion)).abs().max() > 1e-3, "training changed the model"
    files = sorted(p.name for p in (run / "checkpoints/step-00000004").rglob("*optim_states.pt"))
    assert files == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)], "one per rank"


BF16_LOSS_TOL = 3e-2  # per-step loss, bf16 under FSDP2/DeepSpeed against fp32 DDP (measured <= 7e-3)
BF16_LOGIT_TOL = 2e-2  # exported logits against fp32 DDP's (measured 2e-4 FSDP2, 3.8e-3 ZeRO-2's bf16 export)


@pytest.mark.parametrize(("config", "engine"), [("fsdp", "FSDP2"), ("zero2", "DeepSpeed ZeRO-2")])
def test_bf16_on_cpu_runs_each_engine_in_bf16_and_tracks_fp32_ddp(
    full_runs: Runs, llama_diffusion: Path, tmp_path: Path, config: str, engine: str
) -> None:
    """The recipes' configs ask for bf16 (what `auto` picks on a CPU with fast bf16): FSDP2 computes in
    bf16 with fp32 gradient reduction and an fp32 loss; DeepSpeed keeps bf16 weights and fp32 master
    state and exports bf16. Both follow fp32 DDP's losses within bf16 noise and export loadable models."""
    from transformers import AutoModelForCausalLM

    out = trained(config, tmp_path / "run", llama_diffusion, *FULL, flags=("--mixed_precision", "bf16"))
    line = f"engine: {engine}, 2 processes, mixed precision: bf16 (launcher's), device: cpu/gloo"
    assert start_lines(out) == [line]
    facts = json.loads((out / "engine.json").read_text())
    got, fp32 = losses(out), losses(full_runs["ddp"])
    assert sorted(got) == sorted(fp32) == [1, 2, 3, 4]
    assert max(abs(got[s] - fp32[s]) for s in got) < BF16_LOSS_TOL, (got, fp32)
    assert any(got[s] != fp32[s] for s in got), "bf16 must change the numbers"
    rounded = [float(torch.tensor(v).bfloat16()) for v in got.values()]
    assert rounded != list(got.values()), "the loss is computed and reported in fp32, not rounded to bf16"
    if config == "fsdp":
        units = [unit for rank in facts["fsdp_ranks"] for unit in rank.values()]
        assert len(units) == 6 and all(
            u["dtypes"] == {"param": "bfloat16", "reduce": "float32", "output": None} for u in units
        ), units
        want = torch.float32  # FSDP2 keeps fp32 weights and casts them per forward
    else:
        ranks = facts["deepspeed_ranks"]
        assert all(r["dtypes"] == {"weights": "bfloat16", "optimizer_state": "float32"} for r in ranks), ranks
        want = torch.bfloat16  # DeepSpeed's bf16 mode trains bf16 weights: its export is bf16
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert next(model.parameters()).dtype == want
    exported = probe_logits(model).float()
    reference = export_logits(full_runs["ddp"] / "final")
    torch.testing.assert_close(exported, reference, atol=BF16_LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resumes_from_its_partitioned_checkpoint(
    full_runs: Runs, llama_diffusion: Path, tmp_path: Path, stage: int
) -> None:
    """A run that died right after its step-2 checkpoint continues to the uninterrupted run's numbers."""
    config, out, step2 = f"zero{stage}", tmp_path / "resumed", "checkpoints/step-00000002"
    shutil.copytree(full_runs[config] / step2, out / step2)
    trained(config, out, llama_diffusion, *FULL)
    reference, again = losses(full_runs[config]), losses(out)
    assert sorted(again) == [3, 4]
    for step in again:
        assert again[step] == pytest.approx(reference[step], abs=1e-6), (step, reference, again)
    torch.testing.assert_close(export_logits(out / "final"), export_logits(full_runs[config] / "final"))


# ----------------------------------------------------------------------------- interrupts under the launcher


def start(config: str, out: Path, model: Path, *overrides: str) -> subprocess.Popen:
    """Like `launch`, in the background and in its own process group (as a terminal's foreground job)."""
    cmd, env = launch_args(config, out, model, overrides)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, **pipes)


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    ("config", "name", "to"),
    [
        pytest.param("fsdp", "SIGINT", "group", marks=SLOW),
        pytest.param("zero2", "SIGINT", "group", marks=SLOW),
        ("ddp", "SIGTERM", "launcher"),
        pytest.param("fsdp", "SIGTERM", "group", marks=SLOW),
    ],
)
def test_a_stop_signal_under_the_launcher_saves_one_checkpoint_and_the_run_resumes(
    llama_diffusion: Path, tmp_path: Path, config: str, name: str, to: str
) -> None:
    """A terminal's Ctrl-C (SIGINT to the launcher and both ranks), SLURM's stop (SIGTERM to every
    process) or `kill` of the launcher (torchrun forwards it): both ranks stop after the same step, one
    checkpoint holds it, both take the exit path of that signal; rerunning continues from it."""
    out, stop = tmp_path / "run", signal.Signals[name]
    proc = start(config, out, llama_diffusion, "training.max_steps=100000", "training.checkpoint_every=0")
    wait_for(out / "metrics.jsonl", proc)
    time.sleep(1.0)
    if to == "group":
        os.killpg(proc.pid, stop)
    else:
        os.kill(proc.pid, stop)
    _, err = proc.communicate(timeout=120)
    said = [line for line in err.splitlines() if line.startswith("interrupted at step")]
    assert len(said) == 2 and said[0] == said[1], err[-3000:]
    assert err.count(f"interrupted ({stop.name}) after step") == 1, "rank 0 says it saves before saving"
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and not (out / "final").exists()
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert state["interrupted"] is True and state["stopped_by"] == stop.name
    assert said[0].startswith(f"interrupted at step {state['step']} ({stop.name}); saved")
    trained(config, out, llama_diffusion, f"training.max_steps={state['step'] + 2}")
    assert sorted(losses(out))[-2:] == [state["step"] + 1, state["step"] + 2]
    assert (out / "final/model.safetensors").is_file()


def rank_pids(launcher: int) -> list[int]:
    """The launcher's child processes (torchrun's agent runs in the launcher itself): the ranks."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through Linux /proc")
@pytest.mark.parametrize("config", ["fsdp", "zero3"])
def test_kill_9_of_one_rank_leaves_the_last_checkpoint_resumable(
    llama_diffusion: Path, tmp_path: Path, config: str
) -> None:
    """The dead run logged steps after its last checkpoint: the resumed run drops them (rank 0 alone:
    every rank trimming metrics.jsonl at once failed about one resume in four) and logs them again."""
    from adapt.training.checkpoints import checkpoint_dirs

    out = tmp_path / "run"
    proc = start(config, out, llama_diffusion, "training.max_steps=100000", "training.checkpoint_every=2")
    wait_for(out / "checkpoints/step-00000004/trainer_state.json", proc)
    os.kill(rank_pids(proc.pid)[-1], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    last = checkpoint_dirs(out)[-1]
    step = json.loads((last / "trainer_state.json").read_text())["step"]
    assert step >= 4 and not json.loads((last / "trainer_state.json").read_text())["interrupted"]
    trained(config, out, llama_diffusion, f"training.max_steps={step + 1}", "training.checkpoint_every=2")
    logged = [m["step"] for m in loss_records(out)]
    assert logged == list(range(1, step + 2)), "each step logged once, in order"
    assert (out / "final/model.safetensors").is_file()


@pytest.mark.slow
def test_fsdp_lora_on_a_tied_embedding_model_matches_ddp(converted: dict[str, Path], tmp_path: Path) -> None:
    """gpt2 ties its LM head to the embeddings (as SmolLM2 does): per-block units, DDP's losses and export."""
    model = converted["gpt2"]
    runs = {c: trained(c, tmp_path / c, model, *LORA) for c in ("ddp", "fsdp")}
    check_losses_agree(runs["ddp"], runs["fsdp"], 3)
    ranks = json.loads((runs["fsdp"] / "engine.json").read_text())["fsdp_ranks"]
    assert sum(unit["class"] == "GPT2Block" for unit in ranks[0].values()) == 2
    reference = export_logits(runs["ddp"] / "final")
    torch.testing.assert_close(export_logits(runs["fsdp"] / "final"), reference, atol=LOGIT_TOL, rtol=0)
