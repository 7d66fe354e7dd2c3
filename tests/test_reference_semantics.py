"""Sampler options pinned to the reference samplers on fixed tiny logit tensors, values worked out by hand.

- ranking at temperature > 0: LLaDA / Fast-dLLM read the confidence from the untempered softmax;
  Dream from the tempered, filtered distribution it samples from;
- temperature, then top-p, then top-k (Dream's `sample_tokens`), with Dream's nucleus boundary;
- Fast-dLLM's threshold: the most confident position always, the others when confidence >= threshold;
- Dream's step schedule: floor(left * (1 - s/t)) on linspace(1, 1e-3, steps + 1), the rest at the end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adapt.core.errors import AdaptError
from adapt.loading.model import load_diffusion_model
from adapt.sampling import SamplingConfig, generate
from adapt.sampling.engine import row_schedule
from adapt.sampling.strategies import (
    Threshold,
    dream_schedule,
    filter_logits,
    propose,
    sampling_logits,
    select_threshold,
)

MASK = 4  # the mask id of the toy vocabulary [0, 1, 2, 3, mask]


def toy_logits(rows: list[list[float]]) -> torch.Tensor:
    """Logits [1, w, 5] whose softmax over the first four tokens is each row (the mask column is ignored)."""
    probs = torch.tensor(rows, dtype=torch.float64)
    return torch.cat([probs.log(), torch.zeros(len(rows), 1, dtype=torch.float64)], -1)[None].float()


def cfg(**kw) -> SamplingConfig:
    return SamplingConfig(gen_length=8, **kw)


# ---- ranking probabilities at temperature > 0 ---------------------------------------------------

# position A: [0.5, 0.5, 0, 0] -> its token has probability 0.5 whatever is drawn, at any temperature
# position B: [0.7, 0.1, 0.1, 0.1] -> at T = 2 the weights are sqrt(p): 0.8367 / (0.8367 + 3 * 0.3162)
ROWS = [[0.5, 0.5, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]
UNTEMPERED = [[0.5, 0.5, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]
B = [math.sqrt(p) for p in ROWS[1]]
TEMPERED = [[0.5, 0.5, 0.0, 0.0], [b / sum(B) for b in B]]  # B: [0.4686, 0.1771, 0.1771, 0.1771]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(
    ("confidence", "strategy", "table"),
    [
        ("untempered", "low_confidence", UNTEMPERED),
        ("auto", "low_confidence", UNTEMPERED),  # LLaDA / Fast-dLLM by default
        ("auto", "threshold", UNTEMPERED),
        ("tempered", "low_confidence", TEMPERED),
        ("auto", "margin", TEMPERED),  # Dream's strategies rank by Dream's probabilities by default
    ],
)
def test_confidence_is_read_from_the_reference_distribution(seed: int, confidence, strategy, table) -> None:
    config = cfg(temperature=2.0, confidence=confidence, strategy=strategy)
    gen = torch.Generator().manual_seed(seed)
    p = propose(toy_logits(ROWS), config, MASK, [], gen)
    tokens = p.tokens[0].tolist()
    expected = [table[j][t] for j, t in enumerate(tokens)]
    assert p.confidence[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert tokens[0] in (0, 1)  # never a token of probability 0, never the mask


def test_untempered_and_tempered_rank_positions_differently() -> None:
    # B drawn as its top token: untempered 0.7 > A's 0.5 (B first); tempered 0.4686 < 0.5 (A first)
    for seed in range(64):
        gen = torch.Generator().manual_seed(seed)
        llada = propose(toy_logits(ROWS), cfg(temperature=2.0), MASK, [], gen)
        if llada.tokens[0, 1] == 0:
            break
    else:
        pytest.fail("no seed drew B's top token")
    gen = torch.Generator().manual_seed(seed)
    dream = propose(toy_logits(ROWS), cfg(temperature=2.0, confidence="tempered"), MASK, [], gen)
    assert dream.tokens.tolist() == llada.tokens.tolist()  # the same draw, only the ranking differs
    assert llada.confidence[0].argmax() == 1 and dream.confidence[0].argmax() == 0


def test_untempered_confidence_is_float64_like_llada() -> None:
    p = propose(toy_logits(ROWS), cfg(), MASK, [], None)
    assert p.confidence.dtype == torch.float64 and p.tokens.tolist() == [[0, 0]]


def test_at_temperature_zero_both_rankings_are_the_same() -> None:
    for kw in ({}, {"top_k": 2}, {"top_p": 0.6}):
        a = propose(toy_logits(ROWS), cfg(confidence="untempered", **kw), MASK, [], None)
        b = propose(toy_logits(ROWS), cfg(confidence="tempered", **kw), MASK, [], None)
        assert a.tokens.tolist() == b.tokens.tolist()
        assert a.confidence[0].tolist() == pytest.approx(b.confidence[0].tolist(), abs=1e-6)


# ---- temperature, then top-p, then top-k ----------------------------------------------------------


def test_temperature_is_applied_before_top_p() -> None:
    # logits 2 * log([0.5, 0.3, 0.2]) at T = 2 are log([0.5, 0.3, 0.2]): mass above token 1 is 0.5 <= 0.6,
    # above token 2 is 0.8 > 0.6 -> keep {0, 1}. Top-p first would see [0.658, 0.237, 0.105] and keep {0}.
    logits = 2 * torch.tensor([[[0.5, 0.3, 0.2]]]).log()
    kept = sampling_logits(logits, SamplingConfig(temperature=2.0, top_p=0.6)).isfinite()
    assert kept.tolist() == [[[True, True, False]]]
    assert filter_logits(logits, 0, 0.6).isfinite().tolist() == [[[True, False, False]]]


def test_top_p_is_applied_before_top_k() -> None:
    # [0.4, 0.3, 0.2, 0.1], top-p 0.5 keeps {0, 1} (0.4 above token 1), top-k 2 keeps both.
    # Top-k first would renormalise to [4/7, 3/7] and top-p would then drop token 1 (4/7 > 0.5).
    logits = torch.tensor([[[0.4, 0.3, 0.2, 0.1]]]).log()
    assert filter_logits(logits, top_k=2, top_p=0.5).isfinite().tolist() == [[[True, True, False, False]]]


def test_top_p_boundary_is_dreams() -> None:
    # two equal logits: token 1 has exactly 0.5 above it; Dream removes a token only when that mass is > top_p
    logits = torch.tensor([[[0.0, 0.0, -30.0]]])
    assert filter_logits(logits, 0, 0.5).isfinite().tolist() == [[[True, True, False]]]
    assert filter_logits(logits, 0, 0.49).isfinite().tolist() == [[[True, False, False]]]


def test_sampling_never_draws_a_filtered_token() -> None:
    logits = torch.tensor([[[2.0, 1.9, 1.8, -1.0, 0.0]] * 6])  # [1, 6, 5]; mask column 4
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = propose(logits, cfg(temperature=5.0, top_k=2), MASK, [], gen)
        assert set(p.tokens.flatten().tolist()) <= {0, 1}


# ---- Fast-dLLM's threshold at the boundary --------------------------------------------------------


def test_threshold_keeps_confidence_equal_to_tau() -> None:
    cand = torch.ones(1, 3, dtype=torch.bool)
    conf = torch.tensor([[0.25, 0.5, 0.5]], dtype=torch.float64)
    assert select_threshold(conf, cand, 0.5).tolist() == [[False, True, True]]
    assert select_threshold(conf, cand, 0.5000001).tolist() == [[False, True, False]]  # at least one


def test_threshold_boundary_end_to_end() -> None:
    # each position: two tokens of equal logit, so the chosen one has probability exactly 0.5
    logits = toy_logits([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.4, 0.3, 0.2, 0.1]])
    p = propose(logits, cfg(strategy="threshold"), MASK, [], None)
    assert p.confidence[0].tolist()[:2] == [0.5, 0.5]
    cand = torch.ones(1, 3, dtype=torch.bool)
    chosen = Threshold(0.5).select(p, cand, torch.zeros(1, dtype=torch.long), None)
    assert chosen.tolist() == [[True, True, False]]


# ---- Dream's step schedule ------------------------------------------------------------------------


def test_dream_schedule_by_hand() -> None:
    # t = [1, 0.75025, 0.5005, 0.25075, 0.001]; 1 - s/t = 0.24975, 0.33289, 0.49900, then the rest
    # 8 masks: floor(8 * 0.24975) = 1, floor(7 * 0.33289) = 2, floor(5 * 0.499) = 2, then 3
    # 5 masks: 1 (1.249), 1 (1.332), 1 (1.497), then 2;  2 masks: 0, 0, 0, then 2
    table = dream_schedule(torch.tensor([8, 5, 2, 0]), 4)
    assert table.tolist() == [[1, 2, 2, 3], [1, 1, 1, 2], [0, 0, 0, 2], [0, 0, 0, 0]]
    # steps that unmask nothing are not run (the model is not conditioned on time)
    assert row_schedule(torch.tensor([8, 2]), 4, "dream").tolist() == [[1, 2, 2, 3], [2, 0, 0, 0]]
    assert row_schedule(torch.tensor([8, 2]), 4).tolist() == [[2, 2, 2, 2], [1, 1, 0, 0]]  # uniform


@pytest.fixture(scope="module")
def llama(llama_diffusion: Path):
    return load_diffusion_model(llama_diffusion)


def test_engine_follows_the_dream_schedule(llama) -> None:
    model, tok, _ = llama
    left: list[list[int]] = []
    config = SamplingConfig(gen_length=16, steps=8, block_length=8, step_schedule="dream", stop_at_eos=False)
    out = generate(model, tok, ["The river", "def add(a, b):"], config, on_step=lambda ev: left.append(
        (ev.ids == ev.mask_id).sum(-1).tolist()
    ))  # fmt: skip
    # 8 masks per block in 4 steps: 1, 2, 2, 3 -> 15, 13, 11, 8, then the second block 7, 5, 3, 0
    assert [row[0] for row in left] == [15, 13, 11, 8, 7, 5, 3, 0]
    assert all(row[0] == row[1] for row in left) and out.nfe == 8


def test_unknown_option_values_are_refused() -> None:
    with pytest.raises(AdaptError, match="unknown step schedule"):
        SamplingConfig(step_schedule="cosine")  # type: ignore[arg-type]
    with pytest.raises(AdaptError, match="unknown confidence"):
        SamplingConfig(confidence="raw")  # type: ignore[arg-type]


def test_sample_command_takes_the_options(llama_diffusion: Path) -> None:
    from typer.testing import CliRunner

    from adapt.cli import app

    args = ["sample", str(llama_diffusion), "--prompt", "The river", "--gen-length", "8", "--steps", "4"]
    opts = ["--step-schedule", "dream", "--confidence", "tempered", "--temperature", "0.7", "--top-p", "0.9"]
    result = CliRunner().invoke(app, [*args, *opts, "--no-stop-at-eos", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["nfe"] == 4  # 8 masks in 4 Dream steps: 1, 2, 2, 3
    result = CliRunner().invoke(app, [*args, "--step-schedule", "cosine"])
    assert result.exit_code == 1 and result.output.startswith("error: unknown step schedule")
