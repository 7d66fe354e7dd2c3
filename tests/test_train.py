"""Fine-tuning on tiny models: learning, LoRA, resume, NaN, Ctrl-C, two processes, annealing, SFT, export."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adapt.core.diffusion import diffusion_loss
from adapt.core.errors import AdaptError
from adapt.training.config import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "recipes/data/stories.txt"
CHAT = ROOT / "recipes/data/chat.jsonl"
QUIET = ["logging.report_to=[]", "logging.progress_bar=false", "logging.log_every=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def recipe_for(name: str, model: Path, out: Path, *overrides: str) -> Recipe:
    data = CHAT if "chat" in name else STORIES
    base = [f"model.path={model}", f"training.output_dir={out}", f"data.path={data}", *QUIET]
    return load_recipe(ROOT / f"recipes/{name}.yaml", [*base, *overrides])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}


def probe_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_loss_decreases_on_a_repeated_corpus(llama_diffusion: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from adapt.training.run import run

    corpus = tmp_path / "repeated.txt"
    corpus.write_text("\n\n".join(["The miller's daughter counted the sacks of grain every morning."] * 40))
    out = tmp_path / "run"
    recipe = recipe_for(
        "adapt_text", llama_diffusion, out, f"data.path={corpus}", "data.max_length=32",
        "training.max_steps=40", "training.lr=3e-3", "training.warmup_steps=0", "diffusion.anneal_steps=0",
    )  # fmt: skip
    state, exported = run(recipe)
    curve = losses(out)
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(36, 41)) / 5
    assert last < 0.6 * first, curve
    assert state.step == 40 and state.eval_loss is not None and state.eval_loss < first
    logged = [m for m in metrics(out) if "eval_accuracy" in m]
    assert logged and logged[-1]["eval_accuracy"] == state.eval_accuracy
    assert 0.3 < state.eval_accuracy <= 1.0  # the repeated sentence is largely learned

    # the export: stock transformers loads it, bidirectional, with the diffusion block and our files
    model = AutoModelForCausalLM.from_pretrained(exported)
    config = json.loads((exported / "config.json").read_text())
    assert config["is_causal"] is False and config["diffusion"]["mask_token_id"] == config["mask_token_id"]
    assert (
        json.loads((exported / "generation_config.json").read_text())["mask_token_id"]
        == config["mask_token_id"]
    )
    summary = json.loads((exported / "training_summary.json").read_text())
    assert summary["steps"] == 40 and summary["lora"] is False and summary["tokens_seen"] == state.tokens_seen
    assert summary["eval_loss"] == pytest.approx(state.eval_loss)
    assert load_recipe(exported / "recipe.yaml") == recipe
    assert any(exported.glob("*.safetensors")) and (exported / "tokenizer.json").is_file()
    ids = torch.tensor([[5, 9, 12, 30, 41, 7]])
    changed = ids.clone()
    changed[0, -1] = 8
    assert not torch.allclose(probe_logits(model, ids)[0, 0], probe_logits(model, changed)[0, 0])
    from adapt.loading.model import load_diffusion_model

    _, tokenizer, settings = load_diffusion_model(exported)
    assert tokenizer.mask_token_id == settings.mask_token_id


def test_fast_step_matches_reference_loss_and_sft_never_masks_prompts(
    llama_diffusion: Path, tmp_path: Path
) -> None:
    from adapt.training.noising import make_inputs, step_generator
    from adapt.training.setup import setup

    session = setup(recipe_for("sft_chat", llama_diffusion, tmp_path / "run", "data.max_length=64"))
    assert session.loss_module.fast, "the LM head on masked positions only is used for llama"
    model, shift = session.model, session.settings.shift
    masked_prompt = masked_response = 0
    for i, batch in enumerate(session.train_loader):
        if i == 6:
            break
        gen = step_generator(session, i, 0, torch.device("cpu"))
        inputs = make_inputs(session, batch, i, gen)
        ids, prompt, real = batch["input_ids"], batch["prompt_mask"], batch["attention_mask"].bool()
        noisy = inputs["input_ids"]
        masked = noisy == session.settings.mask_token_id
        assert not (masked & prompt).any() and not (masked & ~real).any()
        assert torch.equal(noisy[~masked], ids[~masked])
        masked_prompt += int((masked & prompt).sum())
        masked_response += int(masked.sum())
        # the fast objective equals the reference loss on full logits, normalised by response length
        rows = masked.nonzero(as_tuple=True)[0]
        t = 1.0 / (inputs["weights"] * ids.shape[0] * (real & ~prompt).sum(-1)[rows])
        t_per_sample = torch.zeros(ids.shape[0]).index_put((rows,), t)
        with torch.no_grad():
            fast, _, _ = session.loss_module(**inputs)
            logits = model(input_ids=noisy, attention_mask=inputs["attention_mask"]).logits
        response_len = (real & ~prompt).sum(-1)
        reference = diffusion_loss(logits, ids, masked, t_per_sample.clamp(min=1e-3), shift, response_len)
        assert fast.item() == pytest.approx(reference.item(), rel=1e-4)
    assert masked_prompt == 0 and masked_response > 50
    session.accelerator.end_training()


def test_annealing_follows_the_schedule(llama_diffusion: Path, tmp_path: Path) -> None:
    from adapt.training.loop import fit
    from adapt.training.setup import setup

    out = tmp_path / "run"
    recipe = recipe_for(
        "adapt_text", llama_diffusion, out, "diffusion.anneal_steps=12", "training.max_steps=16",
        "data.max_length=48", "data.allow_cross_document=true", "training.batch_size=4",
        "training.export=false",
    )  # fmt: skip
    fit(setup(recipe))
    opened = {m["step"]: m["attention_open"] for m in metrics(out) if "attention_open" in m}
    for step, fraction in opened.items():
        expected = min(1.0, step / 12)  # the mask of optimizer step s (0-based s = step - 1)
        assert abs(fraction - expected) < 0.06, (step, fraction, expected)
    assert opened[1] < 0.15 and opened[12] == 1.0 and opened[16] == 1.0


def trainable_snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    return trainable, frozen


def test_lora_trains_adapters_and_mask_row_and_merges_exactly(llama_src: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from adapt.training.export import export
    from adapt.training.loop import fit
    from adapt.training.setup import setup

    out = tmp_path / "run"
    recipe = recipe_for("lora_chat", llama_src, out, "training.max_steps=4", "training.lr=1e-2")
    session = setup(recipe)
    model, mask_id = session.model, session.settings.mask_token_id
    trainable, frozen = trainable_snapshot(model)
    names = " ".join(trainable)
    for target in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"{target}.lora_A" in names and f"{target}.lora_B" in names
    assert "trainable_tokens_delta" in names and "lm_head" not in names
    embed = model.get_input_embeddings()
    rows_before = embed(torch.arange(mask_id + 1)).detach().clone()
    fit(session)
    after = dict(model.named_parameters())
    unchanged = [n for n, p in trainable.items() if torch.equal(p, after[n])]
    assert not unchanged, f"trainable parameters that did not change: {unchanged}"
    moved = [n for n, p in frozen.items() if not torch.equal(p, after[n])]
    assert not moved, f"frozen parameters that changed: {moved}"
    rows_after = embed(torch.arange(mask_id + 1)).detach()
    assert not torch.allclose(rows_after[mask_id], rows_before[mask_id]), "mask-token row trained"
    assert torch.equal(rows_after[:mask_id], rows_before[:mask_id]), "other rows frozen"

    ids = torch.tensor([[3, 17, 42, mask_id, mask_id, 25, 60]])
    peft_logits = probe_logits(model, ids)
    exported = export(session)
    merged = AutoModelForCausalLM.from_pretrained(exported)
    torch.testing.assert_close(probe_logits(merged, ids), peft_logits, atol=1e-5, rtol=1e-4)
    assert json.loads((exported / "training_summary.json").read_text())["lora"] is True
    assert not any("lora" in k for k in merged.state_dict())
    session.accelerator.end_training()


def test_lora_adapter_export_needs_a_converted_base(
    llama_src: Path, llama_diffusion: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapt.training.run import run

    with pytest.raises(AdaptError, match="lora.export=adapter needs model.path to be a converted"):
        run(recipe_for("lora_chat", llama_src, tmp_path / "a", "lora.export=adapter"))
    out = tmp_path / "b"
    _, exported = run(
        recipe_for("lora_chat", llama_diffusion, out, "lora.export=adapter", "training.max_steps=2")
    )
    assert (exported / "adapter_config.json").is_file() and not (exported / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(llama_diffusion)
    PeftModel.from_pretrained(base, exported)


def file_hashes(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in path.rglob("*")
        if p.is_file()
    }


def test_resume_gives_the_same_loss_curve(llama_diffusion: Path, tmp_path: Path) -> None:
    import shutil

    from adapt.training.loop import fit
    from adapt.training.setup import setup

    settings = ["training.max_steps=8", "training.checkpoint_every=4", "training.keep_checkpoints=5",
                "data.max_length=32", "training.batch_size=4", "training.grad_accumulation=2",
                "diffusion.anneal_steps=6", "training.export=false", "training.eval_every=4"]  # fmt: skip
    full = tmp_path / "full"
    fit(setup(recipe_for("adapt_text", llama_diffusion, full, *settings)))
    # a run that died right after step 4: only its step-4 checkpoint survives
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints/step-00000004", resumed / "checkpoints/step-00000004")
    session = setup(recipe_for("adapt_text", llama_diffusion, resumed, *settings))
    assert session.state.step == 4 and session.state.batches_in_epoch == 8
    fit(session)
    reference, again = losses(full), losses(resumed)
    assert sorted(again) == [5, 6, 7, 8]
    assert [again[s] for s in again] == [reference[s] for s in again], "bit-identical loss curve"
    evals = [m["eval_loss"] for m in metrics(full) if "eval_loss" in m]
    assert [m["eval_loss"] for m in metrics(resumed) if "eval_loss" in m] == evals[1:]
    weights = "model.safetensors"  # written by accelerator.save_state
    last = "checkpoints/step-00000008"
    assert file_hashes(full / last)[weights] == file_hashes(resumed / last)[weights], "identical weights"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(llama_diffusion: Path, tmp_path: Path) -> None:
    from adapt.training.loop import fit
    from adapt.training.setup import setup

    out = tmp_path / "run"
    common = ["training.checkpoint_every=2", "data.max_length=32", "training.export=false"]
    fit(setup(recipe_for("adapt_text", llama_diffusion, out, "training.max_steps=2", *common)))
    good = out / "checkpoints/step-00000002"
    before = file_hashes(good)
    session = setup(recipe_for("adapt_text", llama_diffusion, out, "training.max_steps=6", *common))
    with torch.no_grad():  # corrupted weights: the next loss is NaN
        session.model.get_input_embeddings().weight[:] = float("nan")
    with pytest.raises(AdaptError, match=r"loss is nan at step 3; stopped, nothing exported.*step-00000002"):
        fit(session)
    assert file_hashes(good) == before
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]


def run_cli(*args: str, **extra_env: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        args, cwd=ROOT, env={**env, **extra_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize(("name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stop_signal_saves_a_checkpoint_and_exits_cleanly(
    llama_diffusion: Path, tmp_path: Path, name: str, code: int
) -> None:
    """Ctrl-C, or a scheduler's SIGTERM: one checkpoint of the last finished step, exit 128 + signal."""
    out, stop = tmp_path / "run", signal.Signals[name]
    overrides = [f"model.path={llama_diffusion}", f"training.output_dir={out}", *QUIET,
                 "training.max_steps=100000", "data.max_length=32"]  # fmt: skip
    proc = run_cli(sys.executable, "finetune.py", "recipes/adapt_text.yaml", *overrides)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "interrupted at step" in err and f"({stop.name}); saved" in err and "Traceback" not in err
    checkpoints = list((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert state["interrupted"] is True and state["step"] >= 1 and state["stopped_by"] == stop.name
    assert checkpoints[0].name == f"step-{state['step']:08d}"
    assert not (out / "final").exists()


def test_two_processes_train_the_same_model(llama_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [f"model.path={llama_src}", f"training.output_dir={out}", *QUIET, f"data.path={STORIES}",
                 "training.max_steps=3", "data.max_length=32", "data.overflow=split",
                 "training.batch_size=2"]  # fmt: skip
    # `--cpu` would start one process: torchrun's launcher with accelerate forced onto the CPU (gloo)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    proc = run_cli(
        *launch, "finetune.py", "recipes/multi_process.yaml", *overrides, ACCELERATE_USE_CPU="true"
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    records = metrics(out)
    sums = next(m["rank_weight_checksums"] for m in records if "rank_weight_checksums" in m)
    assert len(sums) == 2 and sums[0] == sums[1]
    per_step = [m for m in records if "tokens_seen" in m]
    assert per_step[-1]["step"] == 3
    # each step saw 2 processes x 2 micro-batches x 2 sequences of 32 tokens
    assert per_step[0]["tokens_seen"] == 2 * 2 * 2 * 32
    summary = json.loads((out / "final/training_summary.json").read_text())
    assert summary["steps"] == 3


def test_recipes_run_end_to_end_through_the_cli(llama_src: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from adapt.cli import app

    runner = CliRunner()
    first = tmp_path / "adapt_text"
    args = [f"model.path={llama_src}", *QUIET, "training.max_steps=2", "data.max_length=32"]
    tensorboard = "logging.report_to=[tensorboard]"
    result = runner.invoke(
        app, ["finetune", "recipes/adapt_text.yaml", f"training.output_dir={first}", *args, tensorboard]
    )
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output and (first / "final/config.json").is_file()
    assert list(first.rglob("events.out.tfevents.*")), "metrics reach the tensorboard tracker"
    # SFT from the first recipe's export, as the shipped recipes chain
    args[0] = f"model.path={first / 'final'}"
    second = tmp_path / "sft"
    result = runner.invoke(app, ["finetune", "recipes/sft_chat.yaml", f"training.output_dir={second}", *args])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["finetune", "recipes/sft_chat.yaml", "training.bogus=1"])
    assert result.exit_code == 1 and "unknown key 'training.bogus'" in result.output
    result = runner.invoke(app, ["finetune", "recipes/lora_chat.yaml", "lora.r=4", "--print-config"])
    assert result.exit_code == 0 and "r: 4" in result.output


@pytest.mark.parametrize(
    "arch", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2", "olmo2", "phi3", "granite"]
)
def test_fast_objective_equals_reference_loss_on_every_architecture(converted: dict, arch: str) -> None:
    from adapt.conversion.verify import ordinary_token_ids
    from adapt.loading.model import load_diffusion_model
    from adapt.training.config import DiffusionConfig
    from adapt.training.objectives.loss import TokenLoss, check_fast_path
    from adapt.training.objectives.masked import noise_batch

    model, tokenizer, settings = load_diffusion_model(converted[arch])
    assert check_fast_path(model, ordinary_token_ids(model, tokenizer)), arch
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer) - 1, (3, 12), generator=gen)
    am = torch.ones_like(ids)
    am[2, 9:] = 0  # a right-padded row
    inputs = noise_batch(
        {"input_ids": ids, "attention_mask": am}, 0, gen, DiffusionConfig(), settings, torch.float32
    )
    masked = inputs["input_ids"] == settings.mask_token_id
    rows = masked.nonzero(as_tuple=True)[0]
    t = torch.zeros(3).index_put((rows,), 1.0 / (inputs["weights"] * 3 * 12))
    with torch.no_grad():
        fast, _, fast_correct = TokenLoss(model, fast=True)(**inputs)
        full, _, full_correct = TokenLoss(model, fast=False)(**inputs)
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=am, position_ids=inputs["position_ids"]
        ).logits
    reference = diffusion_loss(logits, ids, masked, t, settings.shift)
    assert fast.item() == pytest.approx(reference.item(), rel=1e-4)
    assert full.item() == pytest.approx(reference.item(), rel=1e-4)
    assert torch.equal(fast_correct, full_correct)


def test_fast_path_handles_soft_capped_heads() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapt.training.objectives.loss import TokenLoss, check_fast_path, head_logits

    config = AutoConfig.for_model(
        "gemma2", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.05,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    assert check_fast_path(model, list(range(3, 90)))
    ids = torch.arange(3, 11)[None]
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0]
    assert head_logits(model, hidden).abs().max() <= 0.05  # capped
    bare = model.get_output_embeddings()(hidden)
    assert bare.abs().max() > 0.1, "the probe must exceed the cap for the check to mean anything"
    torch.testing.assert_close(
        TokenLoss(model).logits_at(ids, torch.ones_like(ids), None, torch.zeros(8).long(),
                                                  torch.arange(8)),
        model(input_ids=ids).logits[0],
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gpt2", "phi3", "olmo2"])
def test_lora_targets_are_found_per_architecture(converted: dict, arch: str) -> None:
    from adapt.loading.model import load_diffusion_model
    from adapt.training.config import LoraSettings
    from adapt.training.lora import apply_lora, lora_target_modules

    model, _, settings = load_diffusion_model(converted[arch])
    targets = lora_target_modules(model)
    expected = {
        "gpt2": {"c_attn", "c_fc", "c_proj"},
        "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    }
    assert set(targets) == expected.get(arch, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"})  # fmt: skip
    peft_model = apply_lora(model.train(), LoraSettings(r=2), settings.mask_token_id)
    ids = torch.tensor([[2, 5, settings.mask_token_id, 9, 4]])
    peft_model(input_ids=ids).logits.square().mean().backward()
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None for p in trainable.values())
    assert all("lora_" in n or "trainable_tokens" in n for n in trainable)


def test_finetune_prints_adapts_lines_without_library_noise(tiny_models: dict, tmp_path: Path) -> None:
    """A tied-embeddings model (gpt2) checkpointed every step: accelerate's "[RANK 0] Saving ..." info
    lines and its "Removed shared tensor" notice stay out of the output; adapt's own lines remain."""
    src = tiny_models["gpt2"]
    assert json.loads((src / "config.json").read_text()).get("tie_word_embeddings", True)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "finetune.py", "recipes/adapt_text.yaml", f"model.path={src}",
         f"training.output_dir={out}", *QUIET, "training.max_steps=2", "data.max_length=32",
         "training.checkpoint_every=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert len(list((out / "checkpoints").iterdir())) >= 1
    assert "mixed precision:" in text and "trained 2 steps" in text
    assert "Removed shared tensor" not in text and "[RANK 0]" not in text, text
