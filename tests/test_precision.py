"""bf16 where it pays: what `auto` resolves to per device, and that training and sampling honour it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from adapt.core.errors import AdaptError
from adapt.loading import precision
from adapt.loading.precision import Bf16Support, resolve_inference_dtype, resolve_mixed_precision

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


@pytest.mark.parametrize(("speedup", "expected"), [(3.9, "bf16"), (1.49, "no"), (0.78, "no")])
def test_a_cpu_with_bf16_instructions_must_also_measure_faster(
    monkeypatch: pytest.MonkeyPatch, speedup: float, expected: str
) -> None:
    """AVX512_BF16 without AMX measured bf16 matmuls at 0.5-1.0x fp32 on one machine: the flag alone
    does not decide."""
    monkeypatch.setattr(precision, "cpu_has_hardware_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda threads: speedup)
    mp, why = resolve_mixed_precision("auto", "cpu")
    assert mp == expected
    assert why.endswith(f"with hardware bf16, bf16 matmul {speedup:.2f}x fp32"), why
    assert resolve_inference_dtype("auto", "cpu")[0] == ("bfloat16" if expected == "bf16" else "float32")


def test_cpu_without_bf16_instructions_is_not_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(threads: int) -> float:
        raise AssertionError("emulated bf16 is never timed")

    monkeypatch.setattr(precision, "cpu_has_hardware_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", never)
    assert resolve_mixed_precision("auto", "cpu") == (
        "no",
        "auto: CPU " + f"{torch.backends.cpu.get_cpu_capability()} has no hardware bf16",
    )


def test_the_bf16_timing_is_a_ratio_measured_at_the_given_threads() -> None:
    before = torch.get_num_threads()
    speedup = precision.cpu_bf16_speedup.__wrapped__(1)  # uncached
    assert 0.01 < speedup < 100 and torch.get_num_threads() == before


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
    from adapt.training.config import load_recipe
    from adapt.training.setup import setup
    from adapt.training.step import train_step

    monkeypatch.setattr(precision, "cpu_has_hardware_bf16", lambda: fast)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda threads: 3.9)
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
    from adapt.loading.model import load_diffusion_model
    from adapt.sampling.command import sample
    from adapt.sampling.config import SamplingConfig

    monkeypatch.setattr(precision, "cpu_has_hardware_bf16", lambda: fast)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda threads: 3.9)
    config = SamplingConfig(gen_length=8, steps=8, stop_at_eos=False)
    sample(llama_diffusion, ["The river"], [], config, device="cpu", as_json=True, stream=False)
    err = capsys.readouterr().err
    assert f"on cpu in {dtype} (auto: CPU " in err
    model, _, _ = load_diffusion_model(llama_diffusion, dtype="auto", device="cpu")
    assert model.dtype == getattr(torch, dtype)


def test_checkpoint_dtype_keeps_the_saved_dtype(llama_diffusion: Path, tmp_path: Path) -> None:
    import shutil

    from adapt.loading.model import load_diffusion_model

    saved = tmp_path / "bf16"
    shutil.copytree(llama_diffusion, saved)
    model, _, _ = load_diffusion_model(saved, dtype="bfloat16", device="cpu")
    model.save_pretrained(saved)
    assert load_diffusion_model(saved, dtype="checkpoint", device="cpu")[0].dtype == torch.bfloat16
    assert load_diffusion_model(saved, dtype="float32", device="cpu")[0].dtype == torch.float32
    with pytest.raises(AdaptError, match="unknown dtype 'fp8'"):
        load_diffusion_model(saved, dtype="fp8", device="cpu")
