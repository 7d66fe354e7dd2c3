"""`adapt verify`: a saved checkpoint passes or fails the checks, and every check can catch its bug."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapt.conversion.verify import (
    check_block_causality,
    check_exact_cache,
    check_settings,
    make_probe,
    ordinary_token_ids,
)
from adapt.core.attention import causal_mask_4d, to_additive
from adapt.core.checkpoint import DiffusionSettings
from adapt.core.errors import AdaptError
from adapt.loading.model import load_diffusion_model

FULL = ["ok  settings", "ok  bidirectional attention", "ok  padding invariance", "ok  batch invariance"]
BLOCK = [*FULL, "ok  block causality", "ok  exact KV cache"]


pytestmark = pytest.mark.usefixtures("one_thread")


def edited(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of checkpoint `src` at `dst` whose config.json went through `edit`."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def block_size_4(config: dict) -> None:
    config["diffusion"]["block_size"] = 4


@pytest.fixture(scope="module")
def block_checkpoints(converted: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify-block")
    return {a: edited(converted[a], root / a, block_size_4) for a in ("llama", "qwen2")}


def verify(path: Path) -> object:
    from adapt.cli import app

    return CliRunner().invoke(app, ["verify", str(path)])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_attention_checkpoints_pass(converted: dict, arch: str) -> None:
    result = verify(converted[arch])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [*FULL, f"verified {converted[arch]} (full attention)"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_block_checkpoints_pass_the_block_checks_too(block_checkpoints: dict, arch: str) -> None:
    result = verify(block_checkpoints[arch])
    assert result.exit_code == 0, result.output
    path = block_checkpoints[arch]
    assert result.stdout.splitlines() == [*BLOCK, f"verified {path} (block diffusion, block size 4)"]


def test_causal_clean_block_checkpoint_passes(block_checkpoints: dict, tmp_path: Path) -> None:
    def causal_clean(config: dict) -> None:
        config["diffusion"]["clean_attention"] = "causal"

    path = edited(block_checkpoints["qwen2"], tmp_path / "causal-clean", causal_clean)
    result = verify(path)
    assert result.exit_code == 0, result.output
    described = "block diffusion, block size 4, causal clean attention"
    assert result.stdout.splitlines() == [*BLOCK, f"verified {path} ({described})"]


def test_a_causal_block_checkpoint_fails_bidirectional_attention(
    block_checkpoints: dict, tmp_path: Path
) -> None:
    def causal(config: dict) -> None:
        config["is_causal"] = True

    result = verify(edited(block_checkpoints["llama"], tmp_path / "causal", causal))
    assert result.exit_code == 1
    assert result.stdout.splitlines() == ["ok  settings"]
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: check 'bidirectional attention' failed")
    assert "is_causal to true" in result.stderr


def test_a_mask_token_outside_the_embeddings_fails_the_settings_check(
    converted: dict, tmp_path: Path
) -> None:
    def out_of_range(config: dict) -> None:
        config["mask_token_id"] = config["diffusion"]["mask_token_id"] = 10_000

    result = verify(edited(converted["llama"], tmp_path / "bad-mask", out_of_range))
    assert result.exit_code == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "mask_token_id 10000 is outside the vocabulary" in result.stderr  # refused when read


def test_a_source_model_or_missing_directory_gets_a_clear_error(llama_src: Path, tmp_path: Path) -> None:
    result = verify(llama_src)
    assert result.exit_code == 1 and "is not a diffusion checkpoint" in result.stderr
    result = verify(tmp_path / "nowhere")
    assert result.exit_code == 1 and result.stderr.startswith("error: no such checkpoint directory")


SPECIAL = {"EOS": 2, "PAD": 2, "BOS": 1}


@pytest.mark.parametrize(
    ("mask_id", "block_size", "config_mask_id", "error"),
    [
        (5, None, 5, None),
        (5, 4, None, None),
        (5, 1, 5, None),
        (99, 4, 99, None),  # the last row of 100
        (100, None, 100, "outside the embedding matrix"),
        (-1, None, -1, "outside the embedding matrix"),
        (2, None, 2, "also the EOS and PAD token"),
        (1, None, 1, "also the BOS token"),
        (5, None, 6, "differs from the diffusion settings' 5"),
        (5, 0, 5, "block_size must be null or an integer >= 1, not 0"),
        (5, True, 5, "not True"),
        (5, 4.0, 5, "not 4.0"),
        (5, 64, 5, "not smaller than the model's context of 64"),
    ],
)
def test_settings_check(
    mask_id: int, block_size: object, config_mask_id: int | None, error: str | None
) -> None:
    settings = DiffusionSettings(mask_token_id=mask_id, block_size=block_size)  # type: ignore[arg-type]
    if error is None:
        check_settings(settings, 100, SPECIAL, 64, config_mask_id)
        return
    with pytest.raises(AdaptError, match=f"^check 'settings' failed: .*{error}"):
        check_settings(settings, 100, SPECIAL, 64, config_mask_id)


# ---------------------------------------------------------------- the block checks catch broken masks


class MaskSwap(torch.nn.Module):
    """The model with its attention mask replaced, as a kernel or a mask bug would do it."""

    def __init__(self, model: torch.nn.Module, swap: Callable[..., torch.Tensor | None]) -> None:
        super().__init__()
        self.inner, self.swap, self.config = model, swap, model.config

    def forward(  # the stock signature, so that BlockDenoiser finds `cache` and `logits_to_keep`
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=None,
        logits_to_keep=0,
    ):  # noqa: ANN001, ANN202
        return self.inner(
            input_ids=input_ids,
            attention_mask=self.swap(attention_mask, input_ids, position_ids, cache),
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )


def full_attention(mask, ids, positions, cache):  # noqa: ANN001, ANN201, ARG001
    return None  # the model's own (bidirectional) attention: later blocks leak into earlier ones


def causal(mask, ids, positions, cache):  # noqa: ANN001, ANN201, ARG001
    return causal_mask_4d(torch.ones_like(ids), mask.dtype)  # no bidirectional attention inside a block


def block_diagonal(mask, ids, positions, cache):  # noqa: ANN001, ANN201, ARG001
    blocks = positions // 4
    return to_additive((blocks[:, None, :] == blocks[:, :, None])[:, None], mask.dtype)  # blind to the past


def no_mask_with_cache(mask, ids, positions, cache):  # noqa: ANN001, ANN201, ARG001
    return None if cache is not None else mask  # cached steps let committed blocks see the new block


@pytest.fixture(scope="module")
def block_llama(block_checkpoints: dict) -> tuple:
    model, tokenizer, settings = load_diffusion_model(block_checkpoints["llama"], device="cpu")
    probe = make_probe(ordinary_token_ids(model, tokenizer), length=12)
    return model, tokenizer, settings, probe


def test_block_checks_pass_on_the_model_itself(block_llama: tuple) -> None:
    model, tokenizer, settings, probe = block_llama
    check_block_causality(MaskSwap(model, lambda mask, *_: mask), probe, 4)
    check_exact_cache(MaskSwap(model, lambda mask, *_: mask), tokenizer, settings, probe)


@pytest.mark.parametrize(
    ("swap", "error"),
    [
        (full_attention, "changing block 1 changed the logits of earlier blocks"),
        (causal, "attention inside a block is not bidirectional"),
        (block_diagonal, "block 1 does not see block 0"),
    ],
)
def test_block_causality_catches_a_wrong_mask(block_llama: tuple, swap: Callable, error: str) -> None:
    model, _, _, probe = block_llama
    with pytest.raises(AdaptError, match=f"^check 'block causality' failed: .*{error}"):
        check_block_causality(MaskSwap(model, swap), probe, 4)


@pytest.mark.parametrize("clean", ["block", "causal"])
def test_exact_cache_catches_cached_steps_that_see_too_much(block_llama: tuple, clean: str) -> None:
    model, tokenizer, settings, probe = block_llama
    settings = dataclasses.replace(settings, clean_attention=clean)
    check_exact_cache(MaskSwap(model, lambda mask, *_: mask), tokenizer, settings, probe)
    check_block_causality(MaskSwap(model, no_mask_with_cache), probe, 4)  # uncached passes are right
    where = "block 1, step 1" if clean == "block" else r"block \d, step 1"  # causal: the prompt's first pass
    with pytest.raises(AdaptError, match=f"^check 'exact KV cache' failed: at {where}"):
        check_exact_cache(MaskSwap(model, no_mask_with_cache), tokenizer, settings, probe)
