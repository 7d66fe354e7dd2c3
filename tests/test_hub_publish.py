"""Publishing as users publish: LoRA adapters against their base on the Hub, and every usage line of a
generated card run as written against what a push would upload (staged in an offline Hub cache)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from hubcache import edited_copy, stage
from huggingface_hub import ModelCard
from test_hub_ids import cli

from adapt.core.errors import AdaptError
from adapt.publishing.hub import plan_push

BASE = "org/tiny-base"
ADAPTER = "me/tiny-lora"


@pytest.fixture(scope="module")
def adapter(llama_diffusion: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter export of two training steps on the converted tiny llama (recorded base: its path)."""
    from test_train import recipe_for

    from adapt.training.run import run

    out = tmp_path_factory.mktemp("lora")
    recipe = recipe_for("lora_chat", llama_diffusion, out, "lora.export=adapter", "training.max_steps=2")
    _, exported = run(recipe)
    return exported


def published(plan_dir: Path, repo: str, cache: Path) -> Path:
    """What a push of `plan_dir` uploads, staged as the Hub repo `repo` in `cache`."""
    res = cli("push", str(plan_dir), repo, "--stage", str(cache.parent / f"staged-{repo.replace('/', '-')}"))
    assert res.exit_code == 0, res.output
    return stage(cache.parent / f"staged-{repo.replace('/', '-')}", repo, cache)


def test_adapter_push_uploads_the_adapter_its_tokenizer_and_a_peft_card(
    adapter: Path, llama_diffusion: Path, hub_cache: Path
) -> None:
    stage(llama_diffusion, BASE, hub_cache)
    before = (adapter / "adapter_config.json").read_text()
    plan = plan_push(adapter, ADAPTER, base_model=BASE)
    own = sorted(p.name for p in adapter.iterdir() if not p.name.startswith("."))  # not adapt's marker
    assert plan.repo_files == sorted({*own, "README.md"})
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(plan.repo_files)
    assert "model.safetensors" not in plan.repo_files and "config.json" not in plan.repo_files
    uploaded = dict(plan.contents())
    assert json.loads(uploaded["adapter_config.json"])["base_model_name_or_path"] == BASE
    assert (adapter / "adapter_config.json").read_text() == before  # the export itself is not touched
    card = ModelCard(plan.card, ignore_metadata_errors=False)
    meta = card.data.to_dict()
    assert meta["base_model"] == BASE and meta["library_name"] == "peft"
    assert {"lora", "diffusion", "masked-diffusion"} <= set(meta["tags"])
    settings = json.loads((llama_diffusion / "config.json").read_text())["diffusion"]
    assert f"`{settings['mask_token']}` (id {settings['mask_token_id']})" in card.text
    assert "(LoRA adapter)." in card.text and "PeftModel.from_pretrained(base, repo)" in card.text


def test_a_published_adapter_loads_with_stock_peft_onto_its_hub_base(
    adapter: Path, llama_diffusion: Path, hub_cache: Path
) -> None:
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    stage(llama_diffusion, BASE, hub_cache)
    res = cli("push", str(adapter), ADAPTER, "--base-model", BASE, "--stage", str(hub_cache.parent / "up"))
    assert res.exit_code == 0, res.output
    stage(hub_cache.parent / "up", ADAPTER, hub_cache)
    ids = torch.tensor([[3, 9, 4, 7, 11]])
    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_diffusion), adapter).eval()
    from_hub = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER).eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(ADAPTER).eval()
    with torch.no_grad():
        want = local(ids).logits
        torch.testing.assert_close(from_hub(ids).logits, want, atol=0, rtol=0)
        torch.testing.assert_close(auto(ids).logits, want, atol=0, rtol=0)
    assert not torch.allclose(want, AutoModelForCausalLM.from_pretrained(BASE).eval()(ids).logits)


def test_adapters_whose_base_cannot_be_reached_are_refused(
    adapter: Path, llama_diffusion: Path, llama_src: Path, hub_cache: Path, tmp_path: Path
) -> None:
    with pytest.raises(AdaptError, match=r"base model is the local directory .* pass --base-model"):
        plan_push(adapter, ADAPTER)
    with pytest.raises(AdaptError, match="base model org/nowhere cannot be used: .*not in the Hub cache"):
        plan_push(adapter, ADAPTER, base_model="org/nowhere")
    other = tmp_path / "other"
    shutil.copytree(llama_diffusion, other)
    weights = other / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    stage(other, "org/other-base", hub_cache)
    with pytest.raises(AdaptError, match="whose weights differ from those of org/other-base"):
        plan_push(adapter, ADAPTER, base_model="org/other-base")
    stage(llama_src, "org/plain-ar", hub_cache)
    with pytest.raises(AdaptError, match="is not a diffusion checkpoint"):
        plan_push(adapter, ADAPTER, base_model="org/plain-ar")
    res = cli("push", str(adapter), ADAPTER, "--base-model", "org/nowhere", "--dry-run")
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the card's usage lines, as written


def card_blocks(card: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", card, flags=re.S)


def run_card(card: str, workdir: Path) -> list[str]:
    """Run every python and bash block of `card` as written (bash lines through the `adapt` command);
    returns what the python blocks printed."""
    printed = []
    for code in card_blocks(card, "python"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "card", "exec"), {})
        printed.append(out.getvalue())
    for block in card_blocks(card, "bash"):
        for line in block.strip().splitlines():
            argv = shlex.split(line)
            assert argv[0] == "adapt", line
            res = cli(*argv[1:])
            assert res.exit_code == 0, f"{line}\n{res.output}"
    return printed


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory of a user who has the card's `text.txt` at hand."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("The river runs past the old mill and down to the sea. " * 40)
    return tmp_path


def test_every_usage_line_of_a_full_checkpoint_card_works(
    llama_diffusion: Path, hub_cache: Path, workdir: Path
) -> None:
    repo = "me/tiny-diffusion"
    snapshot = published(llama_diffusion, repo, hub_cache)
    card = (snapshot / "README.md").read_text()
    assert len(card_blocks(card, "python")) == 2 and "adapt sample me/tiny-diffusion" in card
    printed = run_card(card, workdir)
    assert all(p.strip() and "<|mask|>" not in p for p in printed)


def test_every_usage_line_of_a_block_card_works(
    llama_diffusion: Path, hub_cache: Path, workdir: Path
) -> None:
    block = edited_copy(llama_diffusion, workdir / "block", block_size=4)
    card = (published(block, "me/tiny-block", hub_cache) / "README.md").read_text()
    assert "--cache prefix" in card
    run_card(card, workdir)


def test_every_usage_line_of_an_adapter_card_works(
    adapter: Path, llama_diffusion: Path, hub_cache: Path, workdir: Path
) -> None:
    stage(llama_diffusion, BASE, hub_cache)
    res = cli("push", str(adapter), ADAPTER, "--base-model", BASE, "--stage", str(workdir / "up"))
    assert res.exit_code == 0, res.output
    card = (stage(workdir / "up", ADAPTER, hub_cache) / "README.md").read_text()
    assert "from peft import PeftModel" in card
    printed = run_card(card, workdir)
    assert all(p.strip() for p in printed)
