"""Sampling: strategies, schedules, batching, infilling, KV cache, reference parity, CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapt.cli import app
from adapt.core.errors import AdaptError
from adapt.loading.model import load_diffusion_model
from adapt.sampling import SamplingConfig, generate
from adapt.sampling.cache import Denoiser
from adapt.sampling.display import PlainStream
from adapt.sampling.strategies import (
    filter_logits,
    schedule,
    select_entropy_bounded,
    select_threshold,
    select_top,
)

sys.path.insert(0, str(Path(__file__).parent))
from reference_sampler import reference_generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The river ran slowly", "def add(a, b):\n    return", "Question: what"]
SCHEDULED = ("low_confidence", "random", "margin", "entropy")


@pytest.fixture(scope="module")
def llama(llama_diffusion: Path):
    return load_diffusion_model(llama_diffusion)


@pytest.fixture(scope="module")
def gpt2(converted: dict[str, Path]):
    return load_diffusion_model(converted["gpt2"])


def cfg(**kw) -> SamplingConfig:
    base = dict(gen_length=16, steps=8, block_length=8, stop_at_eos=False)
    return SamplingConfig(**{**base, **kw})


# ---- pure selection rules, hand-checked --------------------------------------------------------


def test_schedule_spreads_remainder_first() -> None:
    assert schedule(torch.tensor([7, 4, 0]), 3).tolist() == [[3, 2, 2], [2, 1, 1], [0, 0, 0]]


def test_select_top_takes_exactly_k_among_candidates() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.3, 0.4, 0.1]])
    cand = torch.tensor([[False, True, True, True], [True, True, True, True]])
    out = select_top(scores, cand, torch.tensor([2, 1]))
    assert out.tolist() == [[False, False, True, True], [False, False, True, False]]


def test_threshold_takes_all_above_and_at_least_one() -> None:
    conf = torch.tensor([[0.95, 0.2, 0.91], [0.3, 0.5, 0.1]])
    cand = torch.ones(2, 3, dtype=torch.bool)
    assert select_threshold(conf, cand, 0.9).tolist() == [[True, False, True], [False, True, False]]


def test_entropy_bounded_rule() -> None:
    ent = torch.tensor([[0.1, 0.5, 0.2, 3.0]])
    cand = torch.ones(1, 4, dtype=torch.bool)
    # sorted 0.1, 0.2, 0.5, 3.0: sums minus max = 0, 0.1, 0.3, 0.8 -> bound 0.35 keeps three
    assert select_entropy_bounded(ent, cand, 0.35).tolist() == [[True, True, True, False]]
    assert select_entropy_bounded(ent, cand, 0.0).tolist() == [[True, False, False, False]]


def test_top_k_top_p_filtering() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    kept = filter_logits(logits, top_k=2, top_p=1.0).isfinite()
    assert kept.tolist() == [[[True, True, False, False]]]
    kept = filter_logits(logits, top_k=0, top_p=0.7).isfinite()  # 0.5 < 0.7 -> also 0.3
    assert kept.tolist() == [[[True, True, False, False]]]


# ---- the engine on tiny converted models -------------------------------------------------------


def mask_counts(model, tok, config: SamplingConfig, prompts: list[str]) -> list[list[int]]:
    """Masks left in each row's canvas after every step."""
    seen: list[list[int]] = []

    def on_step(ev) -> None:
        seen.append((ev.ids == ev.mask_id).sum(-1).tolist())

    generate(model, tok, prompts, config, on_step=on_step)
    return seen


@pytest.mark.parametrize("strategy", SCHEDULED)
def test_scheduled_strategies_unmask_exactly_the_schedule(llama, strategy: str) -> None:
    model, tok, _ = llama
    counts = mask_counts(model, tok, cfg(gen_length=12, steps=8, block_length=6, strategy=strategy), PROMPTS)
    # 6 masks in 4 steps per block: 2, 2, 1, 1
    left = [[c[r] for c in counts] for r in range(len(PROMPTS))]
    assert all(row == [10, 8, 7, 6, 4, 2, 1, 0] for row in left)


@pytest.mark.parametrize("strategy", ["threshold", "entropy_bounded"])
def test_adaptive_strategies_finish_every_block(llama, strategy: str) -> None:
    model, tok, _ = llama
    config = cfg(strategy=strategy, threshold=0.5, entropy_bound=0.5)
    counts = mask_counts(model, tok, config, PROMPTS)
    assert counts[-1] == [0, 0, 0]
    totals = [48] + [sum(c) for c in counts]
    assert all(a > b for a, b in zip(totals, totals[1:], strict=False))  # progress at every step
    out = generate(model, tok, PROMPTS, config)
    mask_id = model.config.mask_token_id
    assert all(len(s) == 16 and mask_id not in s for s in out.sequences)


def test_threshold_zero_decodes_a_block_per_step(llama) -> None:
    model, tok, _ = llama
    out = generate(model, tok, PROMPTS, cfg(strategy="threshold", threshold=0.0))
    assert out.nfe == 2 and out.tokens == 16 * len(PROMPTS)


def test_greedy_is_deterministic_and_sampling_follows_the_seed(llama) -> None:
    model, tok, _ = llama
    assert generate(model, tok, PROMPTS, cfg()).sequences == generate(model, tok, PROMPTS, cfg()).sequences
    hot = dict(temperature=1.0, top_p=0.9)
    a = generate(model, tok, PROMPTS, cfg(seed=1, **hot)).sequences
    assert a == generate(model, tok, PROMPTS, cfg(seed=1, **hot)).sequences
    assert a != generate(model, tok, PROMPTS, cfg(seed=2, **hot)).sequences


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("strategy", ["low_confidence", "threshold"])
def test_batch_with_left_padding_equals_each_prompt_alone(
    llama, gpt2, arch: str, strategy: str, cache: str
) -> None:
    model, tok, _ = llama if arch == "llama" else gpt2
    config = cfg(strategy=strategy, threshold=0.02, cache=cache)
    batch = generate(model, tok, PROMPTS, config).sequences
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) > 1  # the batch really is padded
    assert batch == [generate(model, tok, [p], config).sequences[0] for p in PROMPTS]


@pytest.mark.parametrize("blocks", [(16, 16, 16), (16, 8, 4), (12, 6, 6)])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engine_matches_plain_reference_loop(llama, gpt2, arch: str, blocks) -> None:
    model, tok, settings = llama if arch == "llama" else gpt2
    gen_length, steps, block = blocks
    config = cfg(gen_length=gen_length, steps=steps, block_length=block)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    engine = generate(model, tok, ids, config).sequences
    mask_id = settings.mask_token_id
    ref = [reference_generate(model, p, mask_id, True, gen_length, steps, block, len(tok)) for p in ids]
    assert engine == ref


def test_shift_is_read_from_the_checkpoint(llama) -> None:
    model, tok, settings = llama
    ids = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    unshifted = dataclasses.replace(settings, shift=False)
    out = generate(model, tok, ids, cfg(), settings=unshifted).sequences
    ref = [reference_generate(model, p, settings.mask_token_id, False, 16, 8, 8, len(tok)) for p in ids]
    assert out == ref
    assert out != generate(model, tok, ids, cfg()).sequences


def test_shift_never_masks_the_first_token(llama) -> None:
    model, tok, _ = llama
    out = generate(model, tok, [[]], cfg())  # no prompt: BOS is put first
    assert out.prompts[0][0] == tok.bos_token_id
    out = generate(model, tok, ["<|mask|>*4 river"], cfg(block_length=None, steps=None))
    assert out.prompts[0][0] == tok.bos_token_id and out.sequences[0][0] == tok.bos_token_id


def test_infill_keeps_the_given_text_and_fills_every_mask(llama) -> None:
    model, tok, settings = llama
    templates = ["def f(x):<|mask|>*6 return y", "The <|mask|>*3 ran past the <|mask|>*2 mill"]
    out = generate(model, tok, templates, cfg(block_length=None, steps=None))
    for template, seq in zip(templates, out.sequences, strict=True):
        pieces = template.replace("<|mask|>*6", "\0").replace("<|mask|>*3", "\0").replace("<|mask|>*2", "\0")
        given = [tok(p, add_special_tokens=False)["input_ids"] for p in pieces.split("\0")]
        assert settings.mask_token_id not in seq
        assert seq[: len(given[0])] == given[0] and seq[len(seq) - len(given[-1]) :] == given[-1]
    assert (
        out.sequences[0]
        == generate(model, tok, templates[:1], cfg(block_length=None, steps=None)).sequences[0]
    )


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_batch_of_templates_and_prompts_equals_each_alone(llama, cache: str) -> None:
    model, tok, _ = llama
    inputs = ["def f(x):<|mask|>*6 return y", "The river", "The <|mask|>*3 ran past the <|mask|>*9 mill"]
    config = cfg(block_length=4, steps=None, cache=cache)
    batch = generate(model, tok, inputs, config)
    alone = [generate(model, tok, [x], config) for x in inputs]
    assert batch.sequences == [a.sequences[0] for a in alone]
    assert batch.nfe == sum(a.nfe for a in alone) and batch.tokens == sum(a.tokens for a in alone)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_first_cached_pass_equals_the_full_pass(llama, mode: str) -> None:
    model, tok, _ = llama
    torch.manual_seed(0)
    ids = torch.randint(5, 300, (2, 24))
    attention = torch.ones_like(ids)
    attention[0, :4] = 0
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    lo, hi = 10, 18
    denoiser = Denoiser(model, mode)
    denoiser.start_block(lo, hi if mode == "dual" else 24)
    keep = torch.tensor([10, 12, 13, 17])  # any sorted columns inside [lo, hi)
    with torch.no_grad():
        first = denoiser.logits(ids, attention, positions, keep)  # full pass, fills the cache
        cached = denoiser.logits(ids, attention, positions, keep)  # query only
        plain = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits[:, keep]
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    assert denoiser.cache.get_seq_length() == (lo if mode == "prefix" else lo + 24 - hi)


@pytest.mark.parametrize("strategy", ["low_confidence", "threshold"])
def test_prefix_cache_is_exact_when_the_prefix_cannot_see_the_future(llama_diffusion: Path, strategy) -> None:
    # With a causal mask the cached keys of finished blocks never go stale, so cache on == off exactly.
    model, tok, _ = load_diffusion_model(llama_diffusion)
    model.config.is_causal = True
    config = cfg(gen_length=16, steps=16, block_length=4, strategy=strategy, threshold=0.02)
    off = generate(model, tok, PROMPTS, config)
    on = generate(model, tok, PROMPTS, dataclasses.replace(config, cache="prefix"))
    assert on.sequences == off.sequences and on.nfe == off.nfe


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_refreshed_every_step_equals_no_cache(llama, mode: str) -> None:
    model, tok, _ = llama
    off = generate(model, tok, PROMPTS, cfg(block_length=4, steps=8))
    on = generate(model, tok, PROMPTS, cfg(block_length=4, steps=8, cache=mode, cache_refresh=1))
    assert on.sequences == off.sequences
    approx = generate(model, tok, PROMPTS, cfg(block_length=4, steps=8, cache=mode))
    assert all(len(s) == 16 for s in approx.sequences)


def test_stop_at_eos_stops_after_the_block_and_penalty_removes_eos(llama) -> None:
    model, tok, _ = llama
    eos = tok.eos_token_id
    flood = generate(model, tok, PROMPTS, cfg(stop_at_eos=True, eos_penalty=-100.0))
    assert flood.sequences == [[], [], []] and flood.nfe == 4  # one block of 4 steps, then stop
    clean = generate(model, tok, PROMPTS, cfg(stop_at_eos=True, eos_penalty=100.0))
    assert all(len(s) == 16 and eos not in s for s in clean.sequences)
    capped = generate(model, tok, PROMPTS, cfg(stop_at_eos=False, eos_penalty=-100.0, eos_confidence_cap=0.0))
    stops = {eos, tok.convert_tokens_to_ids("<|end|>")}  # the chat template's end of turn is one too
    assert all(sum(t in stops for t in s) == 16 for s in capped.sequences)


def test_stop_strings_cut_the_text(llama) -> None:
    model, tok, _ = llama
    full = generate(model, tok, PROMPTS[:1], cfg()).texts[0]
    stop = full[5:8]
    out = generate(model, tok, PROMPTS[:1], cfg(stop=(stop,)))
    assert out.texts[0] == full[: full.find(stop)]
    assert tok.decode(out.sequences[0], skip_special_tokens=True).startswith(out.texts[0])


def test_plain_stream_holds_back_a_possible_stop_string(llama) -> None:
    stream = PlainStream(llama[1], [], stops=("END", "##"))
    assert stream.safe_prefix("abc EN") == "abc "
    assert stream.safe_prefix("abc #") == "abc "
    assert stream.safe_prefix("abc END more ## x") == "abc "
    assert stream.safe_prefix("abc E x") == "abc E x"


def test_plain_stream_never_prints_past_a_stop_string(llama) -> None:
    model, tok, _ = llama
    full = generate(model, tok, PROMPTS[:1], cfg()).texts[0]
    stop = full[5:8]
    printed = io.StringIO()
    stream = PlainStream(tok, [], stops=(stop,), out=printed)
    out = generate(model, tok, PROMPTS[:1], cfg(stop=(stop,)), on_step=stream)
    streamed_before_finish = printed.getvalue()
    stream.finish(out.texts[0])
    assert stop not in streamed_before_finish
    assert printed.getvalue() == out.texts[0] + "\n"


def test_output_counters(llama) -> None:
    model, tok, _ = llama
    out = generate(model, tok, PROMPTS, cfg())
    assert out.nfe == out.steps == 8 and out.tokens == 48 and out.tokens_per_second > 0


@pytest.mark.parametrize(
    "kw",
    [
        dict(block_length=5),
        dict(steps=3),
        dict(steps=17),
        dict(strategy="greedy"),
        dict(cache="full"),
        dict(top_p=0.0),
        dict(temperature=-1.0),
        dict(threshold=1.5),
    ],
)
def test_invalid_parameters_are_clear_errors(kw) -> None:
    with pytest.raises(AdaptError):
        cfg(**kw)


def test_prompt_longer_than_context_and_plain_models_are_refused(llama, llama_src: Path) -> None:
    model, tok, _ = llama
    with pytest.raises(AdaptError, match="context"):
        generate(model, tok, ["river " * 300], cfg())
    result = CliRunner().invoke(app, ["sample", str(llama_src), "--prompt", "x"])
    assert result.exit_code == 1 and "adapt convert" in result.output


# ---- command line ----------------------------------------------------------------------------


def test_cli_json(llama_diffusion: Path) -> None:
    args = ["sample", str(llama_diffusion), "--prompt", "The river", "--prompt", "def", "--gen-length", "8"]
    result = CliRunner().invoke(app, [*args, "--strategy", "threshold", "--cache", "dual", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert len(record["texts"]) == 2 and record["nfe"] >= 1 and record["tokens_per_second"] > 0


def test_cli_chat_and_infill(llama_diffusion: Path) -> None:
    result = CliRunner().invoke(
        app, ["sample", str(llama_diffusion), "--prompt", "hi", "--chat", "--gen-length", "8", "--no-stream"]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["sample", str(llama_diffusion), "--infill", "a <|mask|>*4 b", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["texts"][0].startswith("a")


def test_sample_script_subprocess(llama_diffusion: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "sample.py"), str(llama_diffusion), "--prompt", "The river"]
    proc = subprocess.run(
        [*cmd, "--gen-length", "8", "--block-length", "4"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "NFE 8" in proc.stderr


def test_import_adapt_stays_light() -> None:
    code = "import sys, adapt; assert 'torch' not in sys.modules; print(adapt.SamplingConfig().gen_length)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "128"
