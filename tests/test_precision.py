"""bf16 where it pays: what `auto` resolves to per device, and that training and sampling honour it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from adapt import precision
from adapt.errors import AdaptError
from adapt.precision import Bf16Support, resolve_inference_dtype, resolve_mixed_precision

ROOT = Path(__file__).resolve().parents[1]
AVX512_BF16 = Bf16Support("cpu", "AVX512", True)
AVX2 = Bf16Support("cpu", "AVX2", False)


@pytest.mark.parametrize(
    ("support", "training", "inference"),
    [
        (AVX512_BF16, "bf16", "bfloat16"),
        (AVX2, "no", "float32"),
        (Bf16Support("cuda", "NVIDIA H100", True), "bf16", "bfloat16"),
        (Bf16Support("cuda", "Tesla T4", False), "no", "float32"),
        (Bf16Support("mps", "mps", False), "no", "float32"),
    ],
)
def test_auto_follows_the_hardware(support: Bf16Support, training: str, inference: str) -> None:
    mp, why = resolve_mixed_precision("auto", support=support)
    dtype, why_dtype = resolve_inference_dtype("auto", support=support)
    assert (mp, dtype) == (training, inference)
    assert why == why_dtype and why.startswith("auto: ") and support.capability in why


def test_explicit_choices_pass_through_and_bad_ones_are_refused() -> None:
    assert resolve_mixed_precision("no", support=AVX512_BF16) == ("no", "requested")
    assert resolve_mixed_precision("bf16", support=AVX2) == ("bf16", "requested")
    assert resolve_inference_dtype("float32", support=AVX512_BF16) == ("float32", "requested")
    with pytest.raises(AdaptError, match="mixed precision must be one of auto, no, bf16, fp16"):
        resolve_mixed_precision("bf32")
    with pytest.raises(AdaptError, match="unknown dtype 'half'"):
        resolve_inference_dtype("half")


def test_avx512_without_bf16_extension_is_not_hardware_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN says bf16 is supported on any AVX512 CPU; only AVX512_BF16 or AMX make it fast."""
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert precision.cpu_has_hardware_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert precision.cpu_has_hardware_bf16() is True
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert precision.cpu_has_hardware_bf16() is False


def test_this_cpu_is_described_by_torchs_own_capability() -> None:
    support = precision.bf16_support("cpu")
    assert support.capability == torch.backends.cpu.get_cpu_capability()
    assert support.why().startswith(f"CPU {support.capability} ")


def linear_output_dtypes(model: torch.nn.Module) -> tuple[list[torch.dtype], list]:
    seen: list[torch.dtype] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    return seen, hooks


@pytest.mark.parametrize(("fast", "expected"), [(True, "bf16"), (False, "no")])
def test_training_auto_autocasts_in_bf16_only_where_it_pays(
    llama_diffusion: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fast: bool,
    expected: str,
) -> None:
    from adapt.config import load_recipe
    from adapt.train import setup, train_step

    monkeypatch.setattr(precision, "cpu_has_hardware_bf16", lambda: fast)
    recipe = load_recipe(
        ROOT / "recipes/adapt_text.yaml",
        [f"model.path={llama_diffusion}", f"training.output_dir={tmp_path / 'run'}",
         "logging.report_to=[]", "logging.progress_bar=false", "data.max_length=32", "training.max_steps=2"],
    )  # fmt: skip
    assert recipe.training.mixed_precision == "auto"
    with caplog.at_level(logging.INFO, logger="adapt"):
        session = setup(recipe)
    assert session.accelerator.mixed_precision == expected
    assert f"mixed precision: {expected} (auto: CPU " in caplog.text
    seen, hooks = linear_output_dtypes(session.model)
    loss, _, _ = train_step(session, iter(session.train_loader))
    for h in hooks:
        h.remove()
    assert torch.isfinite(loss)
    assert set(seen) == {torch.bfloat16 if fast else torch.float32}
    assert next(session.model.parameters()).dtype == torch.float32  # master weights stay fp32


@pytest.mark.parametrize(("fast", "dtype"), [(True, "bfloat16"), (False, "float32")])
def test_sampling_auto_loads_bf16_only_where_it_pays_and_says_so(
    llama_diffusion: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    fast: bool,
    dtype: str,
) -> None:
    from adapt.checkpoint import load_diffusion_model
    from adapt.sampling.command import sample
    from adapt.sampling.config import SamplingConfig

    monkeypatch.setattr(precision, "cpu_has_hardware_bf16", lambda: fast)
    config = SamplingConfig(gen_length=8, steps=8, stop_at_eos=False)
    sample(llama_diffusion, ["The river"], [], config, device="cpu", as_json=True, stream=False)
    err = capsys.readouterr().err
    assert f"on cpu in {dtype} (auto: CPU " in err
    model, _, _ = load_diffusion_model(llama_diffusion, dtype="auto", device="cpu")
    assert model.dtype == getattr(torch, dtype)


def test_checkpoint_dtype_keeps_the_saved_dtype(llama_diffusion: Path, tmp_path: Path) -> None:
    import shutil

    from adapt.checkpoint import load_diffusion_model

    saved = tmp_path / "bf16"
    shutil.copytree(llama_diffusion, saved)
    model, _, _ = load_diffusion_model(saved, dtype="bfloat16", device="cpu")
    model.save_pretrained(saved)
    assert load_diffusion_model(saved, dtype="checkpoint", device="cpu")[0].dtype == torch.bfloat16
    assert load_diffusion_model(saved, dtype="float32", device="cpu")[0].dtype == torch.float32
    with pytest.raises(AdaptError, match="unknown dtype 'fp8'"):
        load_diffusion_model(saved, dtype="fp8", device="cpu")
