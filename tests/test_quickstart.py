"""The quickstart path (convert -> fine-tune -> evaluate -> sample) on a tiny model."""

from __future__ import annotations

import json
import math

from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from adapt.checkpoint import load_settings
from adapt.cli import app


def test_quickstart_tiny_end_to_end(tmp_path):
    result = CliRunner().invoke(app, ["quickstart", "--tiny", "--steps", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "quickstart.json").read_text())
    exported = saved["exported"]
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert model.config.is_causal is False and load_settings(exported).shift is True
    kinds = [row["kind"] for row in saved["eval_rows"]]
    assert kinds == ["ar", "diffusion", "diffusion"]
    assert all(math.isfinite(row["ppl"]) and row["ppl"] > 1 for row in saved["eval_rows"])
    assert {s["strategy"] for s in saved["samples"]} == {"low_confidence", "threshold"}
    for s in saved["samples"]:
        assert len(s["texts"]) == 3 and all(t.startswith(("The", "In")) for t in s["texts"])
        assert s["nfe"] >= 1 and math.isfinite(s["judge_perplexity"])
    assert "fine-tuned diffusion" in result.output and "judge perplexity" in result.output
