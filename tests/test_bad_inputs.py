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


def files(**contents: str) -> Callable[[Path], None]:
    """Write text files, e.g. files(**{"mine/notes.txt": "x"})."""

    def setup(w: Path) -> None:
        for name, text in contents.items():
            (w / name).parent.mkdir(parents=True, exist_ok=True)
            (w / name).write_text(text)

    return setup


def checkpoints_of(model: str, corrupt: bool = False) -> Callable[[Path], None]:
    """A run directory holding one checkpoint recorded for `model` (its weights garbage when `corrupt`)."""

    def setup(w: Path) -> None:
        from adapt.training.config import load_recipe, save_recipe

        step = w / "run/checkpoints/step-00000001"
        step.mkdir(parents=True)
        argv = [a.format(w=w) for a in finetune(f"model.path={{w}}/{model}")[2:]]
        save_recipe(load_recipe(RECIPE, argv), step / "recipe.yaml")
        (step / "trainer_state.json").write_text(json.dumps({"step": 1}))
        (step / "model.safetensors").write_bytes(b"garbage" if corrupt else b"")

    return setup


def export_with(**contents: str) -> Callable[[Path], None]:
    """OUTPUT_DIR/final is an export adapt wrote (the converted checkpoint) plus the given files."""

    def setup(w: Path) -> None:
        shutil.copytree(w / "ckpt", w / "run/final")
        files(**contents)(w)

    return setup


def adapter_for(base: str) -> Callable[[Path], None]:
    """A LoRA adapter export in `adapter/` whose adapter_config.json names `base` ({w}: the world)."""

    def setup(w: Path) -> None:
        (w / "adapter").mkdir()
        config = {"peft_type": "LORA", "base_model_name_or_path": base.format(w=w), "r": 4}
        (w / "adapter/adapter_config.json").write_text(json.dumps(config))
        for f in (w / "ckpt").glob("tokenizer*"):
            shutil.copy(f, w / "adapter" / f.name)

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
    never: tuple[str, ...] = ()
    """Paths (relative to the world) that must not exist afterwards (a broken export)."""


JOINT = (
    "diffusion.block_size=4",
    "diffusion.clean_attention=causal",
    "diffusion.ar_loss_weight=1",
    "diffusion.anneal_steps=0",
)


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
    Case("convert: output is the parent of the source, --force", ("convert", "{w}/src", "{w}", "--force"),
         "contains the source"),
    Case("convert: output is the source, --force", ("convert", "{w}/src", "{w}/src", "--force"),
         "is the source"),
    Case("convert: output inside the source", ("convert", "{w}/src", "{w}/src/out"),
         "lies inside the source"),
    Case("convert: --force over files adapt did not write", ("convert", "{w}/src", "{w}/mine", "--force"),
         "adapt did not write (notes.txt)", files(**{"mine/notes.txt": "mine"})),
    Case("convert: --force over an adapt checkpoint holding the user's files",
         ("convert", "{w}/src", "{w}/ckpt", "--force"), "adapt did not write (NOTES.md, other-run/)",
         files(**{"ckpt/NOTES.md": "mine", "ckpt/other-run/x.txt": "mine"})),
    Case("convert: non-empty output without --force", ("convert", "{w}/src", "{w}/ckpt2"), "--force",
         files(**{"ckpt2/notes.txt": "mine"})),
    Case("convert: not a model directory", ("convert", "{w}/afile", "{w}/out"), "afile",
         a_file_named("afile")),
    Case("convert: config.json is not JSON", ("convert", "{w}/src", "{w}/out"), "config",
         files(**{"src/config.json": "{not json"})),
    Case("convert: unknown Hub id", ("convert", "nobody-here/no-such-model", "{w}/out"), "no-such-model"),
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
    Case("sample: negative mask id", ("sample", "{w}/ckpt", "--prompt", "a"), "mask_token_id",
         mask_id(-3)),
    Case("sample: an AR model", ("sample", "{w}/src", "--prompt", "a"), "not a diffusion checkpoint"),
    Case("sample: config.json is not JSON", ("sample", "{w}/ckpt", "--prompt", "a"), "not valid JSON",
         files(**{"ckpt/config.json": "{not json"})),
    Case("sample: no such checkpoint", ("sample", "{w}/nothing", "--prompt", "a"), "no such checkpoint"),
    Case("sample: a Hub id neither cached nor reachable (offline)", ("sample", "nobody/nothing", "--prompt",
         "a"), "'nobody/nothing' is not in the Hub cache"),
    Case("sample: --revision of a local directory",
         ("sample", "{w}/ckpt", "--revision", "v1", "--prompt", "a"), "--revision v1 applies to Hub ids"),
    Case("sample: a LoRA adapter whose base is gone", ("sample", "{w}/adapter", "--prompt", "a"),
         "needs its base model", adapter_for("{w}/gone")),
    # verify
    Case("verify: truncated weights", ("verify", "{w}/ckpt"), "cannot load",
         weights("ckpt", lambda b: b[:1000])),
    Case("verify: hostile pickle", ("verify", "{w}/ckpt"), "refused to unpickle", hostile_pickle("ckpt")),
    # eval
    Case("eval: non-UTF-8 text", ("eval", "{w}/ckpt", "--data", "{w}/bad.txt"), "bad.txt is not UTF-8 text",
         bad_bytes("bad.txt", NON_UTF8_TEXT)),
    Case("eval: non-UTF-8 jsonl", ("eval", "{w}/ckpt", "--data", "{w}/bad.jsonl"), "(line 2)",
         bad_bytes("bad.jsonl", NON_UTF8_JSONL)),
    Case("eval: --json under a file", ("eval", "{w}/ckpt", "--data", "{w}/data.txt", "--json",
         "{w}/afile/r.json"), "is a file", a_file_named("afile")),
    Case("eval: --json over the eval data", ("eval", "{w}/ckpt", "--data", "{w}/data.txt", "--json",
         "{w}/data.txt"), "is --data"),
    Case("eval: --plot inside a checkpoint", ("eval", "{w}/ckpt", "--data", "{w}/data.txt", "--plot",
         "{w}/ckpt/config.json"), "lies inside the model"),
    Case("eval: invalid device", ("eval", "{w}/ckpt", "--data", "{w}/data.txt", "--device", "cuda:x"),
         "is not a device"),
    Case("eval: window longer than the context", ("eval", "{w}/ckpt", "--data", "{w}/data.txt", "--seq-len",
         "100000"), "--seq-len 100000"),
    Case("eval: truncated weights", ("eval", "{w}/ckpt", "--data", "{w}/data.txt"), "corrupt, truncated",
         weights("ckpt", lambda b: b[:1000])),
    Case("eval: --json is a directory", ("eval", "{w}/ckpt", "--data", "{w}/data.txt", "--json", "{w}/src"),
         "is a directory"),
    Case("eval: mask id outside the vocabulary", ("eval", "{w}/ckpt", "--data", "{w}/data.txt"),
         "outside the vocabulary", mask_id(10**6)),
    Case("eval: unknown Hub id", ("eval", "nobody-here/no-such-model", "--data", "{w}/data.txt"),
         "no-such-model"),
    # quickstart
    Case("quickstart: --out holding the user's files", ("quickstart", "--tiny", "--out", "{w}/qs"),
         "did not write (tiny-train.jsonl)", files(**{"qs/tiny-train.jsonl": "mine"})),
    # push (dry runs: nothing is contacted)
    Case("push: NaN in the training summary", ("push", "{w}/ckpt", "me/model", "--dry-run"), "non-finite",
         files(**{"ckpt/training_summary.json": '{"steps": 1, "eval_loss": NaN}'})),
    Case("push: invalid repo id", ("push", "{w}/ckpt", "not a repo", "--dry-run"), "invalid repo id"),
    Case("push: an AR model", ("push", "{w}/src", "me/model", "--dry-run"), "not a diffusion checkpoint"),
    Case("push: a LoRA adapter on a local base", ("push", "{w}/adapter", "me/lora", "--dry-run"),
         "pass --base-model NAMESPACE/BASE", adapter_for("{w}/ckpt")),
    Case("push: a LoRA adapter whose Hub base is not found", ("push", "{w}/adapter", "me/lora", "--dry-run",
         "--base-model", "org/nowhere"), "org/nowhere cannot be used", adapter_for("{w}/ckpt")),
    Case("push: --base-model for a full checkpoint", ("push", "{w}/ckpt", "me/model", "--dry-run",
         "--base-model", "org/base"), "--base-model applies to LoRA adapter exports"),
    Case("push: --stage into a non-empty directory", ("push", "{w}/ckpt", "me/model", "--stage", "{w}/src"),
         "not an empty directory"),
    # finetune
    Case("finetune: push_to_hub of an adapter trained on a local base",
         finetune("lora.export=adapter", "push_to_hub=me/lora"), "a local directory nobody else can reach"),
    Case("finetune: non-UTF-8 data", finetune("data.path={w}/bad.txt"), "not UTF-8 text",
         bad_bytes("bad.txt", NON_UTF8_TEXT)),
    Case("finetune: output under a file", finetune("training.output_dir={w}/afile/run"), "is a file",
         a_file_named("afile")),
    Case("finetune: blocks longer than the context", finetune("data.max_length=4096"),
         "data.max_length=4096"),
    Case("finetune: non-UTF-8 jsonl", finetune("data.path={w}/bad.jsonl"), "(line 2)",
         bad_bytes("bad.jsonl", NON_UTF8_JSONL)),
    Case("finetune: flex_attention on a CPU (no FlexAttention backward there)",
         finetune("model.attn_implementation=flex_attention"), "cannot train on cpu"),
    Case("finetune: an attention kernel transformers does not have",
         finetune("model.attn_implementation=flash"), "model.attn_implementation"),
    Case("finetune: an AR teacher without the AR term", finetune("diffusion.ar_teacher={w}/src"),
         "ar_loss_weight is 0"),
    Case("finetune: a full mask without the AR term", finetune("diffusion.full_mask=true"),
         "needs the AR term"),
    Case("finetune: an AR teacher that is not there", finetune(*JOINT, "diffusion.ar_teacher={w}/nothing"),
         "no AR model at"),
    Case("finetune: a diffusion checkpoint as the AR teacher",
         finetune(*JOINT, "diffusion.ar_teacher={w}/ckpt"),
         "is a diffusion checkpoint"),
    Case("finetune: lr is NaN", finetune("training.lr=.nan"), "training.lr must be a finite number"),
    Case("finetune: lr is infinite", finetune("training.lr=.inf"), "training.lr must be a finite number"),
    Case("finetune: negative lr", finetune("training.lr=-1"), "training.lr must be > 0"),
    Case("finetune: unknown recipe key", finetune("training.lrr=1"), "unknown key 'training.lrr'"),
    Case("finetune: output_dir is the model", finetune("training.output_dir={w}/ckpt"),
         "lies inside model.path"),
    Case("finetune: output_dir holds the data",
         finetune("training.output_dir={w}/d", "data.path={w}/d/final"), "data.path",
         files(**{"d/final": "text"})),
    Case("finetune: export over files adapt did not write", finetune(), "adapt did not write",
         files(**{"run/final/notes.txt": "mine"})),
    Case("finetune: export over an adapt export holding the user's file", finetune(), "adapt did not write",
         export_with(**{"run/final/eval.txt": "mine"})),
    Case("finetune: eval data inside the export it replaces",
         finetune("data.eval_path={w}/run/final/eval.txt"), "data.eval_path", export_with(**{
             "run/final/eval.txt": "The river ran.\n\nThe mill turned.\n"})),
    Case("finetune: resume=false over an earlier run's checkpoints", finetune("training.resume=false"),
         "pass --force to move the earlier run aside", checkpoints_of("ckpt")),
    Case("finetune: resume=false over an earlier run's metrics", finetune("training.resume=false"),
         "holds an earlier run (metrics.jsonl)",
         files(**{"run/metrics.jsonl": '{"step": 1, "loss": 2.0}\n'})),
    Case("finetune: checkpoints of another model", finetune(), "holds checkpoints of another run",
         checkpoints_of("src")),
    Case("finetune: no checkpoint loads", finetune(), "can be loaded", checkpoints_of("ckpt", corrupt=True),
         may_write=("run",)),
    Case("finetune: mask id outside the vocabulary", finetune(), "outside the vocabulary", mask_id(10**6)),
    Case("finetune: diverging lr, no held-out split",
         finetune("training.lr=1e38", "data.eval_fraction=0", "training.max_grad_norm=null"),
         "nothing exported",
         may_write=("run",), never=("run/final",)),
    Case("finetune: diverging lr, held-out split", finetune("training.lr=1e30"), "is nan",
         may_write=("run",), never=("run/final",)),
]  # fmt: skip


def read_only_dir(name: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / name).mkdir()
        (w / name).chmod(0o555)

    return setup


if os.geteuid() != 0:  # root may write anywhere
    CASES.append(
        Case(
            "convert: unwritable output location",
            ("convert", "{w}/src", "{w}/ro/out"),
            "cannot create files",
            read_only_dir("ro"),
        )
    )

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
    from adapt.conversion.convert import convert
    from adapt.tiny import SAMPLE_TEXT, build_tiny_model

    root = tmp_path_factory.mktemp("world")
    build_tiny_model("llama", root / "src")
    convert(str(root / "src"), root / "ckpt")
    (root / "data.txt").write_text("\n\n".join([SAMPLE_TEXT] * 20))
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


def run_case(case: Case, world: Path, tmp_path: Path, env: dict[str, str | None] | None = None) -> None:
    """Break a fresh copy of the world as the row says, run its command, and check the promise: one error
    line naming the fault, every file as it was but those the row may write, none it must never leave."""
    w = tmp_path / "w"
    shutil.copytree(world, w)
    case.setup(w)
    before = tree(w)
    argv = [a.format(w=w) for a in case.argv]
    result = CliRunner().invoke(app, argv, env={"ADAPT_DEBUG": "", **(env or {})})
    check_one_error_line(result, case.says)
    after = {k: v for k, v in tree(w).items() if not any(k.startswith(m) for m in case.may_write)}
    before = {k: v for k, v in before.items() if not any(k.startswith(m) for m in case.may_write)}
    assert after == before, set(after.items()) ^ set(before.items())
    assert not [p for p in case.never if (w / p).exists()]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, world: Path, tmp_path: Path) -> None:
    run_case(case, world, tmp_path)


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


# ----------------------------------------------------------------------------- what survives faults


def run_recipe(world: Path, out: Path, *overrides: str) -> None:
    from adapt.training.config import load_recipe
    from adapt.training.run import run

    base = [a.format(w=world) for a in finetune()[2:] if not a.startswith("training.output_dir")]
    run(load_recipe(RECIPE, [*base, f"training.output_dir={out}", *overrides]))


def test_resume_falls_back_past_a_corrupt_checkpoint_without_repeating_metrics(
    world: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    common = ("training.checkpoint_every=1", "logging.log_every=1", "training.export=false")
    run_recipe(world, out, "training.max_steps=2", *common)
    newest = out / "checkpoints/step-00000002"
    (newest / "model.safetensors").write_bytes(b"\0" * 100)
    run_recipe(world, out, "training.max_steps=3", *common)
    assert "step-00000002 cannot be loaded" in caplog.text and "resumed from" in caplog.text
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "loss" in m] == [1, 2, 3]  # step 2 of the first run dropped
    assert [m["step"] for m in logged if "eval_loss" in m] == [3]
    assert (out / "checkpoints/step-00000003").is_dir()


def test_outputs_follow_the_umask(world: Path, tmp_path: Path) -> None:
    from adapt.core.outputs import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (world / "ckpt").stat().st_mode & 0o077, "the converted checkpoint is readable by others"


def test_summaries_are_strict_json(tmp_path: Path) -> None:
    from adapt.core.outputs import json_text

    assert json.loads(json_text({"a": float("nan"), "b": [float("inf"), 1.5]})) == {
        "a": None,
        "b": [None, 1.5],
    }
