"""What adapt promises on bad input: one row per case, across every command. The rows are the documentation.

Each row breaks something in a fresh copy of a tiny world (an AR source `src`, its diffusion checkpoint
`ckpt`, a text file `data`), runs one command and asserts: a non-zero exit code, exactly one line on
stderr that starts with `error:` and is the last one, no traceback, the message names what is at fault,
and the file tree is unchanged apart from the paths the row says the command may write.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapt.cli import app, sample_cmd, script

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes/adapt_text.yaml")
QUIET = ("logging.report_to=[]", "logging.progress_bar=false", "training.max_steps=1")


# ----------------------------------------------------------------------------- ways to break the world


def nothing(w: Path) -> None:
    pass


def a_file_named(name: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / name).write_text("not a directory\n")

    return setup


def weights(model: str, content: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        f = w / model / "model.safetensors"
        f.write_bytes(content(f.read_bytes()))

    return setup


class _Payload:
    """A pickle that would create a file if it were ever unpickled with code execution allowed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def hostile_pickle(model: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / model / "model.safetensors").unlink()
        with (w / model / "pytorch_model.bin").open("wb") as f:
            pickle.dump({"model.embed_tokens.weight": _Payload(w / "pwned")}, f)

    return setup


def bad_bytes(name: str, content: bytes) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / name).write_bytes(content)

    return setup


def mask_id(value: int) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        config = json.loads((w / "ckpt/config.json").read_text())
        config["diffusion"]["mask_token_id"] = config["mask_token_id"] = value
        (w / "ckpt/config.json").write_text(json.dumps(config))

    return setup


NON_UTF8_TEXT = b"The river ran.\n\nThe mill \xff\xfe turned.\n"
NON_UTF8_JSONL = b'{"text": "fine"}\n{"text": "bad \xff bytes"}\n'


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    """The command line; {w} is the world directory."""
    says: str
    """A fragment of the one error line."""
    setup: Callable[[Path], None] = nothing
    may_write: tuple[str, ...] = ()
    """Paths (relative to the world) the command may leave behind."""


def finetune(*overrides: str) -> tuple[str, ...]:
    base = ("model.path={w}/ckpt", "data.path={w}/data.txt", "training.output_dir={w}/run")
    return ("finetune", RECIPE, *base, *QUIET, *overrides)


CASES = [
    # convert
    Case("convert: output under a file", ("convert", "{w}/src", "{w}/afile/out"), "is a file",
         a_file_named("afile")),
    Case("convert: truncated safetensors", ("convert", "{w}/src", "{w}/out"), "corrupt, truncated",
         weights("src", lambda b: b[: len(b) // 2])),
    Case("convert: empty safetensors", ("convert", "{w}/src", "{w}/out"), "corrupt, truncated",
         weights("src", lambda b: b"")),
    Case("convert: random safetensors", ("convert", "{w}/src", "{w}/out"), "corrupt, truncated",
         weights("src", lambda b: os.urandom(len(b)))),
    Case("convert: hostile pickle", ("convert", "{w}/src", "{w}/out"), "refused to unpickle",
         hostile_pickle("src")),
    # sample
    Case("sample: truncated weights", ("sample", "{w}/ckpt", "--prompt", "a"), "cannot load the model in",
         weights("ckpt", lambda b: b[:1000])),
    Case("sample: hostile pickle", ("sample", "{w}/ckpt", "--prompt", "a"), "refused to unpickle",
         hostile_pickle("ckpt")),
    Case("sample: output longer than the context", ("sample", "{w}/ckpt", "--prompt", "a", "--gen-length",
         "1000000000"), "context of 256"),
    Case("sample: infill longer than the context",
         ("sample", "{w}/ckpt", "--infill", "a<|mask|>*99999999999999"), "context of 256"),
    Case("sample: invalid device", ("sample", "{w}/ckpt", "--prompt", "a", "--device", "foo"),
         "--device 'foo'"),
    Case("sample: mask id outside the vocabulary", ("sample", "{w}/ckpt", "--prompt", "a"),
         "outside the vocabulary", mask_id(10**6)),
    # eval
    Case("eval: non-UTF-8 text", ("eval", "{w}/ckpt", "--data", "{w}/bad.txt"), "bad.txt is not UTF-8 text",
         bad_bytes("bad.txt", NON_UTF8_TEXT)),
    Case("eval: non-UTF-8 jsonl", ("eval", "{w}/ckpt", "--data", "{w}/bad.jsonl"), "(line 2)",
         bad_bytes("bad.jsonl", NON_UTF8_JSONL)),
    Case("eval: --json under a file", ("eval", "{w}/ckpt", "--data", "{w}/data.txt", "--json",
         "{w}/afile/r.json"), "is a file", a_file_named("afile")),
    Case("eval: invalid device", ("eval", "{w}/ckpt", "--data", "{w}/data.txt", "--device", "cuda:x"),
         "is not a device"),
    Case("eval: window longer than the context", ("eval", "{w}/ckpt", "--data", "{w}/data.txt", "--seq-len",
         "100000"), "--seq-len 100000"),
    # finetune
    Case("finetune: non-UTF-8 data", finetune("data.path={w}/bad.txt"), "not UTF-8 text",
         bad_bytes("bad.txt", NON_UTF8_TEXT)),
    Case("finetune: output under a file", finetune("training.output_dir={w}/afile/run"), "is a file",
         a_file_named("afile")),
    Case("finetune: blocks longer than the context", finetune("data.max_length=4096"),
         "data.max_length=4096"),
]  # fmt: skip

if not torch.cuda.is_available():
    CASES.append(
        Case(
            "sample: cuda without CUDA",
            ("sample", "{w}/ckpt", "--prompt", "a", "--device", "cuda"),
            "--device cuda",
        )
    )


# ----------------------------------------------------------------------------- the world and the checks


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapt.convert import convert
    from adapt.tiny import SAMPLE_TEXT, build_tiny_model

    root = tmp_path_factory.mktemp("world")
    build_tiny_model("llama", root / "src")
    convert(str(root / "src"), root / "ckpt")
    (root / "data.txt").write_text("\n\n".join([SAMPLE_TEXT] * 4))
    return root


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root with what a command could change: kind, size, mtime, mode."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[p.relative_to(root).as_posix()] = (
            p.is_dir(),
            0 if p.is_dir() else st.st_size,
            st.st_mtime_ns,
            st.st_mode,
        )
    return out


def check_one_error_line(result: object, says: str) -> None:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.exit_code != 0, result.output  # type: ignore[attr-defined]
    exc = result.exception  # type: ignore[attr-defined]
    assert exc is None or isinstance(exc, SystemExit), f"unhandled {exc!r}"
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert says in errors[0], errors[0]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, world: Path, tmp_path: Path) -> None:
    w = tmp_path / "w"
    shutil.copytree(world, w)
    case.setup(w)
    before = tree(w)
    argv = [a.format(w=w) for a in case.argv]
    result = CliRunner().invoke(app, argv, env={"ADAPT_DEBUG": ""})
    check_one_error_line(result, case.says)
    after = {k: v for k, v in tree(w).items() if not any(k.startswith(m) for m in case.may_write)}
    assert after == before, set(after.items()) ^ set(before.items())


# ----------------------------------------------------------------------------- the boundary itself


def test_the_scripts_share_the_boundary(world: Path) -> None:
    result = CliRunner().invoke(script(sample_cmd), [str(world / "ckpt"), "--prompt", "a", "--device", "foo"])
    check_one_error_line(result, "--device 'foo'")
    run = subprocess.run(
        [sys.executable, "sample.py", str(world / "ckpt"), "--prompt", "a", "--device", "foo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "ADAPT_DEBUG": ""},
    )
    assert run.returncode == 1 and run.stderr.strip().startswith("error: --device 'foo'"), run.stderr
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr


def test_a_bug_keeps_its_traceback_and_debug_shows_every_traceback(world: Path, monkeypatch) -> None:
    import adapt.sampling.command as command

    debug = CliRunner().invoke(
        app, ["--debug", "sample", str(world / "ckpt"), "--prompt", "a", "--device", "x"]
    )
    assert type(debug.exception).__name__ == "AdaptError"  # raised with its traceback

    def bug(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug in adapt")

    monkeypatch.setattr(command, "sample", bug)
    result = CliRunner().invoke(app, ["sample", str(world / "ckpt"), "--prompt", "a"])
    assert isinstance(result.exception, ZeroDivisionError)  # not turned into a line: the user must see it
