"""Block-by-block decoding of block-diffusion checkpoints: the exact KV cache, batches, EOS, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adapt.core.errors import AdaptError
from adapt.loading.model import load_diffusion_model
from adapt.sampling import SamplingConfig, generate
from adapt.sampling.cache import BlockDenoiser
from adapt.sampling.canvas import build_canvas

ARCHS = ("llama", "qwen2", "gemma", "gpt2")
PROMPTS = ["The river ran", "A traveller came to the mill one evening and asked", "def add(a, b):"]


def recorded_as_block(converted: dict, root: Path, clean: str) -> dict[str, Path]:
    out = {}
    for arch in ARCHS:
        path = root / arch
        shutil.copytree(converted[arch], path)
        config = json.loads((path / "config.json").read_text())
        config["diffusion"]["block_size"] = 4
        config["diffusion"]["clean_attention"] = clean
        (path / "config.json").write_text(json.dumps(config))
        out[arch] = path
    return out


@pytest.fixture(scope="module")
def block_checkpoints(converted: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Converted tiny checkpoints recorded as block-diffusion checkpoints of block size 4."""
    return recorded_as_block(converted, tmp_path_factory.mktemp("block"), "block")


@pytest.fixture(scope="module")
def causal_checkpoints(converted: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same, recorded with causal clean attention (committed tokens attend causally)."""
    return recorded_as_block(converted, tmp_path_factory.mktemp("causal"), "causal")


@pytest.fixture(params=["block", "causal"])
def checkpoints(request: pytest.FixtureRequest) -> dict[str, Path]:
    """Block checkpoints of either clean attention."""
    return request.getfixturevalue(f"{request.param}_checkpoints")


pytestmark = pytest.mark.usefixtures("one_thread")


def run(path: Path, prompts: list[str], **kw) -> object:  # noqa: ANN003
    model, tokenizer, settings = load_diffusion_model(path, device="cpu")
    kw.setdefault("stop_at_eos", False)
    return generate(model, tokenizer, prompts, SamplingConfig(**kw), settings)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy", ["low_confidence", "threshold", "entropy_bounded"])
def test_exact_cache_gives_the_tokens_of_uncached_decoding(checkpoints, arch: str, strategy: str) -> None:  # noqa: ANN001
    # gen lengths 10 and prompts of 4-11 tokens: no row's region starts or ends on a block boundary
    settings = {"gen_length": 10, "strategy": strategy, "threshold": 0.02, "entropy_bound": 0.5}
    plain = run(checkpoints[arch], PROMPTS, cache="none", **settings)
    cached = run(checkpoints[arch], PROMPTS, cache="prefix", **settings)
    assert plain.sequences == cached.sequences
    assert all(len(s) == 10 for s in cached.sequences)
    assert cached.nfe == plain.nfe and cached.tokens == 30


def test_auto_cache_is_the_exact_cache_and_a_batch_equals_each_prompt_alone(checkpoints) -> None:  # noqa: ANN001
    batch = run(checkpoints["llama"], PROMPTS, gen_length=9)
    for prompt, seq in zip(PROMPTS, batch.sequences, strict=True):
        assert run(checkpoints["llama"], [prompt], gen_length=9).sequences == [seq]
    assert run(checkpoints["llama"], PROMPTS, gen_length=9, cache="prefix").sequences == batch.sequences


@pytest.mark.parametrize("clean", ["block", "causal"])
def test_cached_logits_equal_block_causal_recomputation_at_every_step(block_checkpoints, clean: str) -> None:  # noqa: ANN001
    model, tokenizer, settings = load_diffusion_model(block_checkpoints["qwen2"], device="cpu")
    canvas = build_canvas(PROMPTS[:2], tokenizer, settings, 12, False, None, torch.device("cpu"), "right")
    ids = canvas.ids.clone()
    mask_id = settings.mask_token_id
    cached = BlockDenoiser(model, 4, cached=True, clean=clean, mask_id=mask_id)
    plain = BlockDenoiser(model, 4, cached=False, clean=clean, mask_id=mask_id)
    gen = torch.Generator().manual_seed(0)
    end = int(canvas.end.max())
    with torch.no_grad():
        for lo in range(int(canvas.start.min()) // 4 * 4, end, 4):
            hi = min(lo + 4, end)
            for d in (cached, plain):
                d.start_block(lo, hi)
            keep = torch.arange(max(lo - 1, 0), hi)  # with the previous block's last column (shift)
            for _ in range(3):  # a few steps, unmasking some positions between them
                a = cached.logits(ids, canvas.attention_mask, canvas.position_ids, keep)
                b = plain.logits(ids, canvas.attention_mask, canvas.position_ids, keep)
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
                fill = (torch.rand(ids[:, lo:hi].shape, generator=gen) < 0.4) & (
                    ids[:, lo:hi] == settings.mask_token_id
                )
                ids[:, lo:hi] = torch.where(fill, a[:, -(hi - lo) :].argmax(-1), ids[:, lo:hi])
    last = (end - 1) // 4 * 4
    assert cached.committed == last if clean == "block" else cached.committed >= last
    assert cached.fed < plain.fed


@pytest.mark.parametrize("clean", ["block", "causal"])
def test_tokens_fed_per_step_one_token_at_a_time_left_to_right(block_checkpoints, clean: str) -> None:  # noqa: ANN001
    # block: a block's first step feeds the previous block again, clean (2B = 8), later steps the block
    # (4); causal: every step feeds the block plus the one column committed by the step before (5)
    model, tokenizer, settings = load_diffusion_model(block_checkpoints["llama"], device="cpu")
    canvas = build_canvas(
        [[1, 2, 3, 4, 5, 6, 7, 8]], tokenizer, settings, 12, False, None, torch.device("cpu")
    )
    ids = canvas.ids.clone()
    denoiser = BlockDenoiser(model, 4, cached=True, clean=clean, mask_id=settings.mask_token_id)
    fed = []
    with torch.no_grad():
        for lo in (8, 12, 16):
            denoiser.start_block(lo, lo + 4)
            for c in range(lo, lo + 4):
                before = denoiser.fed
                logits = denoiser.logits(
                    ids, canvas.attention_mask, canvas.position_ids, torch.tensor([c - 1])
                )
                fed.append(denoiser.fed - before)
                ids[0, c] = logits[0, 0].argmax()
    expected = {"block": [12, 4, 4, 4] + [8, 4, 4, 4] * 2, "causal": [12] + [5] * 11}
    assert fed == expected[clean]


def test_generation_stops_after_the_block_that_holds_eos(block_checkpoints) -> None:  # noqa: ANN001
    out = run(
        block_checkpoints["llama"], ["The river ran"], gen_length=16, eos_penalty=-100.0, stop_at_eos=True
    )
    assert out.sequences == [[]]  # cut at the EOS that fills the first block
    prompt_tokens = 4  # <|bos|> + 3 tokens: the first block (columns 4-7) is the first to decode
    assert out.nfe == 4 and out.tokens == 4 and prompt_tokens % 4 == 0
    longer = run(block_checkpoints["llama"], ["The river ran"], gen_length=16, stop_at_eos=True)
    assert longer.nfe > out.nfe


def test_bad_sampling_settings_for_a_block_checkpoint_are_refused(block_checkpoints) -> None:  # noqa: ANN001
    path = block_checkpoints["llama"]
    with pytest.raises(AdaptError, match="--cache dual is for full-attention checkpoints"):
        run(path, ["a"], gen_length=8, cache="dual")
    with pytest.raises(AdaptError, match="must be a multiple of the checkpoint's block size 4"):
        run(path, ["a"], gen_length=12, block_length=6)
    with pytest.raises(AdaptError, match="infilling needs a full-attention checkpoint"):
        run(path, ["a <|mask|>*3 b"], gen_length=8)
    assert len(run(path, ["a"], gen_length=16, block_length=8).sequences[0]) == 16  # a multiple is fine


def test_sample_command_on_a_block_checkpoint(block_checkpoints) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from adapt.cli import app

    runner = CliRunner()
    args = ["sample", str(block_checkpoints["gpt2"]), "--prompt", "The river", "--gen-length", "6", "--json"]
    result = runner.invoke(app, [*args, "--no-stop-at-eos"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert len(record["sequences"][0]) == 6 and record["nfe"] >= 2
    result = runner.invoke(app, [*args, "--cache", "dual"])
    assert result.exit_code == 1 and result.output.startswith("error: --cache dual")
    assert len(result.output.strip().splitlines()) == 1
