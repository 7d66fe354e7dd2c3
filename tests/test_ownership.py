"""adapt deletes or renames only what it proves it wrote; one run per output folder; faults leave the
user's files as they were.

Each fault is real: a process killed with SIGKILL at a chosen point of an atomic write, a file-size limit
(`ulimit -f`) that makes a write fail like a full disk, a second process holding the output folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_bad_inputs import RECIPE, check_one_error_line, finetune, run_recipe, tree, world  # noqa: F401
from typer.testing import CliRunner

from adapt.cli import app

ROOT = Path(__file__).resolve().parents[1]

# A process that writes OUT atomically and SIGKILLs itself at a chosen point: "writing" (inside the
# temporary directory), "moved-old" (the old output moved aside, the new one not yet in place).
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from adapt.core import outputs
    out, point = Path(sys.argv[1]), sys.argv[2]
    real, calls = os.replace, []
    def replace(a, b):
        real(a, b)
        calls.append(a)
        if point == "moved-old" and ".old-" in str(b):
            os.kill(os.getpid(), signal.SIGKILL)
    outputs.os.replace = replace
    with outputs.atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_text("new")
        if point == "writing":
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


def killed_write(out: Path, point: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", KILLER, str(out), point], env=env, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(child.stdout)


def lookalikes(parent: Path) -> dict[str, tuple]:
    """Folders of the user's whose names look like adapt's leftovers (the attack's own three, and forged
    ones with a dead pid and a 16-hex id, one with a marker of another id)."""
    pid = dead_pid()
    for name in (".thesis.old-2019", ".vimbackup.tmp-31337-mine", ".photos.old-4242",
                 f".out.tmp-{pid}-0123456789abcdef", f".out.old-{pid}-0123456789abcdef",
                 f".notes.old-{pid}-fedcba9876543210"):  # fmt: skip
        (parent / name).mkdir(parents=True)
        (parent / name / "precious.txt").write_text(name)
    forged = {"writer": "adapt", "id": "0000000000000000", "pid": pid, "host": os.uname().nodename}
    (parent / f".notes.old-{pid}-fedcba9876543210/.adapt-owner.json").write_text(json.dumps(forged))
    return tree(parent)


@pytest.mark.parametrize(
    "argv",
    [
        ("convert", "{w}/src", "{p}/out"),
        ("convert", "{w}/src", "{w}/src", "--force"),  # refused
        ("push", "{w}/ckpt", "me/model", "--stage", "{p}/out"),
        finetune("training.output_dir={p}/out", "training.export=false"),
    ],
    ids=["convert", "refused convert", "push --stage", "finetune"],
)
def test_folders_that_look_like_leftovers_are_never_touched(world: Path, tmp_path: Path, argv: tuple) -> None:  # noqa: F811
    parent = tmp_path / "that-folder"
    before = lookalikes(parent)
    CliRunner().invoke(app, [a.format(w=world, p=parent) for a in argv], env={"ADAPT_DEBUG": ""})
    after = {k: v for k, v in tree(parent).items() if not k.startswith("out")}
    assert after == {k: v for k, v in before.items() if not k.startswith("out")}
    assert sorted(p.name for p in parent.glob(".out.*")) == sorted(
        k for k in before if "/" not in k and k.startswith(".out")
    )


@pytest.mark.parametrize(("point", "existing"), [("writing", False), ("writing", True), ("moved-old", True)])
def test_a_write_killed_at_any_point_is_recovered_by_the_next(
    tmp_path: Path, point: str, existing: bool
) -> None:
    from adapt.core.outputs import atomic_dir

    out = tmp_path / "out"
    if existing:
        with atomic_dir(out) as tmp:
            (tmp / "weights.bin").write_text("old")
    killed_write(out, point)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")], "the kill left nothing"
    with atomic_dir(tmp_path / "other") as tmp:  # any write in the same folder recovers
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["other", "out"] if existing else ["other"])
    if existing:  # killed while writing: the old output stays; between the renames: the complete new one
        assert (out / "weights.bin").read_text() == ("old" if point == "writing" else "new")


def test_replacing_an_output_moves_files_adapt_did_not_write_aside_and_names_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from adapt.core.outputs import atomic_dir

    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_text("old")
    (out / "NOTES.md").write_text("mine")  # added after the checks, before the replacement
    with atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_text("new")
    kept = [p for p in tmp_path.iterdir() if ".kept-" in p.name]
    assert len(kept) == 1 and sorted(p.name for p in kept[0].iterdir()) == ["NOTES.md"]
    assert (kept[0] / "NOTES.md").read_text() == "mine" and kept[0].name in caplog.text
    assert (out / "weights.bin").read_text() == "new"


def test_pruning_checkpoints_keeps_the_users_files(world: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "run"
    common = ("training.checkpoint_every=1", "training.keep_checkpoints=1", "training.export=false")
    run_recipe(world, out, "training.max_steps=1", *common)
    (out / "checkpoints/step-00000001/mine.txt").write_text("mine")
    run_recipe(world, out, "training.max_steps=2", *common)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert [p.name for p in (out / "checkpoints/step-00000001").iterdir()] == ["mine.txt"]


# ----------------------------------------------------------------------------- one run per output folder

HOLDER = "import sys, time; from pathlib import Path; from adapt.core.lock import lock_output; " \
    "l = lock_output(Path(sys.argv[1]), 'x'); print('held', flush=True); time.sleep(120)"  # fmt: skip


def hold(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
    return proc


def test_a_second_run_into_a_held_folder_is_refused_naming_the_first(world: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "run"
    holder = hold(out)
    try:
        before = tree(tmp_path)
        argv = [a.format(w=world) for a in finetune(f"training.output_dir={out}")]
        result = CliRunner().invoke(app, argv, env={"ADAPT_DEBUG": ""})
        check_one_error_line(
            result, f"is in use by another adapt run (pid {holder.pid} on {os.uname().nodename}"
        )
        assert tree(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    result = CliRunner().invoke(app, argv, env={"ADAPT_DEBUG": ""})  # killed -9: the OS released the lock
    assert result.exit_code == 0, result.output
    assert (out / "final/config.json").is_file()


def test_two_runs_started_together_one_is_refused(world: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "run"
    argv = ["finetune", *[a.format(w=world) for a in finetune(f"training.output_dir={out}")[1:]]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ADAPT_DEBUG": ""}
    procs = [subprocess.Popen([sys.executable, "-m", "adapt", *argv], env=env, stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True) for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    assert sorted(code for code, _ in results) == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    assert refused.strip().splitlines()[-1].startswith("error: training.output_dir") and "in use" in refused
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "loss" in m] == [1], "two runs' metrics mixed"


def test_force_moves_an_earlier_run_aside_byte_for_byte(world: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "run"
    run_recipe(world, out, "training.max_steps=2", "training.checkpoint_every=1")
    earlier = tree(out)
    argv = [a.format(w=world) for a in finetune(f"training.output_dir={out}", "training.resume=false")]
    result = CliRunner().invoke(app, [*argv, "--force"], env={"ADAPT_DEBUG": ""})
    assert result.exit_code == 0, result.output
    aside = next(out.glob("previous-*"))
    moved = {
        k.removeprefix(f"{aside.name}/"): v for k, v in tree(out).items() if k.startswith(aside.name + "/")
    }
    assert moved == {k: v for k, v in earlier.items() if k != ".adapt-lock"}
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "loss" in m] == [1]  # this run's only
    assert (out / "final/config.json").is_file()


# ----------------------------------------------------------------------------- permissions and full disks


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_weights_follow_the_umask(world: Path, tmp_path: Path, umask: int) -> None:  # noqa: F811
    from adapt.conversion.convert import convert

    old = os.umask(umask)
    try:
        convert(str(world / "src"), tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask, modes
    assert set(modes.values()) == {0o666 & ~umask}
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_full_disk_during_conversion_leaves_nothing_and_says_so(world: Path, tmp_path: Path) -> None:  # noqa: F811
    before = tree(tmp_path)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
    code = limit + "from adapt.cli import main; main()"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ADAPT_DEBUG": ""}
    run = subprocess.run([sys.executable, "-c", code, "convert", str(world / "src"), str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 1 and lines[-1].startswith("error:") and "Traceback" not in run.stderr, (
        run.stderr
    )
    assert "ulimit" in lines[-1] or "space" in lines[-1], lines[-1]
    assert tree(tmp_path) == before


def test_quickstart_reruns_in_its_own_folder_and_refuses_anyone_elses(tmp_path: Path) -> None:
    from adapt.quickstart import claim_folder

    claim_folder(tmp_path / "qs")
    (tmp_path / "qs/tiny-train.jsonl").write_text("the quickstart's")
    claim_folder(tmp_path / "qs")  # its own earlier folder: fine
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/run").mkdir()
    with pytest.raises(Exception, match="did not write"):
        claim_folder(tmp_path / "mine")  # only its names, but not its folder


def test_replacing_a_link_replaces_the_link_not_what_it_points_to(tmp_path: Path) -> None:
    from adapt.core.outputs import atomic_dir

    with atomic_dir(tmp_path / "target") as tmp:
        (tmp / "weights.bin").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with atomic_dir(tmp_path / "link") as tmp:
        (tmp / "weights.bin").write_text("new")
    assert (tmp_path / "target/weights.bin").read_text() == "old"
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link/weights.bin").read_text() == "new"
