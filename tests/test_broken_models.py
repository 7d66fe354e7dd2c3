"""No broken model in or out: a checkpoint missing a tensor, holding one it should not, one of the wrong
shape, or a NaN or infinite weight is refused by every command that would use or publish it.

transformers fills a missing or mis-shaped tensor with random weights and only logs a warning (which adapt's
commands silence); a NaN weight makes every output NaN. The rows follow `tests/test_bad_inputs.py`: a
non-zero exit, one `error:` line naming the tensor or metric, no traceback, every file left as it was.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import CORE_ARCHS
from test_bad_inputs import Case, adapter_for, check_one_error_line, finetune, run_case, tree, world  # noqa: F401
from typer.testing import CliRunner

from adapt.cli import app
from adapt.core.errors import AdaptError

pytestmark = pytest.mark.usefixtures("one_thread")

UP = "model.layers.0.mlp.up_proj.weight"
HEAD = "lm_head.weight"
NO_UP = f"1 tensor missing ({UP})"


# ----------------------------------------------------------------------------- ways to break a model


def tensors(
    model: str, edit: Callable[[dict], None], file: str = "model.safetensors"
) -> Callable[[Path], None]:
    """Rewrite `model`'s safetensors file with `edit` applied to its tensors (a dict, changed in place)."""

    def setup(w: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = w / model / file
        state = load_file(path)
        edit(state)
        save_file(state, path, metadata={"format": "pt"})

    return setup


def drop(name: str) -> Callable[[dict], None]:
    return lambda state: state.pop(name)


def extra(name: str) -> Callable[[dict], None]:
    return lambda state: state.update({name: torch.zeros(4, 4)})


def reshape(name: str) -> Callable[[dict], None]:
    return lambda state: state.update({name: state[name][:, :-1].contiguous()})


def poison(name: str, value: float = float("nan"), where: int = 7) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        state[name].view(-1)[where] = value

    return edit


def fill(name: str, value: float) -> Callable[[dict], None]:
    return lambda state: state.update({name: torch.full_like(state[name], value)})


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        for s in setups:
            s(w)

    return setup


def lora_export(w: Path) -> None:
    """A real LoRA adapter export of `ckpt` in `adapter/` (as `lora.export: adapter` writes it)."""
    from transformers import AutoModelForCausalLM

    from adapt.core.checkpoint import load_settings
    from adapt.training.config import LoraSettings
    from adapt.training.lora import apply_lora

    base = AutoModelForCausalLM.from_pretrained(w / "ckpt")
    apply_lora(base, LoraSettings(), load_settings(w / "ckpt").mask_token_id).save_pretrained(w / "adapter")
    for f in (w / "ckpt").glob("tokenizer*"):
        shutil.copy(f, w / "adapter" / f.name)


ADAPTER_FILE = "adapter_model.safetensors"
LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
TOKEN_ROW = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def lora_export_and(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    return both(lora_export, tensors("adapter", edit, ADAPTER_FILE))


def adapter_holding(value: float) -> Callable[[Path], None]:
    """An adapter export (from `adapter_for`) whose weights file holds `value`."""

    def setup(w: Path) -> None:
        from safetensors.torch import save_file

        save_file({LORA_A: torch.full((4, 64), value)}, w / "adapter" / ADAPTER_FILE)

    return setup


def records(name: str, text: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / "ckpt" / name).write_text(text)

    return setup


SAMPLE = ("sample", "{w}/ckpt", "--prompt", "a", "--gen-length", "8", "--steps", "8")
EVAL = ("eval", "{w}/ckpt", "--data", "{w}/data.txt", "--max-sequences", "2", "--mc-samples", "2", "--save")
DRY_RUN = ("push", "{w}/ckpt", "me/model", "--dry-run")
STAGE = ("push", "{w}/ckpt", "me/model", "--stage", "{w}/staged")

CASES = [
    # a source that does not fit its config: refused before anything is written
    Case("convert: source missing a tensor", ("convert", "{w}/src", "{w}/out"), NO_UP,
         tensors("src", drop(UP)), never=("out",)),
    Case("convert: source with an unexpected tensor", ("convert", "{w}/src", "{w}/out"),
         "1 tensor unexpected (model.layers.0.mlp.spare.weight)",
         tensors("src", extra("model.layers.0.mlp.spare.weight")), never=("out",)),
    Case("convert: source with a tensor of the wrong shape", ("convert", "{w}/src", "{w}/out"),
         f"{UP} is [128, 63] in the weights but [128, 64] by the config", tensors("src", reshape(UP)),
         never=("out",)),  # the headers' check (adapt.core.bounds) names it before any load
    Case("convert: source with a NaN weight", ("convert", "{w}/src", "{w}/out"), f"{UP} holds NaN",
         tensors("src", poison(UP)), never=("out",)),
    Case("finetune: source missing a tensor", finetune("model.path={w}/src"), NO_UP,
         tensors("src", drop(UP)), never=("run/final",)),
    # a diffusion checkpoint missing a tensor is never run with random weights
    Case("sample: checkpoint missing a tensor", SAMPLE, NO_UP, tensors("ckpt", drop(UP))),
    Case("verify: checkpoint missing a tensor", ("verify", "{w}/ckpt"), NO_UP,
         tensors("ckpt", drop(UP))),
    Case("eval: checkpoint missing a tensor", EVAL, NO_UP, tensors("ckpt", drop(UP))),
    Case("finetune: checkpoint missing a tensor", finetune(), NO_UP, tensors("ckpt", drop(UP)),
         never=("run/final",)),
    Case("sample: LoRA adapter missing a tensor", ("sample", "{w}/adapter", "--prompt", "a"),
         f"1 tensor missing ({LORA_A})", lora_export_and(drop(LORA_A))),
    Case("sample: LoRA adapter missing its mask-token row", ("sample", "{w}/adapter", "--prompt", "a"),
         f"1 tensor missing ({TOKEN_ROW})", lora_export_and(drop(TOKEN_ROW))),
    Case("sample: LoRA adapter with a tensor of the wrong shape", ("sample", "{w}/adapter", "--prompt", "a"),
         f"1 tensor of the wrong shape ({LORA_A} [16, 63] in the file", lora_export_and(reshape(LORA_A))),
    # non-finite weights: not evaluated, not sampled, never published
    Case("eval: a NaN weight", EVAL, f"{UP} holds NaN", tensors("ckpt", poison(UP))),
    Case("eval: finite weights, NaN NLL", EVAL, "is not finite (nll=nan", tensors("ckpt", fill(HEAD, 1e38))),
    Case("sample: an infinite weight", SAMPLE, f"{UP} holds NaN or infinity",
         tensors("ckpt", poison(UP, float("inf")))),
    Case("push --dry-run: a NaN weight", DRY_RUN, f"model.safetensors: {UP} holds NaN",
         tensors("ckpt", poison(UP))),
    Case("push --stage: a NaN weight", STAGE, f"model.safetensors: {UP} holds NaN",
         tensors("ckpt", poison(UP)), never=("staged",)),
    Case("push: a NaN weight, --allow-non-finite", (*DRY_RUN, "--allow-non-finite"), "never published",
         tensors("ckpt", poison(UP))),
    Case("push: an infinite weight in a LoRA adapter", ("push", "{w}/adapter", "me/lora", "--dry-run"),
         f"{ADAPTER_FILE}: {LORA_A} holds NaN or infinity",
         both(adapter_for("{w}/ckpt"), adapter_holding(float("-inf")))),
    # non-finite recorded metrics
    Case("push: infinity in eval_results.json", STAGE, "non-finite metrics (models.0.ppl=inf)",
         records("eval_results.json", '{"models": [{"model": "x", "nll": 1.0, "ppl": Infinity}]}'),
         never=("staged",)),
    Case("push: infinity in training_summary.json", DRY_RUN, "non-finite metrics (train_loss=inf)",
         records("training_summary.json", '{"steps": 1, "train_loss": Infinity}')),
    Case("push: NaN recorded as null in eval_results.json", DRY_RUN, "models.0.nll=null",
         records("eval_results.json", '{"models": [{"model": "x", "nll": null, "ppl": null}]}')),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_broken_model(case: Case, world: Path, tmp_path: Path) -> None:  # noqa: F811
    run_case(case, world, tmp_path)


# ----------------------------------------------------------------------------- what still loads


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_clean_checkpoints_of_every_architecture_load(converted: dict[str, Path], arch: str) -> None:
    """The `converted` fixture converts every tiny architecture (tied and untied heads, rotary buffers) with
    the strict loader; each converted checkpoint loads strictly again to sample."""
    from adapt.loading.model import load_diffusion_model

    model, _, settings = load_diffusion_model(converted[arch], device="cpu")
    assert settings.mask_token_id < model.get_input_embeddings().num_embeddings


def test_a_clean_lora_adapter_loads_and_merges(world: Path, tmp_path: Path) -> None:  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapt.loading.model import load_diffusion_model

    w = tmp_path / "w"
    shutil.copytree(world, w)
    lora_export(w)
    merged, _, _ = load_diffusion_model(w / "adapter", device="cpu")
    base = AutoModelForCausalLM.from_pretrained(w / "ckpt")
    reference = PeftModel.from_pretrained(base, w / "adapter").merge_and_unload()
    ids = torch.tensor([[3, 17, 42, 25]])
    torch.testing.assert_close(merged(ids).logits, reference(ids).logits)


# ----------------------------------------------------------------------------- the scan itself


def test_the_scan_names_the_first_non_finite_tensor_of_any_float_dtype(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from adapt.loading.weights import first_non_finite, non_finite_in_files

    clean = {"a": torch.ones(3), "ids": torch.arange(4)}
    assert first_non_finite(clean.items()) is None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        bad = {
            **clean,
            "b": torch.tensor([1.0, float("nan")], dtype=dtype),
            "c": torch.full((2,), float("inf")),
        }
        assert first_non_finite(bad.items()) == "b"
    big = torch.zeros(3, 1 << 12)
    big[2, -1] = float("inf")  # past the first chunk
    assert first_non_finite([("big", big)], chunk=1000) == "big"
    save_file(clean, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"z": big}, tmp_path / "model-00002-of-00002.safetensors")
    files = sorted(tmp_path.glob("*.safetensors"))
    assert non_finite_in_files(files) == (files[1], "z")
    assert non_finite_in_files(files[:1]) is None


def test_the_refusal_names_the_first_tensors_and_counts_the_rest() -> None:
    from adapt.loading.weights import check_complete

    check_complete("x", [], [], [])
    with pytest.raises(
        AdaptError, match=r"5 tensors missing \(t0, t1, t2, and 2 more\); 1 tensor of the wrong"
    ):
        check_complete("x", [f"t{i}" for i in range(5)], [], [("w", (2, 3), (2, 4))])


def test_export_still_refuses_non_finite_state_dicts(tmp_path: Path) -> None:
    from adapt.training.export import check_finite_weights

    check_finite_weights({"a": torch.ones(2), "step": 3}, tmp_path)
    with pytest.raises(AdaptError, match="not finite \\(w holds NaN or infinity\\); nothing exported"):
        check_finite_weights({"a": torch.ones(2), "w": torch.tensor([float("nan")])}, tmp_path)


def test_eval_results_never_record_null_metrics(world: Path, tmp_path: Path) -> None:  # noqa: F811
    """What a clean eval --save writes passes push's check: every nll and ppl is a number."""
    from adapt.publishing.hub import check_recorded_metrics

    w = tmp_path / "w"
    shutil.copytree(world, w)
    result = CliRunner().invoke(app, [a.format(w=w) for a in EVAL])
    assert result.exit_code == 0, result.output
    rows = json.loads((w / "ckpt/eval_results.json").read_text())["models"]
    assert all(isinstance(r["nll"], float) and isinstance(r["ppl"], float) for r in rows)
    check_recorded_metrics(w / "ckpt")
