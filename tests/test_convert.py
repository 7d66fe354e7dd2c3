"""Conversion: every architecture reloads with stock transformers, bidirectional and correct."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CORE_ARCHS
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertForMaskedLM
from typer.testing import CliRunner

from adapt.cli import app
from adapt.conversion.convert import ConvertOptions, convert
from adapt.core.attention import causal_mask_4d, position_ids_from_mask
from adapt.core.checkpoint import load_settings
from adapt.core.errors import AdaptError

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _ids(tok, n: int = 10, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ordinary = [i for i in range(len(tok)) if i not in set(tok.all_special_ids)]
    return torch.tensor(ordinary)[torch.randint(len(ordinary), (1, n), generator=gen)]


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_reloads_bidirectional_with_stock_transformers(arch, converted, tiny_models):
    model, tok = _load(converted[arch]), AutoTokenizer.from_pretrained(converted[arch])
    assert model.config.is_causal is False
    ids = _ids(tok)
    changed = ids.clone()
    changed[0, -1] = ids[0, 0] if ids[0, 0] != ids[0, -1] else ids[0, 1]
    with torch.no_grad():
        diff = (model(ids).logits[0, 0] - model(changed).logits[0, 0]).abs().max()
    assert diff > 1e-6, "a future token must reach position 0"


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_causal_mask_restores_source_logits(arch, converted, tiny_models):
    src, model = _load(tiny_models[arch]), _load(converted[arch])
    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    ids = _ids(tok, n=12, seed=1)
    mask = causal_mask_4d(torch.ones_like(ids), torch.float32)
    with torch.no_grad():
        ref = src(ids).logits
        got = model(ids, attention_mask=mask, position_ids=torch.arange(12)[None]).logits
    vocab = ref.shape[-1]
    torch.testing.assert_close(
        got[..., : min(vocab, len(tok))], ref[..., : min(vocab, len(tok))], atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_padding_and_batch_invariance(arch, converted):
    model, tok = _load(converted[arch]), AutoTokenizer.from_pretrained(converted[arch])
    a, b = _ids(tok, 11, seed=2), _ids(tok, 6, seed=3)
    with torch.no_grad():
        alone_b = model(b).logits[0]
        alone_a = model(a).logits[0]
        for side in ("left", "right"):
            ids = torch.full((2, 11), tok.pad_token_id)
            mask = torch.zeros(2, 11, dtype=torch.long)
            ids[0], mask[0] = a[0], 1
            span = slice(5, 11) if side == "left" else slice(0, 6)
            ids[1, span], mask[1, span] = b[0], 1
            out = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
            torch.testing.assert_close(out[1, span], alone_b, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out[0], alone_a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_mask_token_recorded_and_distinct(arch, converted, tiny_models):
    path = converted[arch]
    settings = load_settings(path)
    config = json.loads((path / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    assert config["is_causal"] is False
    assert config["mask_token_id"] == settings.mask_token_id == tok.mask_token_id
    assert tok.convert_ids_to_tokens(settings.mask_token_id) == settings.mask_token
    assert settings.mask_token_id not in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    assert settings.shift is True and settings.source_model == str(tiny_models[arch])
    assert settings.source_hash and len(settings.source_hash) == 64
    rows = _load(path).get_input_embeddings().num_embeddings
    assert settings.mask_token_id < rows and rows % 64 == 0 or arch == "qwen2"


def test_spare_row_is_reused_without_resizing(converted, tiny_models):
    before = _load(tiny_models["qwen2"]).get_input_embeddings().weight
    after = _load(converted["qwen2"]).get_input_embeddings().weight
    assert after.shape == before.shape  # Qwen-style spare rows: no resize
    mask_id = load_settings(converted["qwen2"]).mask_token_id
    tok = AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    torch.testing.assert_close(after[mask_id], before[: len(tok)].mean(0))


def test_mask_embedding_is_mean_and_tied_output_follows(converted, tiny_models):
    src, model = _load(tiny_models["gpt2"]), _load(converted["gpt2"])
    mask_id = load_settings(converted["gpt2"]).mask_token_id
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[mask_id], src.get_input_embeddings().weight.mean(0))
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # gpt2 ties
    torch.testing.assert_close(emb[:mask_id], src.get_input_embeddings().weight[:mask_id])


def test_mask_init_options(tiny_models, tmp_path):
    for how in ("zero", "normal"):
        out = convert(str(tiny_models["llama"]), tmp_path / how, ConvertOptions(mask_init=how)).out
        row = _load(out).get_input_embeddings().weight[load_settings(out).mask_token_id]
        assert (row.abs().sum() == 0) == (how == "zero")


def test_already_converted_does_nothing(converted, tmp_path):
    result = convert(str(converted["llama"]), tmp_path / "again")
    assert result.already_converted and not (tmp_path / "again").exists()


def test_existing_output_needs_force(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(AdaptError, match="not empty"):
        convert(str(tiny_models["llama"]), out)
    assert (out / "keep.txt").read_text() == "precious"
    with pytest.raises(AdaptError, match="adapt did not write"):  # --force replaces only adapt's checkpoints
        convert(str(tiny_models["llama"]), out, ConvertOptions(force=True))
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    convert(str(tiny_models["llama"]), out)
    first = json.loads((out / ".adapt-owner.json").read_text())["id"]
    (out / "old.txt").write_text("the user's, added later")
    with pytest.raises(AdaptError, match=r"adapt did not write \(old.txt\)"):  # named, kept
        convert(str(tiny_models["llama"]), out, ConvertOptions(force=True))
    (out / "old.txt").unlink()
    convert(str(tiny_models["llama"]), out, ConvertOptions(force=True))  # all adapt's: replaced
    assert json.loads((out / ".adapt-owner.json").read_text())["id"] != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _no_partial_output(tmp_path: Path) -> bool:
    return not any(p.name.startswith(".out") or p.name == "out" for p in tmp_path.iterdir())


def test_non_causal_model_refused(tmp_path):
    bert = BertForMaskedLM(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(AdaptError, match="not a causal LM"):
        convert(str(tmp_path / "bert"), tmp_path / "out")
    assert _no_partial_output(tmp_path)


def test_sliding_window_refused(tmp_path):
    from adapt.tiny import build_tiny_model

    src = build_tiny_model("mistral", tmp_path / "m", sliding_window=4)
    with pytest.raises(AdaptError, match="sliding-window"):
        convert(str(src), tmp_path / "out")
    assert _no_partial_output(tmp_path)


def test_flash_attention_refused(tiny_models, tmp_path):
    with pytest.raises(AdaptError, match="attention implementation"):
        convert(
            str(tiny_models["llama"]),
            tmp_path / "out",
            ConvertOptions(attn_implementation="flash_attention_2"),
        )


def test_failed_check_writes_nothing(tiny_models, tmp_path, monkeypatch):
    import adapt.conversion.convert as conv

    def broken(model, probe, vocab, pad_id):
        raise AdaptError("check 'padding invariance' failed: simulated")

    monkeypatch.setattr(conv, "verify_converted", broken)
    with pytest.raises(AdaptError, match="padding invariance"):
        convert(str(tiny_models["llama"]), tmp_path / "out")
    assert _no_partial_output(tmp_path)


def test_corrupt_config_and_missing_path(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(AdaptError, match="cannot read the config"):
        convert(str(bad), tmp_path / "out")
    with pytest.raises(AdaptError, match="no such model directory"):
        convert(str(tmp_path / "missing"), tmp_path / "out")
    with pytest.raises(AdaptError, match="someorg/somemodel"):
        convert("someorg/somemodel", tmp_path / "out")


def test_cli_runner_success_and_errors(tiny_models, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["convert", str(tiny_models["gpt2"]), str(tmp_path / "o")])
    assert ok.exit_code == 0, ok.output
    assert "checks passed" in ok.output and (tmp_path / "o" / "model.safetensors").exists()
    again = runner.invoke(app, ["convert", str(tiny_models["gpt2"]), str(tmp_path / "o")])
    assert again.exit_code == 1 and "pass --force" in again.output
    assert len([line for line in again.output.strip().splitlines() if line.startswith("error")]) == 1
    missing = runner.invoke(app, ["convert", str(tmp_path / "nope"), str(tmp_path / "o2")])
    assert missing.exit_code == 1 and "no such model directory" in missing.output


def test_cli_subprocess(tiny_models, tmp_path):
    help_ = subprocess.run([sys.executable, "convert.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_.returncode == 0 and "--dtype" in help_.stdout
    run = subprocess.run(
        [sys.executable, "convert.py", str(tiny_models["qwen3"]), str(tmp_path / "q"), "--dtype", "float32"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert _load(tmp_path / "q").config.is_causal is False
    bad = subprocess.run(
        [sys.executable, "convert.py", str(tmp_path / "nope"), str(tmp_path / "z")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "error:" in bad.stderr


def test_conversion_is_reproducible(tiny_models, tmp_path):
    """Two conversions give identical weights: the resize's padding rows are initialised too."""
    from safetensors.torch import load_file

    torch.manual_seed(1)
    a = convert(str(tiny_models["llama"]), tmp_path / "a").out
    torch.manual_seed(2)
    b = convert(str(tiny_models["llama"]), tmp_path / "b").out
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    emb = wa["model.embed_tokens.weight"]
    mask_id = load_settings(a).mask_token_id
    assert emb.shape[0] > mask_id + 1  # padding rows exist beyond the mask token
    torch.testing.assert_close(emb[mask_id + 1 :], emb[mask_id].expand_as(emb[mask_id + 1 :]))
