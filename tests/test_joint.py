"""The joint objective (diffusion.ar_loss_weight): the clean half of block diffusion with causal clean
attention also trains next-token prediction, so one checkpoint is an AR model and a diffusion drafter."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from adapt.conversion.verify import ordinary_token_ids
from adapt.core.checkpoint import check_settings
from adapt.core.errors import AdaptError
from adapt.loading.model import load_diffusion_model
from adapt.training.config import DiffusionConfig, recipe_from_dict
from adapt.training.objectives.block import BlockDiffusion
from adapt.training.objectives.loss import TokenLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def joint(settings, weight: float, block: int = 4, **diffusion) -> BlockDiffusion:  # noqa: ANN001, ANN003
    """The joint objective (block diffusion, causal clean, AR term of `weight`), with other diffusion keys."""
    config = DiffusionConfig(block_size=block, clean_attention="causal", ar_loss_weight=weight, **diffusion)
    return BlockDiffusion(config, settings)


def random_batch(tokenizer, rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Random ordinary tokens (never the mask token, which converted tokenizers end with)."""
    vocab = len(tokenizer) - 1
    ids = torch.randint(10, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def ar_part(inputs: dict) -> dict:  # noqa: ANN001
    """The AR term's entries alone (same forward input)."""
    keep = inputs["ar"]
    out = dict(inputs)
    for key in ("rows", "cols", "targets", "weights"):
        out[key] = inputs[key][keep]
    out.pop("ar")
    return out


def loss(model, inputs: dict) -> torch.Tensor:  # noqa: ANN001
    return TokenLoss(model)(**inputs)[0]


def logits_of(model, entries: dict) -> torch.Tensor:  # noqa: ANN001
    """The model's logits at the entries' (rows, cols), through the loss's own reading of them."""
    keys = ("input_ids", "attention_mask", "position_ids", "rows", "cols")
    return TokenLoss(model).logits_at(*(entries[k] for k in keys), entries.get("pair"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
def test_ar_term_is_the_source_s_own_causal_lm_loss(converted, tiny_models, arch: str) -> None:  # noqa: ANN001
    model, tokenizer, settings = load_diffusion_model(converted[arch], device="cpu")
    batch = random_batch(tokenizer, rows=2, length=12, seed=1)
    inputs = joint(settings, 1.0).inputs(batch, 0, torch.Generator().manual_seed(2), torch.float32)
    with torch.no_grad():
        got = loss(model, ar_part(inputs))
        # stock transformers, the same weights run causally, its own labels loss
        causal = AutoModelForCausalLM.from_pretrained(converted[arch], is_causal=True).eval()
        want = causal(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert int(inputs["ar"].sum()) == 2 * 11  # every token but each row's first
    # and the source's own next-token logits, every row of its vocabulary but the new mask token's
    source = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    entries = ar_part(inputs)
    with torch.no_grad():
        logits = logits_of(model, entries)
        ar = source(**batch).logits[entries["rows"], entries["cols"] - batch["input_ids"].shape[1]]
    keep = torch.arange(ar.shape[-1]) != settings.mask_token_id  # (a reused spare row has new weights)
    torch.testing.assert_close(logits[:, : ar.shape[-1]][:, keep], ar[:, keep], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_joint_loss_and_gradients_are_the_two_terms_of_separate_forwards(converted, weight: float) -> None:  # noqa: ANN001
    model, tokenizer, settings = load_diffusion_model(converted["llama"], device="cpu")
    batch = random_batch(tokenizer, rows=2, length=16, seed=3)

    def grads_of(value: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        value.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    both = joint(settings, weight).inputs(batch, 0, torch.Generator().manual_seed(4), torch.float32)
    diffusion = joint(settings, 0.0).inputs(batch, 0, torch.Generator().manual_seed(4), torch.float32)
    assert "ar" not in diffusion
    causal = AutoModelForCausalLM.from_pretrained(converted["llama"], is_causal=True)
    joint_loss = loss(model, both)
    g_joint = grads_of(joint_loss)
    d_loss = loss(model, diffusion)
    g_diff = grads_of(d_loss)
    a_loss = causal(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    causal.zero_grad()
    a_loss.backward()
    g_ar = [p.grad for p in causal.parameters() if p.grad is not None]
    torch.testing.assert_close(joint_loss, d_loss + weight * a_loss, rtol=1e-5, atol=1e-5)
    assert len(g_joint) == len(g_diff) == len(g_ar)
    for gj, gd, ga in zip(g_joint, g_diff, g_ar, strict=True):
        torch.testing.assert_close(gj, gd + weight * ga, rtol=1e-4, atol=1e-6)
    assert all(float(g.abs().sum()) > 0 for g in g_ar[-3:])  # the AR term moves the top layers too
    assert not torch.allclose(g_joint[-1], g_diff[-1])


def test_left_padding_keeps_the_ar_term_exact(converted) -> None:  # noqa: ANN001
    model, tokenizer, settings = load_diffusion_model(converted["qwen2"], device="cpu")
    gen = torch.Generator().manual_seed(5)
    long = torch.randint(10, len(tokenizer) - 1, (12,), generator=gen)
    short = torch.randint(10, len(tokenizer) - 1, (9,), generator=gen)
    pad = tokenizer.pad_token_id
    batch = {
        "input_ids": torch.stack([long, torch.cat([torch.full((3,), pad), short])]),
        "attention_mask": torch.tensor([[1] * 12, [0] * 3 + [1] * 9]),
    }
    objective = joint(settings, 1.0)

    def ar_nll(b: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = ar_part(objective.inputs(b, 0, torch.Generator().manual_seed(6), torch.float32))
        with torch.no_grad():
            _, nll, _ = TokenLoss(model)(**inputs)
        return nll, inputs["rows"], inputs["targets"]

    nll, rows, targets = ar_nll(batch)
    for r, row in enumerate((long, short)):
        alone, _, alone_targets = ar_nll({"input_ids": row[None], "attention_mask": torch.ones(1, len(row))})
        assert torch.equal(targets[rows == r], alone_targets)
        torch.testing.assert_close(nll[rows == r], alone, rtol=1e-5, atol=1e-5)


def test_packed_documents_each_keep_their_own_ar_loss(converted) -> None:  # noqa: ANN001
    model, tokenizer, settings = load_diffusion_model(converted["llama"], device="cpu")
    ids = random_batch(tokenizer, rows=1, length=10, seed=7)["input_ids"]
    packed = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "segment_ids": torch.tensor([[0] * 6 + [1] * 4]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]),
    }
    objective = joint(settings, 1.0, block=2)
    inputs = ar_part(objective.inputs(packed, 0, torch.Generator().manual_seed(8), torch.float32))
    assert inputs["targets"].tolist() == ids[0, [1, 2, 3, 4, 5, 7, 8, 9]].tolist()  # no doc's first
    causal = AutoModelForCausalLM.from_pretrained(converted["llama"], is_causal=True).eval()
    with torch.no_grad():
        got = loss(model, inputs)
        first = causal(input_ids=ids[:, :6], labels=ids[:, :6]).loss
        second = causal(input_ids=ids[:, 6:], labels=ids[:, 6:]).loss
    torch.testing.assert_close(got, (5 * first + 3 * second) / 8, rtol=1e-5, atol=1e-5)


def test_sft_prompts_stay_out_of_the_ar_term(converted) -> None:  # noqa: ANN001
    _, tokenizer, settings = load_diffusion_model(converted["llama"], device="cpu")
    batch = random_batch(tokenizer, rows=1, length=10, seed=9)
    prompt = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    prompt[:, :6] = True
    inputs = joint(settings, 1.0, block=2).inputs(
        {**batch, "prompt_mask": prompt}, 0, torch.Generator().manual_seed(1), torch.float32
    )
    assert inputs["targets"][inputs["ar"]].tolist() == batch["input_ids"][0, 6:].tolist()
    torch.testing.assert_close(inputs["weights"][inputs["ar"]], torch.full((4,), 0.25))


def test_the_export_records_the_weight_and_a_bad_recorded_weight_is_refused(converted) -> None:  # noqa: ANN001
    _, _, settings = load_diffusion_model(converted["llama"], device="cpu")
    recorded = joint(settings, 0.5).record(settings)
    assert (recorded.block_size, recorded.clean_attention, recorded.ar_loss_weight) == (4, "causal", 0.5)
    for bad in (-1.0, math.nan, "1", True):
        with pytest.raises(AdaptError, match="ar_loss_weight"):
            check_settings(dataclasses.replace(recorded, ar_loss_weight=bad), None, "ckpt")


@pytest.mark.parametrize(
    ("diffusion", "message"),
    [
        ({"ar_loss_weight": 1.0}, "needs block diffusion with clean_attention: causal .*full attention"),
        ({"block_size": 4, "ar_loss_weight": 1.0}, "clean_attention: block"),
        ({"block_size": 4, "clean_attention": "causal", "ar_loss_weight": -0.1}, "finite number >= 0"),
        ({"block_size": 4, "clean_attention": "causal", "ar_loss_weight": float("nan")}, "finite number"),
        ({"block_size": 4, "clean_attention": "causal", "ar_loss_weight": "x"}, "ar_loss_weight"),
        ({"block_size": 4, "clean_attention": "causal", "full_mask": True}, "full_mask .*needs the AR term"),
        ({"full_mask": True}, "needs the AR term"),
        (
            {"block_size": 4, "clean_attention": "causal", "ar_loss_weight": 1.0, "full_mask": True,
             "complementary_masking": True},
            "would mask none",
        ),
    ],
)  # fmt: skip
def test_bad_ar_loss_weights_and_full_masks_are_refused(diffusion: dict, message: str) -> None:
    recipe = {"model": {"path": "m"}, "data": {"path": "d", "max_length": 16}, "diffusion": diffusion}
    with pytest.raises(AdaptError, match=message):
        recipe_from_dict(recipe)


def test_the_full_mask_masks_every_maskable_token_at_weight_one(converted) -> None:  # noqa: ANN001
    """TiDAR's drafter objective: the noisy copy is all masks (padding and the prompt stay as they are)."""
    _, tokenizer, settings = load_diffusion_model(converted["llama"], device="cpu")
    ids = random_batch(tokenizer, rows=2, length=12, seed=11)["input_ids"]
    am = torch.ones_like(ids)
    ids[1, :3], am[1, :3] = tokenizer.pad_token_id, 0
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    prompt[:, :5] = True
    batch = {"input_ids": ids, "attention_mask": am, "prompt_mask": prompt}
    inputs = joint(settings, 1.0, full_mask=True).inputs(
        batch, 0, torch.Generator().manual_seed(1), torch.float32
    )
    noisy = inputs["input_ids"][:, :12]
    response = ~prompt & am.bool()
    assert (noisy[response] == settings.mask_token_id).all()
    assert torch.equal(noisy[~response], ids[~response])
    diffusion = ~inputs["ar"]
    per_row = [int((inputs["rows"][diffusion] == r).sum()) for r in range(2)]
    assert per_row == [7, 7]  # every response token is a target (shift: the first is read from the prompt)
    weights = inputs["weights"][diffusion]
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 14))  # 1/t = 1 / (response x rows)


def test_the_full_mask_loss_is_the_objective_at_t_one(converted) -> None:  # noqa: ANN001
    """The same loss as the ordinary objective whose t is pinned next to 1 (eps = 1 - 1e-7)."""
    model, tokenizer, settings = load_diffusion_model(converted["qwen2"], device="cpu")
    batch = random_batch(tokenizer, rows=2, length=16, seed=12)
    full = joint(settings, 1.0, full_mask=True)
    pinned = joint(settings, 1.0, eps=1 - 1e-7)
    usual = joint(settings, 1.0)
    with torch.no_grad():
        got, want, other = (
            loss(model, o.inputs(batch, 0, torch.Generator().manual_seed(2), torch.float32))
            for o in (full, pinned, usual)
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert abs(float(got - other)) > 1e-3  # t ~ U(eps, 1) is another loss


def test_the_export_records_the_full_mask_and_its_card_says_so(converted) -> None:  # noqa: ANN001
    from adapt.publishing.hub import block_rows

    _, _, settings = load_diffusion_model(converted["llama"], device="cpu")
    recorded = joint(settings, 1.0, full_mask=True).record(settings)
    assert recorded.full_mask and not joint(settings, 1.0).record(settings).full_mask
    assert any(name == "full mask" for name, _ in block_rows(recorded))
    assert not any(name == "full mask" for name, _ in block_rows(joint(settings, 1.0).record(settings)))
    with pytest.raises(AdaptError, match="full_mask must be true or false"):
        check_settings(dataclasses.replace(recorded, full_mask="yes"), None, "ckpt")


def test_a_checkpoint_without_shift_is_refused(converted) -> None:  # noqa: ANN001
    _, _, settings = load_diffusion_model(converted["llama"], device="cpu")
    with pytest.raises(AdaptError, match="needs a checkpoint with shift"):
        joint(dataclasses.replace(settings, shift=False), 1.0)


def test_joint_training_logs_both_terms_and_the_export_records_the_weight(llama_diffusion, tmp_path) -> None:  # noqa: ANN001
    from adapt.tiny import SAMPLE_TEXT
    from adapt.training.config import load_recipe
    from adapt.training.run import run

    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join([SAMPLE_TEXT] * 4))
    overrides = [f"model.path={llama_diffusion}", f"data.path={corpus}", f"data.eval_path={corpus}",
                 f"training.output_dir={tmp_path / 'run'}", "data.max_length=32", "diffusion.block_size=4",
                 "diffusion.block_schedule=null", "diffusion.clean_attention=causal",
                 "diffusion.ar_loss_weight=0.5", "training.max_steps=4", "training.eval_every=2",
                 "training.eval_batches=2", "training.checkpoint_every=0", "logging.report_to=[]",
                 "logging.progress_bar=false", "logging.log_every=1"]  # fmt: skip
    state, final = run(load_recipe("recipes/block_text.yaml", overrides))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ar_losses = [m["ar_loss"] for m in lines if "ar_loss" in m]
    assert len(ar_losses) == 4 and all(0 < a < 20 for a in ar_losses)
    evals = [m for m in lines if "eval_loss" in m]
    assert evals and all(0 < m["eval_ar_loss"] < 20 for m in evals)
    assert state.eval_ar_loss == evals[-1]["eval_ar_loss"]
    config = json.loads((final / "config.json").read_text())
    assert config["diffusion"]["ar_loss_weight"] == 0.5 and config["diffusion"]["clean_attention"] == "causal"
    # the export is a stock checkpoint: run causally, its loss is the AR stream's
    stock = AutoModelForCausalLM.from_pretrained(final, is_causal=True).eval()
    ours, tokenizer, settings = load_diffusion_model(final, device="cpu")
    assert settings.ar_loss_weight == 0.5
    ids = torch.tensor([tokenizer(SAMPLE_TEXT[:200])["input_ids"][:24]])
    inputs = joint(settings, 1.0).inputs(
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None, torch.Generator(), torch.float32
    )
    with torch.no_grad():
        torch.testing.assert_close(loss(ours, ar_part(inputs)), stock(input_ids=ids, labels=ids).loss)


# ----------------------------------------------------------------------------- the AR term against a teacher


def teacher_objective(converted, tiny_models, arch: str, block: int = 4):  # noqa: ANN001, ANN201
    from adapt.training.objectives.teacher import load_teacher

    model, tokenizer, settings = load_diffusion_model(converted[arch], device="cpu")
    probe = ordinary_token_ids(model, tokenizer)
    teacher = load_teacher(str(tiny_models[arch]), tokenizer, model, "cpu", torch.float32, probe)
    objective = BlockDiffusion(joint(settings, 1.0, block).config, settings, teacher=teacher)
    return model, tokenizer, objective


def hand_kl(source_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row written out: sum_v p_v (log p_v - log q_v), the teacher's rows padded with 0."""
    p = source_logits.double().softmax(-1)
    logq = student_logits.double().log_softmax(-1)
    return (p * (p.log() - logq[:, : p.shape[-1]])).sum(-1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
def test_the_teacher_term_is_the_kl_to_the_source_s_next_token_distribution(
    converted, tiny_models, arch
) -> None:  # noqa: ANN001
    model, tokenizer, objective = teacher_objective(converted, tiny_models, arch)
    batch = random_batch(tokenizer, rows=2, length=12, seed=11)
    inputs = objective.inputs(batch, 0, torch.Generator().manual_seed(2), torch.float32)
    entries = ar_part(inputs)
    assert entries["soft_targets"].shape == (22, model.get_output_embeddings().weight.shape[0])
    with torch.no_grad():
        _, nll, _ = TokenLoss(model)(**inputs)
        source = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
        clean = entries["cols"] - batch["input_ids"].shape[1]
        want_p = source(**batch).logits[entries["rows"], clean]
        causal = AutoModelForCausalLM.from_pretrained(converted[arch], is_causal=True).eval()
        student = causal(**batch).logits[entries["rows"], clean]
    kl = nll[inputs["ar"]]
    torch.testing.assert_close(kl.double(), hand_kl(want_p, student), rtol=1e-4, atol=1e-5)
    # the unchanged converted model is its source but for the mask row (its whole KL: the mass the new
    # row takes, -log(1 - q_mask)), far below the tokens' cross-entropy the term replaces
    assert float(kl.max()) < 0.1 * float(F.cross_entropy(student, entries["targets"]))
    # evaluation (step None) keeps the tokens' cross-entropy: held-out eval_ar_loss means what it did
    assert "soft_targets" not in objective.inputs(batch, None, torch.Generator(), torch.float32)


def test_the_teacher_term_moves_the_model_towards_the_teacher(converted, tiny_models) -> None:  # noqa: ANN001
    """Gradients of the joint loss with a teacher = diffusion + the KL's, from separate computations; a few
    steps on the KL alone bring a perturbed model back towards the teacher."""
    model, tokenizer, objective = teacher_objective(converted, tiny_models, "llama")
    batch = random_batch(tokenizer, rows=2, length=16, seed=12)
    with torch.no_grad():  # move the student away from its source
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    inputs = objective.inputs(batch, 0, torch.Generator().manual_seed(4), torch.float32)
    diffusion = joint(objective.settings, 0.0).inputs(
        batch, 0, torch.Generator().manual_seed(4), torch.float32
    )
    entries = ar_part(inputs)

    def kl_by_hand() -> torch.Tensor:
        logits = logits_of(model, entries)
        logq = logits.float().log_softmax(-1)
        p = entries["soft_targets"]
        return (torch.xlogy(p, p) - p * logq).sum(-1).mean()

    def grads(value: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        value.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    joint_loss = TokenLoss(model)(**inputs)[0]
    g_joint = grads(joint_loss)
    d_loss = TokenLoss(model)(**diffusion)[0]
    g_diff = grads(d_loss)
    k_loss = kl_by_hand()
    g_kl = grads(k_loss)
    torch.testing.assert_close(joint_loss, d_loss + k_loss, rtol=1e-5, atol=1e-5)
    for gj, gd, gk in zip(g_joint, g_diff, g_kl, strict=True):
        torch.testing.assert_close(gj, gd + gk, rtol=1e-4, atol=1e-6)
    before = float(k_loss.detach())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        ar = ar_part(objective.inputs(batch, 0, torch.Generator().manual_seed(4), torch.float32))
        TokenLoss(model)(**ar)[0].backward()
        opt.step()
    assert float(kl_by_hand()) < 0.7 * before


def test_the_teacher_sees_padding_and_packed_documents_as_the_source_does(converted, tiny_models) -> None:  # noqa: ANN001
    _, tokenizer, objective = teacher_objective(converted, tiny_models, "qwen2", block=2)
    gen = torch.Generator().manual_seed(13)
    long = torch.randint(10, len(tokenizer) - 1, (10,), generator=gen)
    short = torch.randint(10, len(tokenizer) - 1, (7,), generator=gen)
    pad = tokenizer.pad_token_id
    source = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"]).eval()

    def soft(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = ar_part(objective.inputs(batch, 0, torch.Generator().manual_seed(1), torch.float32))
        return inputs["soft_targets"], inputs["rows"]

    def alone(row: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return source(input_ids=row[None]).logits[0, :-1].softmax(-1)

    padded = {
        "input_ids": torch.stack([long, torch.cat([torch.full((3,), pad), short])]),
        "attention_mask": torch.tensor([[1] * 10, [0] * 3 + [1] * 7]),
    }
    probs, rows = soft(padded)
    for r, row in enumerate((long, short)):
        got = probs[rows == r]
        torch.testing.assert_close(got[:, : source.config.vocab_size], alone(row), rtol=1e-4, atol=1e-6)
        assert float(got[:, source.config.vocab_size :].abs().sum()) == 0.0  # rows the teacher lacks
    packed = {
        "input_ids": torch.cat([long[:6], short[:4]])[None],
        "attention_mask": torch.ones(1, 10, dtype=torch.long),
        "segment_ids": torch.tensor([[0] * 6 + [1] * 4]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]),
    }
    probs, _ = soft(packed)
    want = torch.cat([alone(long[:6]), alone(short[:4])])
    torch.testing.assert_close(probs[:, : source.config.vocab_size], want, rtol=1e-4, atol=1e-6)


def test_a_teacher_with_other_tokens_or_a_wider_vocabulary_is_refused(
    converted, tiny_models, tmp_path
) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    from adapt.training.objectives.teacher import load_teacher

    model, tokenizer, _ = load_diffusion_model(converted["llama"], device="cpu")
    source = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    theirs = AutoTokenizer.from_pretrained(tiny_models["llama"])
    theirs.add_tokens(["<not-the-mask>"])  # the id the converted model gave its mask token
    source.save_pretrained(tmp_path / "other")
    theirs.save_pretrained(tmp_path / "other")
    with pytest.raises(AdaptError, match="another tokenizer .*'<not-the-mask>'"):
        load_teacher(str(tmp_path / "other"), tokenizer, model, "cpu", torch.float32, [10])
    source.resize_token_embeddings(len(tokenizer) + 64)
    source.save_pretrained(tmp_path / "wide")
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(tmp_path / "wide")
    with pytest.raises(AdaptError, match="predicts .* tokens, more than the model's"):
        load_teacher(str(tmp_path / "wide"), tokenizer, model, "cpu", torch.float32, [10])


def test_a_run_with_a_teacher_starts_near_zero_and_keeps_eval_as_cross_entropy(
    llama_src,
    llama_diffusion,
    tmp_path,  # noqa: ANN001
) -> None:
    from adapt.tiny import SAMPLE_TEXT
    from adapt.training.config import load_recipe
    from adapt.training.run import run

    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join([SAMPLE_TEXT] * 4))

    def train(out: str, *extra: str) -> list[dict]:
        overrides = [f"model.path={llama_src}", f"data.path={corpus}", f"data.eval_path={corpus}",
                     f"training.output_dir={tmp_path / out}", "data.max_length=32", "diffusion.block_size=4",
                     "diffusion.block_schedule=null", "diffusion.clean_attention=causal",
                     "diffusion.ar_loss_weight=1", "training.max_steps=2", "training.eval_every=2",
                     "training.eval_batches=2", "training.checkpoint_every=0", "logging.report_to=[]",
                     "logging.progress_bar=false", "logging.log_every=1", *extra]  # fmt: skip
        run(load_recipe("recipes/block_text.yaml", overrides))
        return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    kl = train("kl", f"diffusion.ar_teacher={llama_src}")
    ce = train("ce")
    assert kl[0]["ar_loss"] < 0.1 * ce[0]["ar_loss"]  # step 1: the same weights, KL ~0 against CE ~ln V
    ev_kl, ev_ce = (next(m for m in lines if "eval_ar_loss" in m) for lines in (kl, ce))
    assert ev_kl["eval_ar_loss"] > 1.0 and ev_ce["eval_ar_loss"] > 1.0  # both the tokens' cross-entropy
    recipe = (tmp_path / "kl" / "final" / "recipe.yaml").read_text()
    assert f"ar_teacher: {llama_src}" in recipe  # the export's recipe (and model card) name the teacher


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize(
    ("diffusion", "copies", "teacher_copies"),
    [
        ([], 1, 0),  # logits and gradients at the masked half
        (["diffusion.ar_loss_weight=1"], 3, 0),  # + both at every clean token
        (["diffusion.ar_loss_weight=1", "diffusion.full_mask=true"], 4, 0),  # every response token masked
        (["diffusion.ar_loss_weight=1", "diffusion.ar_teacher=SRC"], 3, 1),  # + the teacher's probabilities
        (["diffusion.ar_loss_weight=1", "diffusion.full_mask=true", "diffusion.ar_teacher=SRC"], 4, 1),
    ],
)
def test_the_memory_check_counts_the_logits_the_objective_reads_and_the_teachers_share(
    llama_diffusion,  # noqa: ANN001
    llama_src,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
    diffusion: list[str],
    copies: int,
    teacher_copies: int,
    chunked: bool,
) -> None:
    """check_batch's logits term is b x L x V x 4 bytes per copy of the logits the loss reads (hand-counted
    copies), or one chunk's logits and gradient and the decoder's last hidden states where the loss
    chunks them; a teacher's probabilities are
    one more copy, whole; its weights count at this rank's share, at 2 bytes a parameter."""
    from adapt.core.bounds import MEMORY_LIMIT_ENV, read_weights
    from adapt.training.config import load_recipe
    from adapt.training.model import check_batch, step_logits
    from adapt.training.objectives import loss

    block = ["diffusion.block_size=4", "diffusion.clean_attention=causal", "diffusion.anneal_steps=0"]
    keys = [k.replace("SRC", str(llama_src)) for k in diffusion]
    sizes = ["data.max_length=32", "training.batch_size=2"]
    overrides = [f"model.path={llama_diffusion}", *sizes, *block, *keys]
    recipe = load_recipe("recipes/multi_process.yaml", overrides)
    config = AutoModelForCausalLM.from_pretrained(llama_diffusion).config
    vocab, hidden = config.vocab_size, config.hidden_size
    if chunked:  # 10 rows of logits at a time: the smallest objective reads 32
        monkeypatch.setenv(loss.CHUNK_ENV, str(10 * vocab))
    one = 2 * 32 * vocab * 4
    model_part = [8 * 10 * vocab, 2 * 32 * hidden * 4] if chunked else [copies * one]
    terms = step_logits(recipe, vocab, hidden)
    assert [t.bytes for t in terms] == model_part + [one] * teacher_copies, terms
    assert ("chunk" in terms[0].what) == chunked
    assert chunked or ("full_mask" in terms[0].what) == ("diffusion.full_mask=true" in keys)
    if not diffusion and not chunked:  # 32 rows read, over one chunk of 20 but under two: not chunked,
        monkeypatch.setenv(loss.CHUNK_ENV, str(20 * vocab))  # yet counted at most as a chunked loss holds
        assert step_logits(recipe, vocab, hidden)[0].bytes == 8 * 20 * vocab < copies * one
        monkeypatch.delenv(loss.CHUNK_ENV)
    weights = read_weights(llama_diffusion).bytes_in(torch.float32)
    teacher = read_weights(llama_src).params * 2 if recipe.diffusion.ar_teacher else 0
    need = weights + sum(model_part) + teacher_copies * one + teacher
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(need))
    check_batch(recipe, "cpu")  # exactly what it counts ...
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(need - 1))
    with pytest.raises(AdaptError, match="chunk of the logits" if chunked else "logits and their gradients"):
        check_batch(recipe, "cpu")  # ... and not a byte less
    if teacher:
        monkeypatch.setenv(MEMORY_LIMIT_ENV, str(need - teacher // 2))
        check_batch(recipe, "cpu", teacher_share=0.5)
        with pytest.raises(AdaptError, match="teacher's weights"):
            check_batch(recipe, "cpu", teacher_share=1.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_big_logits_are_computed_a_chunk_at_a_time_with_the_same_loss_and_gradients(
    converted,
    tiny_models,
    arch: str,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """Over twice ADAPT_LOGITS_CHUNK logits, the loss reads the head a chunk of rows at a time and
    recomputes each chunk in the backward pass: the joint objective's loss (cross-entropy and the
    teacher's KL), its per-entry nll, accuracy and gradients equal the whole-logits computation; the
    teacher's probabilities too. The head's calls are counted: one per chunk forward, again in the
    backward."""
    from adapt.training.objectives import loss as loss_module

    model, tokenizer, objective = teacher_objective(converted, tiny_models, arch)
    batch = random_batch(tokenizer, rows=2, length=12, seed=5)
    inputs = objective.inputs(batch, 0, torch.Generator().manual_seed(3), torch.float32)
    width = model.get_output_embeddings().weight.shape[0]
    runs, calls, teacher_calls = {}, [], []  # one entry per call of the model's and the teacher's head
    head = model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    teacher_lm = objective.teacher.scorer.model
    on_call = lambda *_: teacher_calls.append(0)  # noqa: E731
    teacher_head = teacher_lm.get_output_embeddings().register_forward_hook(on_call)
    for name, rows in (("whole", 10**6), ("chunked", 5)):
        monkeypatch.setenv(loss_module.CHUNK_ENV, str(rows * width))
        model.zero_grad()
        calls.clear()
        teacher_calls.clear()
        loss, nll, correct = TokenLoss(model)(**inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        clean_positions = inputs["position_ids"][:, batch["input_ids"].shape[1] :]  # [x_t ; x_0]: x_0's
        probs = objective.teacher.probabilities(batch, clean_positions, *ar_rows(inputs, batch))
        runs[name] = (loss.detach(), nll, correct, grads, probs, len(calls), len(teacher_calls))
        chunk = loss_module.chunk_rows(teacher_lm)
    head.remove()
    teacher_head.remove()
    n, m = len(inputs["targets"]), len(probs)
    assert n > 10 and runs["whole"][5] == 1 and runs["chunked"][5] == 2 * math.ceil(n / 5)
    assert runs["whole"][6] == 1 and runs["chunked"][6] == math.ceil(m / chunk) > 1
    (a, b) = runs["whole"], runs["chunked"]
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(b[2], a[2]) and a[3].keys() == b[3].keys()
    for name in a[3]:
        torch.testing.assert_close(b[3][name], a[3][name], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b[4], a[4], rtol=1e-5, atol=1e-7)


def ar_rows(inputs: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The AR term's (rows, clean columns): where the teacher is read."""
    entries = ar_part(inputs)
    return entries["rows"], entries["cols"] - batch["input_ids"].shape[1]
