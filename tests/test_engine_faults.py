"""Engines fail together: every rank resumes from one checkpoint, any rank's failure stops the launch with
one `error:` line within seconds, every ZeRO stage and FSDP version is checked wherever the launch sets
it, and a stale lock in torch's extension cache is named with its fix instead of a silent wait.

The launches are 2 real processes on CPU over gloo (`tests/test_distributed.py`'s helpers); the refusals
run the command in-process with the environment `accelerate launch` hands each rank, computed by
accelerate's own launch-argument code."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_bad_inputs import check_one_error_line
from test_distributed import (
    NO_MP,
    finetune_in_process,
    launch,
    launch_args,
    losses,
    rank_pids,
    start,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
ZERO0 = ("--config_file", "recipes/accelerate/deepspeed.yaml", "--zero_stage", "0", *NO_MP)
STEPS = ("training.max_steps=4", "training.checkpoint_every=2", "training.keep_checkpoints=5")
FAULT_TO_EXIT_S = 60  # a rank's failure to the launcher's exit (measured: 2-3 s on 2 busy cores)


def rank_lines(stderr: str) -> tuple[list[str], list[str]]:
    """The ranks' `error:` lines, and their traceback lines (torchrun prefixes a rank's traceback with
    `[rankN]:`; the launcher's own ChildFailedError traceback at the end is not a rank's)."""
    lines = stderr.splitlines()
    return [x for x in lines if x.startswith("error:")], [
        x for x in lines if re.match(r"\[rank\d+\]: Trace", x)
    ]


# ----------------------------------------------------------------------------- refused before any work


@pytest.fixture
def launched_env(monkeypatch: pytest.MonkeyPatch) -> object:
    """Set the environment `accelerate launch ARGV` hands each rank, on CPU; os.environ restored after
    (Accelerate writes into it)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    before = dict(os.environ)

    def set_from(argv: list[str]) -> None:
        parsed = launch_command_parser().parse_args([*argv, "--main_process_port", "0", "finetune.py"])
        args, defaults, mixed_from_config = _validate_launch_command(parsed)
        if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
            fields = [*(defaults.deepspeed_config if defaults else [])]
            args.deepspeed_fields_from_accelerate_config = ",".join(
                fields + (["mixed_precision"] if mixed_from_config else [])
            )
            env = prepare_deepspeed_cmd_env(args)[1]
        else:
            env = prepare_multi_gpu_env(args)
        for name, value in env.items():
            if os.environ.get(name) != value and name != "PYTHONPATH":
                monkeypatch.setenv(name, value)
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")

    yield set_from
    os.environ.clear()
    os.environ.update(before)


def deepspeed_files(tmp_path: Path, stage: object, yaml_stage: int | None = None) -> str:
    """An Accelerate config naming a DeepSpeed JSON file whose zero_optimization.stage is STAGE (absent
    when None), and (YAML_STAGE) a zero_stage of its own."""
    import yaml

    zero = {} if stage is None else {"stage": stage}
    ds = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    config = yaml.safe_load((ROOT / "recipes/accelerate/deepspeed.yaml").read_text())
    config.pop("mixed_precision")  # (Accelerate refuses it beside a deepspeed_config_file)
    config["deepspeed_config"] = {"deepspeed_config_file": str(tmp_path / "ds.json")}
    if yaml_stage is not None:
        config["deepspeed_config"]["zero_stage"] = yaml_stage
    (tmp_path / "accelerate.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "accelerate.yaml")


FILE_STAGE = "the launch's DeepSpeed config file {ds} sets zero_optimization.stage"
REFUSALS = {  # launch -> the words of its one error line ({ds}: the JSON file)
    "json-stage-disagrees-with-the-flag": (("json", 3, None, "--zero_stage", "2"), FILE_STAGE + " 3 but the "
                                           "launcher's zero_stage is 2 (DeepSpeed would run 3)"),
    "json-stage-4": (("json", 4, None), FILE_STAGE + " 4, which is not a ZeRO stage adapt runs"),
    "json-stage-text": (("json", "three", None), FILE_STAGE + ' "three", which is not a ZeRO stage'),
    "json-without-stage": (("json", None, None), "{ds} sets no zero_optimization.stage (DeepSpeed would run "
                                                 "stage 0 while Accelerate reports another)"),
    "json-and-yaml-stage-agree": (("json", 3, 3), "Accelerate refuses the launch's settings: When using "
                                                  "`deepspeed_config_file`, the following accelerate config"),
    "flag-stage-5": (("--config_file", "recipes/accelerate/deepspeed.yaml", "--zero_stage", "5"),
                     "DeepSpeed ZeRO stage 5 does not exist (the launcher's zero_stage); use 0, 1, 2 or 3"),
    "shipped-fsdp-yaml-as-fsdp1": (("--config_file", "recipes/accelerate/fsdp.yaml", "--fsdp_version", "1"),
                                   "asks for FSDP version 1 on CPU; adapt runs only FSDP2 there"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_zero_stages_and_fsdp_versions_are_checked_wherever_the_launch_sets_them(
    llama_diffusion: Path, tmp_path: Path, launched_env: object, case: str
) -> None:
    """The launcher's flag, the Accelerate config and the DeepSpeed JSON file: one `error:` line before
    anything is loaded, naming both values when two places disagree. (Before: a stage in the JSON file
    was never read, and `fsdp.yaml --fsdp_version 1` ended in Accelerate's traceback.)"""

    argv, says = REFUSALS[case]
    if argv[0] == "json":
        _, stage, yaml_stage, *flags = argv
        argv = ("--config_file", deepspeed_files(tmp_path, stage, yaml_stage), *flags)
    launched_env(list(argv))  # type: ignore[operator]
    out = tmp_path / "run"
    result = finetune_in_process(llama_diffusion, out)
    check_one_error_line(result, says.format(ds=tmp_path / "ds.json"))
    assert not out.exists() or not any(out.iterdir()), "nothing written"


def test_a_stale_extension_build_lock_is_named_with_its_fix(
    llama_diffusion: Path, tmp_path: Path, launched_env: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build killed while it held torch's extension lock leaves the file; DeepSpeed's next build or load
    of that op would wait on it for ever without a word."""

    cache = tmp_path / "torch_extensions"
    (cache / "deepspeed_shm_comm").mkdir(parents=True)
    lock = cache / "deepspeed_shm_comm" / "lock"
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    launched_env(["--config_file", "recipes/accelerate/deepspeed.yaml"])  # type: ignore[operator]
    result = finetune_in_process(llama_diffusion, tmp_path / "run")
    check_one_error_line(
        result, f"build of torch extension deepspeed_shm_comm was interrupted and left its lock {lock}"
    )
    assert result.stderr.rstrip().endswith(f"remove it: rm {lock}")


def test_a_lock_that_a_live_build_holds_is_not_stale(tmp_path: Path) -> None:
    """torch's FileBaton keeps its lock open while it builds: that one is waited on, as torch does."""
    from adapt.training.extensions import stale_locks

    (tmp_path / "op").mkdir()
    lock = tmp_path / "op" / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as FileBaton.try_acquire
    try:
        assert stale_locks(tmp_path) == []
    finally:
        os.close(fd)
    assert stale_locks(tmp_path) == [lock], "released without removing it: the killed build's leftover"


def test_a_failed_sharded_load_is_a_reason_to_try_an_older_checkpoint_and_ctrl_c_is_not(
    tmp_path: Path,
) -> None:
    """torch's distributed checkpoint raises CheckpointException, a BaseException, on every rank: resume
    turns it into the failing rank's reason (not every rank's traceback) and tries an older checkpoint;
    Ctrl-C and exits still stop."""
    import pickle

    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from adapt.training import checkpoints

    try:  # wrapped as torch wraps each rank's failure, its traceback included
        raise pickle.UnpicklingError("Weights only load failed. In PyTorch 2.6, we changed ...")
    except pickle.UnpicklingError as e:
        sharded = CheckpointException("load", {1: _wrap_exception(e)})
    assert checkpoints.explain_load(sharded) == (
        "sharded load failed on rank 1: corrupt or truncated (UnpicklingError: Weights only load failed)"
    )
    raised: list[BaseException] = [sharded, KeyboardInterrupt()]

    def load(session: object, path: Path) -> None:  # a load step as torch's sharded load fails
        raise raised.pop(0)

    assert checkpoints.attempt(load, None, tmp_path) == checkpoints.explain_load(sharded)  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        checkpoints.attempt(load, None, tmp_path)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- launches that fail together


@pytest.fixture(scope="module")
def zero0_run(llama_diffusion: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSpeed ZeRO-0 (DeepSpeed's data parallel without partitioning) on 2 processes: 4 steps,
    checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("zero0") / "run"
    proc = launch("none", out, llama_diffusion, *STEPS, flags=ZERO0)
    out.with_suffix(".stderr").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_zero_stage_0_trains_and_checkpoints(zero0_run: Path) -> None:
    """(Before: it crashed right after its start line, reading a ZeRO optimizer's partitions.)"""
    line = "engine: DeepSpeed ZeRO-0, 2 processes, mixed precision: no (launcher's), device: cpu/gloo"
    assert line in zero0_run.with_suffix(".stderr").read_text().splitlines()
    ranks = json.loads((zero0_run / "engine.json").read_text())["deepspeed_ranks"]
    assert [r["zero_stage"] for r in ranks] == [0, 0]
    held = [r["optimizer_state"] for r in ranks]
    assert all(h["local"] == h["full"] > 0 for h in held), "no partitioning: every rank holds all of it"
    assert sorted(losses(zero0_run)) == [1, 2, 3, 4]
    assert (zero0_run / "final/model.safetensors").is_file()


def copy_checkpoints(run: Path, out: Path, *steps: int) -> list[Path]:
    paths = []
    for step in steps:
        name = f"checkpoints/step-{step:08d}"
        shutil.copytree(run / name, out / name)
        paths.append(out / name)
    return paths


def test_ranks_agree_on_one_checkpoint_when_one_rank_cannot_load_the_newest(
    zero0_run: Path, llama_diffusion: Path, tmp_path: Path
) -> None:
    """Only rank 1 reads random_states_1.pkl. Both ranks skip the newest checkpoint and resume from step 2
    (before: Accelerate skipped the unreadable file without a word; a rank-1-only failure elsewhere, such as
    a DeepSpeed partition, sent the ranks to different checkpoints and hung the launch), and steps 3-4
    repeat the uninterrupted run's losses."""
    out = tmp_path / "resumed"
    _, newest = copy_checkpoints(zero0_run, out, 2, 4)
    (newest / "random_states_1.pkl").write_bytes(b"\0" * 64)
    proc = launch("none", out, llama_diffusion, *STEPS[1:], "training.max_steps=5", flags=ZERO0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [x for x in proc.stderr.splitlines() if "cannot be loaded" in x or "resumed from" in x]
    assert said == [
        f"checkpoint {newest} cannot be loaded by rank 1 (random_states_1.pkl: corrupt or truncated "
        "(UnpicklingError: Weights only load failed)); trying an older one",
        f"resumed from {out / 'checkpoints/step-00000002'}, the newest checkpoint that loads",
    ], proc.stderr[-3000:]
    reference, again = losses(zero0_run), losses(out)
    assert sorted(again) == [3, 4, 5]
    assert [again[s] for s in (3, 4)] == pytest.approx([reference[s] for s in (3, 4)], abs=1e-6)


def test_when_one_rank_can_load_no_checkpoint_the_launch_stops_with_one_error_line(
    zero0_run: Path, llama_diffusion: Path, tmp_path: Path
) -> None:
    """Every rank stops together: rank 0 reports the reasons of each rank, the others one `stopped:` line."""
    out = tmp_path / "resumed"
    for path in copy_checkpoints(zero0_run, out, 2, 4):
        (path / "random_states_1.pkl").write_bytes(b"\0" * 64)
    began = time.monotonic()
    proc = launch("none", out, llama_diffusion, *STEPS[1:], "training.max_steps=5", flags=ZERO0)
    took = time.monotonic() - began
    errors, tracebacks = rank_lines(proc.stderr)
    assert proc.returncode != 0 and not tracebacks, proc.stderr[-3000:]
    assert errors == [
        f"error: no checkpoint in {out / 'checkpoints'} can be loaded by every process (see above); move "
        "them away or set training.resume=false and pass --force to start over"
    ]
    assert proc.stderr.count("cannot be loaded by rank 1 (random_states_1.pkl: corrupt") == 2
    assert proc.stderr.count("stopped: no checkpoint") == 1
    assert took < 120, took  # the whole launch, model loading included
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through Linux /proc")
def test_one_rank_failing_mid_run_stops_the_launch_within_seconds_with_one_error_line(
    llama_diffusion: Path, tmp_path: Path
) -> None:
    """Rank 0 alone writes metrics.jsonl: capping its file size (what a full disk does to it) fails that
    rank alone, mid-run. torchrun stops the other rank; that one says `stopped:` in one line, not gloo's
    traceback, and the launch exits non-zero within seconds."""
    import resource

    out = tmp_path / "run"
    proc = start("ddp", out, llama_diffusion, "training.max_steps=100000", "training.checkpoint_every=0")
    wait_for(out / "metrics.jsonl", proc)
    time.sleep(1.0)
    rank0 = next(
        p for p in rank_pids(proc.pid) if b"LOCAL_RANK=0\0" in Path(f"/proc/{p}/environ").read_bytes()
    )
    size = (out / "metrics.jsonl").stat().st_size
    resource.prlimit(rank0, resource.RLIMIT_FSIZE, (size, size))
    faulted = time.monotonic()
    try:
        _, err = proc.communicate(timeout=FAULT_TO_EXIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the launch still ran {FAULT_TO_EXIT_S} s after rank 0 failed")
    took = time.monotonic() - faulted
    errors, tracebacks = rank_lines(err)
    assert proc.returncode != 0 and errors == ["error: [Errno 27] File too large"], err[-3000:]
    assert not tracebacks and err.count("stopped: another process of this run ended first") <= 1, err[-3000:]
    print(f"rank 0's failure to the launch's exit: {took:.1f} s")


def test_a_launch_into_a_folder_another_run_holds_stops_with_one_error_line(
    llama_diffusion: Path, tmp_path: Path
) -> None:
    """The lock is the launch's: its first process takes it; refused there, the whole launch ends."""
    from test_ownership import hold

    out = tmp_path / "run"
    holder = hold(out)
    try:
        began = time.monotonic()
        proc = launch("ddp", out, llama_diffusion, "training.max_steps=2")
        took = time.monotonic() - began
    finally:
        holder.kill()
        holder.wait()
    errors, tracebacks = rank_lines(proc.stderr)
    assert proc.returncode != 0 and not tracebacks, proc.stderr[-3000:]
    assert len(errors) == 1 and f"in use by another adapt run (pid {holder.pid}" in errors[0], errors
    assert sorted(p.name for p in out.iterdir()) == [".adapt-lock"] and took < 120, took


# ----------------------------------------------------------------------------- slow: each engine's own files


@pytest.mark.slow
def test_zero_stage_0_trains_like_ddp(zero0_run: Path, llama_diffusion: Path, tmp_path: Path) -> None:
    ddp = tmp_path / "ddp"
    proc = launch("ddp", ddp, llama_diffusion, *STEPS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference, got = losses(ddp), losses(zero0_run)
    assert sorted(got) == sorted(reference) == [1, 2, 3, 4]
    assert [got[s] for s in got] == pytest.approx([reference[s] for s in got], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "damaged", "why"),
    [
        ("zero3", "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt",
         "by rank 1 (zero_pp_rank_1_mp_rank_00_optim_states.pt: corrupt or truncated (BadZipFile"),
        ("fsdp", "pytorch_model_fsdp_0/__1_0.distcp",
         "on every process (sharded load failed on rank 1: corrupt or truncated (UnpicklingError"),
    ],
)  # fmt: skip
def test_a_damaged_file_of_one_rank_sends_every_rank_to_the_same_older_checkpoint(
    llama_diffusion: Path, tmp_path: Path, config: str, damaged: str, why: str
) -> None:
    """ZeRO-3: rank 1 alone reads its optimizer partition (before: it fell back to step 2 while rank 0
    resumed step 4, and the launch hung). FSDP2: torch's sharded load fails on every rank with a
    CheckpointException, a BaseException (before: every rank crashed with its traceback)."""
    first, out = tmp_path / "first", tmp_path / "resumed"
    proc = launch(config, first, llama_diffusion, *STEPS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, newest = copy_checkpoints(first, out, 2, 4)
    (newest / damaged).write_bytes(b"\0" * 200)
    proc = launch(config, out, llama_diffusion, *STEPS[1:], "training.max_steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {newest} cannot be loaded {why}" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("resumed from") == 1 and "step-00000002, the newest" in proc.stderr
    reference, again = losses(first), losses(out)
    assert sorted(again) == [3, 4, 5]
    assert [again[s] for s in (3, 4)] == pytest.approx([reference[s] for s in (3, 4)], abs=1e-6)


@pytest.mark.slow
def test_a_stale_build_lock_stops_a_real_deepspeed_launch_instead_of_a_silent_wait(
    llama_diffusion: Path, tmp_path: Path
) -> None:
    """Before: DeepSpeed's build of its CPU shared-memory op waited on the lock for ever, printing nothing."""
    cache = tmp_path / "torch_extensions"
    (cache / "deepspeed_shm_comm").mkdir(parents=True)
    lock = cache / "deepspeed_shm_comm" / "lock"
    lock.touch()
    cmd, env = launch_args("zero2", tmp_path / "run", llama_diffusion, ())
    proc = subprocess.run(cmd, cwd=ROOT, env={**env, "TORCH_EXTENSIONS_DIR": str(cache)}, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    errors, tracebacks = rank_lines(proc.stderr)
    assert proc.returncode != 0 and errors and not tracebacks, proc.stderr[-3000:]
    assert all(f"left its lock {lock}" in e and e.endswith(f"remove it: rm {lock}") for e in errors), errors
