"""The quickstart path (convert -> fine-tune -> evaluate -> sample) on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from adapt.checkpoint import load_settings
from adapt.cli import app

NOISE = ("Removed shared tensor", "[RANK 0]")
"""Library lines the quickstart once printed (Accelerate's tied-weights notice at each checkpoint)."""


def test_quickstart_tiny_end_to_end(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # 12 steps: one checkpoint (the recipe's checkpoint_every) of the tied embeddings, where Accelerate
    # would print its notice
    result = CliRunner().invoke(app, ["quickstart", "--tiny", "--steps", "12", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    # the command's output, what libraries wrote to the process's stdout/stderr, and what they logged
    # (under pytest, log records go to its handler instead of the terminal)
    printed = result.output + "".join(capfd.readouterr()) + caplog.text
    assert not [line for line in printed.splitlines() if any(n in line for n in NOISE)], printed
    assert any((tmp_path / "run" / "checkpoints").iterdir())  # the notice's occasion came
    saved = json.loads((tmp_path / "quickstart.json").read_text())
    exported = saved["exported"]
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert model.config.is_causal is False and load_settings(exported).shift is True
    assert model.config.tie_word_embeddings
    kinds = [row["kind"] for row in saved["eval_rows"]]
    assert kinds == ["ar", "diffusion", "diffusion"]
    assert all(math.isfinite(row["ppl"]) and row["ppl"] > 1 for row in saved["eval_rows"])
    assert {s["strategy"] for s in saved["samples"]} == {"low_confidence", "threshold"}
    for s in saved["samples"]:
        assert len(s["texts"]) == 3 and all(t.startswith(("The", "In")) for t in s["texts"])
        assert s["nfe"] >= 1 and math.isfinite(s["judge_perplexity"])
    assert "fine-tuned diffusion" in result.output and "judge perplexity" in result.output
