"""The quickstart path (convert -> fine-tune -> evaluate -> sample) on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from adapt.cli import app
from adapt.core.checkpoint import load_settings
from adapt.loading.model import load_diffusion_model
from adapt.quickstart import PROMPTS
from adapt.sampling import SamplingConfig, generate

NOISE = ("Removed shared tensor", "[RANK 0]", "Setting accelerator to CPU")
"""Library lines the quickstart once printed (Accelerate's tied-weights notice at each checkpoint;
DeepSpeed's no-GPU notice on stdout, once per process, when it is installed)."""


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
    samples = {s["strategy"]: s for s in saved["samples"]}
    assert list(samples) == ["AR source, greedy generate", "adapted, verify", "adapted, threshold 0.9"]
    for s in saved["samples"]:
        assert len(s["texts"]) == 3 and all(t.startswith(("The", "In")) for t in s["texts"])
        assert s["nfe"] >= 1 and s["tokens_per_second"] > 0 and math.isfinite(s["judge_perplexity"])
    # the default job trains the joint objective: verify prints the adapted model's own AR greedy output
    settings = load_settings(exported)
    assert (settings.block_size, settings.clean_attention, settings.ar_loss_weight) == (4, "causal", 1.0)
    verify = samples["adapted, verify"]
    assert len(verify["acceptance"]) == 1 and verify["nfe"] < verify["tokens"] + 3  # default: one draft
    ours, tokenizer, _ = load_diffusion_model(exported)
    for text, prompt in zip(verify["texts"], PROMPTS, strict=True):
        ar = generate(ours, tokenizer, [prompt], SamplingConfig(gen_length=32, strategy="ar"))
        assert text == prompt + ar.texts[0]
    assert "fine-tuned diffusion" in result.output and "judge perplexity" in result.output
    assert "samples, AR source, greedy generate:" in result.output and "drafts accepted" in result.output


LOAD = (
    "from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained({path!r}).save_pretrained({out!r}); "
    "import sys; print('deepspeed imported:', 'deepspeed' in sys.modules)"
)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
def test_a_fresh_process_prints_no_deepspeed_notice(llama_diffusion: Path, tmp_path: Path) -> None:
    """Saving a model imports DeepSpeed (when installed), which prints its no-GPU notice to stdout once
    per process: stock transformers shows it, a process using adapt does not (seen only in a new process:
    under pytest an earlier test may have imported DeepSpeed already)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = LOAD.format(path=str(llama_diffusion), out=str(tmp_path / "saved"))
    for prefix, shown in (("", True), ("import adapt; ", False)):
        proc = subprocess.run(
            [sys.executable, "-c", prefix + code], capture_output=True, text=True, env=env, timeout=120
        )
        assert "deepspeed imported: True" in proc.stdout, proc.stdout + proc.stderr
        assert ("Setting accelerator to CPU" in proc.stdout + proc.stderr) is shown, (prefix, proc.stdout)
