"""Publishing: the files a push would upload, the model card, failures that leave the checkpoint intact."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from adapt.cli import app
from adapt.core.errors import AdaptError
from adapt.publishing.hub import plan_push, push

SECRET = "hf_DoNotLeakThisToken1234567890"


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def ckpt(llama_diffusion: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(llama_diffusion, out)
    return out


def set_source(ckpt: Path, source: str) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["diffusion"]["source_model"] = source
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_dry_run_lists_checkpoint_files_plus_card_and_writes_nothing(ckpt: Path) -> None:
    (ckpt / ".cache").mkdir()
    (ckpt / ".cache" / "junk").write_text("x")
    before = tree_digest(ckpt)
    files = push(ckpt, "someone/tiny-diffusion", dry_run=True)
    expected = sorted([f for f in before if not f.startswith(".")] + ["README.md"])
    assert files == expected
    assert "model.safetensors" in files and "config.json" in files
    assert tree_digest(ckpt) == before  # the card is not written into the checkpoint


def test_cli_dry_run_prints_card_and_exact_file_list(ckpt: Path) -> None:
    res = CliRunner().invoke(app, ["push", str(ckpt), "someone/tiny", "--dry-run"], env={"HF_TOKEN": SECRET})
    assert res.exit_code == 0, res.output
    listed = re.findall(r"^  (\S+) \(", res.output, flags=re.M)
    assert listed == push(ckpt, "someone/tiny", dry_run=True)
    assert "## Diffusion settings" in res.output
    assert SECRET not in res.output


def test_card_metadata_is_valid_and_carries_base_model_and_license(ckpt: Path, tmp_path: Path) -> None:
    set_source(ckpt, "org/base-model")  # a Hub id: becomes base_model
    card = ModelCard(plan_push(ckpt, "someone/tiny", license="apache-2.0").card)
    meta = card.data.to_dict()
    assert meta["base_model"] == "org/base-model"
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert {"diffusion", "masked-diffusion", "adapt", "text-generation"} <= set(meta["tags"])
    assert "[org/base-model](https://huggingface.co/org/base-model)" in card.text

    # a local source: no base_model (not a Hub id), license read from the source's own card
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text("---\nlicense: mit\n---\n# src\n")
    set_source(ckpt, str(src))
    meta = ModelCard(plan_push(ckpt, "someone/tiny").card).data.to_dict()
    assert meta["license"] == "mit"
    assert "base_model" not in meta


def test_card_reports_training_and_evaluation(ckpt: Path) -> None:
    summary = {"steps": 1234, "tokens_seen": 5_600_000, "train_loss": 2.5, "eval_loss": 2.75}
    summary |= {"base_model": "x", "lora": True, "adapt_version": "0.1.0"}
    (ckpt / "training_summary.json").write_text(json.dumps(summary))
    (ckpt / "recipe.yaml").write_text("optim:\n  lr: 0.0001\nmax_steps: 1234\n")
    results = {
        "dataset": "/data/wiki.txt",
        "seq_len": 64,
        "models": [
            {"model": "/x/ckpt", "kind": "diffusion", "nll": 3.0, "nll_stderr": 0.05, "ppl": 20.0855,
             "mc_samples": 8, "tokens": 640, "masked_accuracy": {"0.15": 0.41, "0.5": 0.3, "0.9": 0.125}},
            {"model": "/x/src", "kind": "ar", "nll": 2.5, "nll_stderr": 0.04, "ppl": 12.1825, "tokens": 640},
        ],
    }  # fmt: skip
    (ckpt / "eval_results.json").write_text(json.dumps(results))
    card = plan_push(ckpt, "someone/tiny").card
    assert "1234 steps, 5.6M tokens seen (LoRA, merged)" in card
    assert "```yaml\noptim:\n  lr: 0.0001\nmax_steps: 1234\n```" in card
    row = "| `ckpt` | diffusion (bound) | ≤ 20.09 | 3.0000 | 0.0500 | 8 | 640 | 0.410 | 0.300 | 0.125 |"
    assert row in card
    assert "| `src` | autoregressive | 12.18 | 2.5000 | 0.0400 | - | 640 | - | - | - |" in card
    assert "eval_results.json" in push(ckpt, "someone/tiny", dry_run=True)


def test_card_stock_transformers_snippet_runs(ckpt: Path) -> None:
    card = plan_push(ckpt, "someone/tiny").card
    code = re.findall(r"```python\n(.*?)```", card, flags=re.S)[0]
    code = code.replace('"someone/tiny"', repr(str(ckpt)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "card_snippet", "exec"), {})
    assert out.getvalue().strip() and "<|mask|>" not in out.getvalue()


def test_refuses_non_diffusion_checkpoint_and_bad_repo_id(llama_src: Path, ckpt: Path) -> None:
    with pytest.raises(AdaptError, match="not a diffusion checkpoint"):
        push(llama_src, "someone/tiny", dry_run=True)
    with pytest.raises(AdaptError, match="invalid repo id"):
        push(ckpt, "bad id with spaces", dry_run=True)
    with pytest.raises(AdaptError, match="NAMESPACE/NAME"):
        push(ckpt, "no-namespace", dry_run=True)


def test_offline_push_fails_cleanly_and_leaves_checkpoint_intact(ckpt: Path) -> None:
    before = tree_digest(ckpt)
    res = CliRunner().invoke(app, ["push", str(ckpt), "someone/tiny"], env={"HF_TOKEN": SECRET})
    assert res.exit_code == 1
    assert res.output.strip().startswith("error: could not push to someone/tiny")
    assert len(res.output.strip().splitlines()) == 1
    assert SECRET not in res.output
    assert tree_digest(ckpt) == before


def test_unreachable_endpoint_gives_one_line_error_without_token(ckpt: Path) -> None:
    before = tree_digest(ckpt)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": SECRET}
    cmd = [sys.executable, "-m", "adapt", "push", str(ckpt), "someone/tiny", "--private", "--revision", "dev"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "http://127.0.0.1:9" in err and err.startswith("error: ")
    assert SECRET not in res.stdout + res.stderr
    assert tree_digest(ckpt) == before
    assert not list(ckpt.parent.glob(".*"))  # no staging leftovers beside the checkpoint


@pytest.fixture
def block_ckpt(ckpt: Path) -> Path:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["diffusion"]["block_size"] = 4
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


BLOCK_ROW = (
    "| block size | 4 (block diffusion: autoregressive over blocks of 4 tokens, diffusion inside each block; "
    "exact KV cache) |"
)


def test_block_card_states_the_block_size_the_exact_cache_and_the_tag(block_ckpt: Path) -> None:
    card = plan_push(block_ckpt, "me/x").card
    meta = ModelCard(card, ignore_metadata_errors=False).data.to_dict()
    assert "block-diffusion" in meta["tags"] and meta["library_name"] == "transformers"
    assert BLOCK_ROW in card
    assert 'adapt sample me/x --prompt "The river" --cache prefix' in card
    assert "so the cache is exact" in card


def test_full_attention_card_has_no_block_line(ckpt: Path) -> None:
    card = plan_push(ckpt, "me/x").card
    assert "block-diffusion" not in ModelCard(card).data.to_dict()["tags"]
    assert "block" not in card.lower() and "--cache" not in card


@pytest.mark.parametrize("clean", ["block", "causal"])
def test_block_card_stock_snippet_decodes_block_by_block_like_adapt(block_ckpt: Path, clean: str) -> None:
    import adapt
    from adapt.loading.model import load_diffusion_model

    cfg = json.loads((block_ckpt / "config.json").read_text())
    cfg["diffusion"]["clean_attention"] = clean
    (block_ckpt / "config.json").write_text(json.dumps(cfg))
    card = plan_push(block_ckpt, "me/x").card
    assert ("| clean attention | causal" in card) == (clean == "causal")
    code = re.findall(r"```python\n(.*?)```", card, flags=re.S)[0]
    assert ("attention_mask=step_attn" if clean == "causal" else "attention_mask=attn") in code
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code.replace('"me/x"', repr(str(block_ckpt))), "card_snippet", "exec"), scope)
    x, n = scope["x"], scope["prompt"].shape[1]
    model, tok, settings = load_diffusion_model(block_ckpt, device="cpu")
    config = adapt.SamplingConfig(gen_length=16, steps=16, stop_at_eos=False, cache="prefix")
    assert x[0, n:].tolist() == adapt.generate(model, tok, ["The river"], config, settings).sequences[0]


def test_joint_card_states_the_ar_weight_and_its_verify_line_runs(block_ckpt: Path) -> None:
    from typer.testing import CliRunner

    from adapt.cli import app

    cfg = json.loads((block_ckpt / "config.json").read_text())
    cfg["diffusion"].update(clean_attention="causal", ar_loss_weight=1.0)
    (block_ckpt / "config.json").write_text(json.dumps(cfg))
    card = plan_push(block_ckpt, "me/x").card
    assert "| AR loss weight | 1 (joint objective" in card
    line = next(x for x in card.splitlines() if x.startswith("adapt sample me/x"))
    assert line == 'adapt sample me/x --prompt "The river" --strategy verify'
    args = line.split()[1:]
    args[1] = str(block_ckpt)
    result = CliRunner().invoke(
        app, [a.strip('"') for a in args[:3]] + ["The river", *args[5:], "--gen-length", "8"]
    )
    assert result.exit_code == 0, result.output


def test_the_import_older_cards_quote_still_loads_the_model(ckpt: Path) -> None:
    from adapt.checkpoint import load_diffusion_model as old_path
    from adapt.loading.model import load_diffusion_model

    assert old_path is load_diffusion_model
    model, _, settings = old_path(ckpt, device="cpu")
    assert settings.mask_token_id == model.config.mask_token_id
