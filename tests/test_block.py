"""Block diffusion (BD3-LM) training objective: masks by hand, the one-pass loss against a per-block
reference, kernels, the B = l and B = 1 limits, padding, packing and the recipe's checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from adapt.core.attention import block_causal_allowed, block_pair_allowed
from adapt.core.errors import AdaptError
from adapt.loading.model import load_diffusion_model
from adapt.training.config import DiffusionConfig, recipe_from_dict
from adapt.training.objectives import make_objective
from adapt.training.objectives.block import BlockDiffusion, block_index, pair_inputs
from adapt.training.objectives.loss import TokenLoss
from adapt.training.objectives.masked import MaskedDiffusion


def grid(text: str) -> torch.Tensor:
    rows = [r.replace(" ", "") for r in text.strip().splitlines()]
    return torch.tensor([[c == "1" for c in r] for r in rows])


# Rows are queries, columns keys; the first 8 of each are x_t (noisy), the last 8 x_0 (clean).
PAIR_L8_B2 = grid("""
11000000 00000000
11000000 00000000
00110000 11000000
00110000 11000000
00001100 11110000
00001100 11110000
00000011 11111100
00000011 11111100
00000000 11000000
00000000 11000000
00000000 11110000
00000000 11110000
00000000 11111100
00000000 11111100
00000000 11111111
00000000 11111111
""")

PAIR_L8_B4 = grid("""
11110000 00000000
11110000 00000000
11110000 00000000
11110000 00000000
00001111 11110000
00001111 11110000
00001111 11110000
00001111 11110000
00000000 11110000
00000000 11110000
00000000 11110000
00000000 11110000
00000000 11111111
00000000 11111111
00000000 11111111
00000000 11111111
""")

# clean_attention causal: the noisy half as above, each clean token sees the clean tokens up to itself
PAIR_L8_B2_CAUSAL_CLEAN = grid("""
11000000 00000000
11000000 00000000
00110000 11000000
00110000 11000000
00001100 11110000
00001100 11110000
00000011 11111100
00000011 11111100
00000000 10000000
00000000 11000000
00000000 11100000
00000000 11110000
00000000 11111000
00000000 11111100
00000000 11111110
00000000 11111111
""")

CAUSAL_L8_B2 = grid("""
11000000
11000000
11110000
11110000
11111100
11111100
11111111
11111111
""")


@pytest.mark.parametrize(("block", "expected"), [(2, PAIR_L8_B2), (4, PAIR_L8_B4)])
def test_pair_mask_matches_hand_written(block: int, expected: torch.Tensor) -> None:
    positions = torch.arange(8)[None]
    got = block_pair_allowed(positions, block, torch.ones(1, 8, dtype=torch.long))
    assert got.shape == (1, 1, 16, 16)
    assert torch.equal(got[0, 0], expected)


def test_pair_mask_with_causal_clean_attention_matches_hand_written() -> None:
    got = block_pair_allowed(torch.arange(8)[None], 2, torch.ones(1, 8, dtype=torch.long), clean="causal")
    assert torch.equal(got[0, 0], PAIR_L8_B2_CAUSAL_CLEAN)
    # left padding and packed documents: the pattern of each real document alone, shifted
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    padded = block_pair_allowed((am.cumsum(-1) - 1).clamp(min=0), 2, am, clean="causal")[0, 0]
    alone = block_pair_allowed(torch.arange(6)[None], 2, torch.ones(1, 6, dtype=torch.long), clean="causal")
    real = torch.tensor([2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15])
    assert torch.equal(padded[real][:, real], alone[0, 0])
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    packed = block_pair_allowed(pos, 2, torch.ones_like(seg), seg, clean="causal")[0, 0]
    second = torch.tensor([3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
    doc = block_pair_allowed(torch.arange(5)[None], 2, torch.ones(1, 5, dtype=torch.long), clean="causal")
    assert torch.equal(packed[second][:, second], doc[0, 0])


def test_block_causal_mask_matches_hand_written() -> None:
    got = block_causal_allowed(torch.arange(8)[None], 2)
    assert torch.equal(got[0, 0], CAUSAL_L8_B2)
    # decoding a causal-clean checkpoint: committed positions (< 4) attend causally, the open block not
    settled = block_causal_allowed(torch.arange(8)[None], 2, causal_before=4)[0, 0]
    expected = CAUSAL_L8_B2.clone()
    expected[:4] = torch.ones(4, 8, dtype=torch.bool).tril()
    assert torch.equal(settled, expected)


def test_masks_follow_positions_padding_and_documents() -> None:
    # left padding: blocks follow positions, so a padded row's pattern is the unpadded one shifted
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    positions = (am.cumsum(-1) - 1).clamp(min=0)
    padded = block_pair_allowed(positions, 2, am)[0, 0]
    alone = block_pair_allowed(torch.arange(6)[None], 2, torch.ones(1, 6, dtype=torch.long))[0, 0]
    real = torch.tensor([2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15])
    assert torch.equal(padded[real][:, real], alone)
    assert not padded[real][:, torch.tensor([0, 1, 8, 9])].any()  # nobody sees padding
    # packed documents: a token never sees another document, in either half
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    allowed = block_pair_allowed(pos, 2, torch.ones_like(seg), seg)[0, 0]
    doc = seg[0].repeat(2)
    assert not (allowed & (doc[:, None] != doc[None, :])).any()


def test_block_index_gives_every_block_of_every_document_its_own_index() -> None:
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    seg = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    assert block_index(pos, seg, 2).tolist() == [[0, 0, 1, 1, 2, 3, 3, 4]]
    assert block_index(torch.arange(8)[None], None, 4).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]


# ----------------------------------------------------------------------------- the loss


def block_objective(settings, block: int, **kw) -> BlockDiffusion:  # noqa: ANN001
    return BlockDiffusion(DiffusionConfig(block_size=block, **kw), settings)


def noisy_batch(model, tokenizer, settings, rows: int = 2, length: int = 12, seed: int = 0):  # noqa: ANN001
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    ids = torch.randint(10, vocab, (rows, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def reference_block_loss(  # noqa: ANN201
    model,
    ids,
    masked,
    t,
    block: int,
    shift: bool,
    mask_id: int,
    clean: str = "block",  # noqa: ANN001
):
    """For each block k, run the model on clean blocks < k followed by noisy block k (block-causal; with
    `clean` "causal" the clean tokens attend causally), and score block k's masked tokens; 1/t weights,
    / l, mean over rows. Written without adapt's helpers."""
    rows, length = ids.shape
    total = torch.zeros(())
    for r in range(rows):
        for k in range(-(-length // block)):
            lo, hi = k * block, min((k + 1) * block, length)
            seq = ids[r, :hi].clone()
            noisy = masked[r, lo:hi]
            seq[lo:hi] = torch.where(noisy, torch.full_like(seq[lo:hi], mask_id), seq[lo:hi])
            allowed = torch.zeros(hi, hi, dtype=torch.bool)
            for i in range(hi):
                for j in range(hi):
                    committed = clean == "causal" and i < lo
                    allowed[i, j] = j <= i if committed else j // block <= i // block
            bias = torch.zeros(hi, hi).masked_fill(~allowed, torch.finfo(torch.float32).min)
            with torch.no_grad():
                logits = model(
                    input_ids=seq[None], attention_mask=bias[None, None], position_ids=torch.arange(hi)[None]
                ).logits[0]
            for j in range(lo, hi):
                if masked[r, j]:
                    src = j - 1 if shift else j
                    nll = F.cross_entropy(logits[src].float()[None], ids[r, j][None])
                    total = total + nll / t[r, j]
    return total / length / rows


def loss_of(model, inputs) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        loss, _, _ = TokenLoss(model, fast=True)(**inputs)
    return loss


def recovered_noise(inputs, length: int, mask_id: int):  # noqa: ANN001
    """masked [b, l] and t [b, l] back from the objective's inputs (weights = 1 / (t * l * b))."""
    noisy = inputs["input_ids"][:, :length]
    masked = noisy == mask_id
    rows = noisy.shape[0]
    t = torch.ones(noisy.shape)
    cols = masked.nonzero(as_tuple=True)[1]
    t[inputs["rows"], cols] = 1.0 / (inputs["weights"] * length * rows)
    return masked, t


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
@pytest.mark.parametrize(("block", "clean"), [(2, "block"), (4, "block"), (2, "causal"), (4, "causal")])
def test_one_pass_loss_equals_per_block_reference(converted, arch: str, block: int, clean: str) -> None:  # noqa: ANN001
    model, tokenizer, settings = load_diffusion_model(converted[arch], device="cpu")
    batch = noisy_batch(model, tokenizer, settings)
    objective = block_objective(settings, block, clean_attention=clean)
    inputs = objective.inputs(batch, None, torch.Generator().manual_seed(1), torch.float32)
    masked, t = recovered_noise(inputs, 12, settings.mask_token_id)
    assert masked.any() and not masked[:, 0].any()
    expected = reference_block_loss(
        model, batch["input_ids"], masked, t, block, settings.shift, settings.mask_token_id, clean
    )
    torch.testing.assert_close(loss_of(model, inputs), expected, rtol=1e-5, atol=1e-5)
    if clean == "causal":  # the two clean patterns give different losses: the test can tell them apart
        other = reference_block_loss(
            model, batch["input_ids"], masked, t, block, settings.shift, settings.mask_token_id
        )
        assert not torch.allclose(other, expected, rtol=1e-5, atol=1e-5)


def test_one_pass_loss_without_shift_and_with_partial_last_block(converted) -> None:  # noqa: ANN001
    model, tokenizer, settings = load_diffusion_model(converted["llama"], device="cpu")
    settings = dataclasses.replace(settings, shift=False)
    batch = noisy_batch(model, tokenizer, settings, length=10)  # blocks of 4: 4 + 4 + 2
    inputs = block_objective(settings, 4).inputs(batch, None, torch.Generator().manual_seed(2), torch.float32)
    masked, t = recovered_noise(inputs, 10, settings.mask_token_id)
    expected = reference_block_loss(model, batch["input_ids"], masked, t, 4, False, settings.mask_token_id)
    torch.testing.assert_close(loss_of(model, inputs), expected, rtol=1e-5, atol=1e-5)


def test_each_block_draws_its_own_t(converted) -> None:  # noqa: ANN001
    model, tokenizer, settings = load_diffusion_model(converted["llama"], device="cpu")
    batch = noisy_batch(model, tokenizer, settings, rows=2, length=32)
    inputs = block_objective(settings, 4).inputs(batch, None, torch.Generator().manual_seed(3), torch.float32)
    t = 1.0 / (inputs["weights"] * 32 * 2)
    blocks = inputs["rows"] * 8 + inputs["cols"].remainder(32).add(int(settings.shift)) // 4
    per_block = {int(b): set(t[blocks == b].tolist()) for b in blocks.unique()}
    assert all(len(v) == 1 for v in per_block.values())  # one t inside a block
    assert len({v.pop() for v in per_block.values()}) == len(per_block)  # different t across blocks


def test_sdpa_and_eager_agree(converted) -> None:  # noqa: ANN001
    sdpa, tokenizer, settings = load_diffusion_model(
        converted["llama"], device="cpu", attn_implementation="sdpa"
    )
    eager, _, _ = load_diffusion_model(converted["llama"], device="cpu", attn_implementation="eager")
    batch = noisy_batch(sdpa, tokenizer, settings, length=16)
    inputs = block_objective(settings, 4).inputs(batch, None, torch.Generator().manual_seed(4), torch.float32)
    torch.testing.assert_close(loss_of(sdpa, inputs), loss_of(eager, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_of_whole_length_is_the_full_attention_objective(converted, arch: str) -> None:  # noqa: ANN001
    model, tokenizer, settings = load_diffusion_model(converted[arch], device="cpu")
    batch = noisy_batch(model, tokenizer, settings, rows=3, length=12)
    full = MaskedDiffusion(DiffusionConfig(), settings)
    block = block_objective(settings, 12)
    a = full.inputs(batch, None, torch.Generator().manual_seed(5), torch.float32)
    b = block.inputs(batch, None, torch.Generator().manual_seed(5), torch.float32)
    assert torch.equal(a["input_ids"], b["input_ids"][:, :12])  # the same noise
    torch.testing.assert_close(loss_of(model, b), loss_of(model, a), rtol=1e-5, atol=1e-6)


def test_block_of_one_with_shift_is_the_ar_model(converted, tiny_models) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    model, tokenizer, settings = load_diffusion_model(converted["llama"], device="cpu")
    source = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    batch = noisy_batch(model, tokenizer, settings, rows=2, length=10)
    inputs = block_objective(settings, 1).inputs(batch, None, torch.Generator().manual_seed(6), torch.float32)
    ids = batch["input_ids"]
    with torch.no_grad():
        got = TokenLoss(model).logits_at(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["position_ids"],
            inputs["rows"],
            inputs["cols"],
        )
        ar = source(input_ids=ids).logits  # [b, l, V_src]
    cols = inputs["cols"] - ids.shape[1]  # every prediction is read from the clean half
    assert bool((cols >= 0).all())
    vocab = ar.shape[-1]
    torch.testing.assert_close(got[:, :vocab], ar[inputs["rows"], cols], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("clean", ["block", "causal"])
def test_left_padding_leaves_every_row_s_predictions_unchanged(converted, clean: str) -> None:  # noqa: ANN001
    model, tokenizer, settings = load_diffusion_model(converted["qwen2"], device="cpu")
    settings = dataclasses.replace(settings, clean_attention=clean)
    gen = torch.Generator().manual_seed(7)
    long = torch.randint(10, len(tokenizer), (12,), generator=gen)
    short = torch.randint(10, len(tokenizer), (9,), generator=gen)
    masked_long = torch.rand(12, generator=gen) < 0.5
    masked_short = torch.rand(9, generator=gen) < 0.5
    masked_long[0] = masked_short[0] = False
    t_long, t_short = torch.full((12,), 0.5), torch.full((9,), 0.5)

    def nll_of(ids, am, masked, t):  # noqa: ANN001, ANN202
        positions = (am.cumsum(-1) - 1).clamp(min=0)
        inputs = pair_inputs(ids, am, positions, None, masked, t, masked, 4, settings, False, torch.float32)
        with torch.no_grad():
            _, nll, _ = TokenLoss(model)(**inputs)
        return nll, inputs["rows"]

    pad = tokenizer.pad_token_id
    ids = torch.stack([long, torch.cat([torch.full((3,), pad), short])])
    am = torch.tensor([[1] * 12, [0] * 3 + [1] * 9])
    masked = torch.stack([masked_long, torch.cat([torch.zeros(3, dtype=torch.bool), masked_short])])
    t = torch.stack([t_long, torch.cat([torch.ones(3), t_short])])
    batch_nll, rows = nll_of(ids, am, masked, t)
    alone_long, _ = nll_of(long[None], torch.ones(1, 12, dtype=torch.long), masked_long[None], t_long[None])
    alone_short, _ = nll_of(
        short[None], torch.ones(1, 9, dtype=torch.long), masked_short[None], t_short[None]
    )
    torch.testing.assert_close(batch_nll[rows == 0], alone_long, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch_nll[rows == 1], alone_short, rtol=1e-5, atol=1e-5)


def test_complementary_masking_covers_every_maskable_token_once(converted) -> None:  # noqa: ANN001
    model, tokenizer, settings = load_diffusion_model(converted["llama"], device="cpu")
    batch = noisy_batch(model, tokenizer, settings, rows=2, length=16)
    objective = block_objective(settings, 4, complementary_masking=True)
    inputs = objective.inputs(batch, None, torch.Generator().manual_seed(8), torch.float32)
    noisy = inputs["input_ids"][:, :16]
    assert noisy.shape[0] == 4
    masked = noisy == settings.mask_token_id
    both = masked[:2].long() + masked[2:].long()
    assert torch.equal(both[:, 1:], torch.ones_like(both[:, 1:]))  # position 0 is never maskable (shift)
    assert bool((both[:, 0] == 0).all())
    t = 1.0 / (inputs["weights"] * 16 * 2 * 2)
    first, second = t[inputs["rows"] < 2], t[inputs["rows"] >= 2]
    assert first.min() >= 1e-3 and second.min() >= 1e-3 and second.max() <= 1.0


def test_packed_documents_and_sft_prompts(converted) -> None:  # noqa: ANN001
    model, tokenizer, settings = load_diffusion_model(converted["llama"], device="cpu")
    ids = noisy_batch(model, tokenizer, settings, rows=1, length=10)["input_ids"]
    seg = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "segment_ids": seg,
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]),
    }
    objective = block_objective(settings, 2)
    inputs = objective.inputs(batch, None, torch.Generator().manual_seed(9), torch.float32)
    masked, t = recovered_noise(inputs, 10, settings.mask_token_id)
    # blocks: [0 1] [2 3] [4] | [0 1] [2 3] [4]: six distinct t where masked; doc 2's block 0 has its own
    groups = [(0, 2), (2, 4), (4, 5), (5, 7), (7, 9), (9, 10)]
    for lo, hi in groups:
        values = set(t[0, lo:hi][masked[0, lo:hi]].tolist())
        assert len(values) <= 1
    # the second document's first token is read from the first document's last clean token
    if masked[0, 5]:
        j = (inputs["rows"] == 0) & (inputs["targets"] == ids[0, 5])
        assert 10 + 4 in inputs["cols"][j].tolist()
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    prompt[:, :6] = True
    sft = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_mask": prompt}
    for seed in range(5):
        inputs = objective.inputs(sft, None, torch.Generator().manual_seed(seed), torch.float32)
        assert not (inputs["input_ids"][:, :6] == settings.mask_token_id).any()


# ----------------------------------------------------------------------------- schedule and recipe


def recipe(**diffusion) -> dict:  # noqa: ANN003
    return {"model": {"path": "m"}, "data": {"path": "d", "max_length": 16}, "diffusion": diffusion}


def test_schedule_gives_block_size_by_step() -> None:
    config = DiffusionConfig(block_size=8, block_schedule=[[0, 1], [10, 2], [20, 8]])
    objective = make_objective(config, settings=None)  # type: ignore[arg-type]
    assert isinstance(objective, BlockDiffusion)
    sizes = [objective.block_size_at(s) for s in (0, 9, 10, 19, 20, 500)]
    assert sizes == [1, 1, 2, 2, 8, 8]
    assert objective.block_size_at(None) == 8
    assert isinstance(make_objective(DiffusionConfig(), settings=None), MaskedDiffusion)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("diffusion", "message"),
    [
        ({"block_size": 5}, "must divide data.max_length (16); valid block sizes: 1, 2, 4, 8, 16"),
        ({"block_size": 32}, "block size 32 must divide data.max_length (16)"),
        ({"block_size": 0}, "diffusion.block_size must be >= 1"),
        ({"block_size": 4, "block_schedule": [[0, 1], [10, 2], [5, 4]]}, "strictly increasing"),
        ({"block_size": 4, "block_schedule": [[3, 1], [10, 4]]}, "must start at step 0"),
        ({"block_size": 4, "block_schedule": [[0, 1], [10, 2]]}, "must end at diffusion.block_size (4)"),
        ({"block_size": 4, "block_schedule": [[0, 3], [10, 4]]}, "block size 3 must divide"),
        ({"block_size": 4, "block_schedule": [[0]]}, "list of [step, block_size] pairs"),
        ({"block_schedule": [[0, 1]]}, "needs diffusion.block_size"),
        ({"block_size": 4, "anneal_steps": 10}, "anneal_steps does not apply to block diffusion"),
        ({"block_size": "big"}, "diffusion.block_size must be an integer"),
        ({"clean_attention": "causal"}, "diffusion.clean_attention=causal needs diffusion.block_size"),
        ({"block_size": 4, "clean_attention": "full"}, "diffusion.clean_attention"),
    ],
)
def test_bad_block_settings_are_refused(diffusion: dict, message: str) -> None:
    with pytest.raises(AdaptError) as e:
        recipe_from_dict(recipe(**diffusion))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_valid_block_recipe_loads() -> None:
    r = recipe_from_dict(recipe(block_size=4, block_schedule=[[0, 1], [5, 2], [9, 4]]))
    assert r.diffusion.block_sizes() == [1, 2, 4]


# ----------------------------------------------------------------------------- training


def test_block_recipes_train_export_and_chain_through_the_cli(llama_src, tmp_path) -> None:  # noqa: ANN001
    import json

    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from adapt.cli import app

    torch.set_num_threads(1)
    quiet = ["logging.report_to=[]", "logging.progress_bar=false", "logging.log_every=1"]
    first = tmp_path / "block_text"
    args = [f"model.path={llama_src}", *quiet, "training.max_steps=8", "data.max_length=32",
            "diffusion.block_size=8", "diffusion.block_schedule=[[0, 1], [3, 4], [6, 8]]"]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(
        app, ["finetune", "recipes/block_text.yaml", f"training.output_dir={first}", *args]
    )
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    sizes = {m["step"]: m["block_size"] for m in logged if "block_size" in m}
    assert sizes == {1: 1, 2: 1, 3: 1, 4: 4, 5: 4, 6: 4, 7: 8, 8: 8}  # step s logs the size used at s - 1
    exported = first / "final"
    config = json.loads((exported / "config.json").read_text())
    assert config["diffusion"]["block_size"] == 8 and config["is_causal"] is False
    AutoModelForCausalLM.from_pretrained(exported)  # stock transformers loads it
    assert config["diffusion"]["clean_attention"] == "block"
    # SFT of the block checkpoint, keeping its block size, its clean tokens now attending causally
    second = tmp_path / "block_chat"
    args = [f"model.path={exported}", *quiet, "training.max_steps=2", "data.max_length=32",
            "diffusion.block_size=8", "diffusion.clean_attention=causal"]  # fmt: skip
    result = runner.invoke(
        app, ["finetune", "recipes/block_chat.yaml", f"training.output_dir={second}", *args]
    )
    assert result.exit_code == 0, result.output
    recorded = json.loads((second / "final/config.json").read_text())["diffusion"]
    assert recorded["block_size"] == 8 and recorded["clean_attention"] == "causal"
    assert load_diffusion_model(second / "final", device="cpu")[2].clean_attention == "causal"
    # a block size the sequence length cannot hold is one line, exit 1, nothing written
    bad = tmp_path / "bad"
    result = runner.invoke(
        app,
        [
            "finetune",
            "recipes/block_text.yaml",
            f"training.output_dir={bad}",
            "diffusion.block_size=5",
            "diffusion.block_schedule=null",
        ],
    )
    assert result.exit_code == 1 and "block size 5 must divide data.max_length (128)" in result.output
    assert not bad.exists()


def test_block_objective_learns_and_resumes_exactly(llama_diffusion, tmp_path) -> None:  # noqa: ANN001
    import json
    import shutil

    from adapt.training.config import load_recipe
    from adapt.training.loop import fit
    from adapt.training.setup import setup

    torch.set_num_threads(1)
    corpus = tmp_path / "repeated.txt"
    corpus.write_text("\n\n".join(["The miller's daughter counted the sacks of grain every morning."] * 40))

    def recipe(out, *extra):  # noqa: ANN001, ANN002, ANN202
        base = [f"model.path={llama_diffusion}", f"training.output_dir={out}", f"data.path={corpus}",
                "logging.report_to=[]", "logging.progress_bar=false", "logging.log_every=1",
                "data.max_length=32", "diffusion.block_size=8", "training.warmup_steps=0"]  # fmt: skip
        return load_recipe("recipes/block_text.yaml", [*base, *extra])

    def curve(out):  # noqa: ANN001, ANN202
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {m["step"]: m["loss"] for m in lines if "loss" in m}

    learn = tmp_path / "learn"
    state = fit(setup(recipe(learn, "training.max_steps=40", "training.lr=3e-3",
                             "diffusion.block_schedule=[[0, 1], [10, 8]]")))  # fmt: skip
    losses = curve(learn)
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < 0.6 * first, losses
    assert state.eval_loss is not None and state.eval_loss < first

    settings = ["training.max_steps=6", "training.checkpoint_every=3", "training.export=false",
                "training.batch_size=4", "diffusion.block_schedule=[[0, 2], [4, 8]]"]  # fmt: skip
    full = tmp_path / "full"
    fit(setup(recipe(full, *settings)))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints/step-00000003", resumed / "checkpoints/step-00000003")
    fit(setup(recipe(resumed, *settings)))
    reference, again = curve(full), curve(resumed)
    assert sorted(again) == [4, 5, 6] and [again[s] for s in again] == [reference[s] for s in again]


# ----------------------------------------------------------------------------- evaluation


def exact_block_elbo(model, window: torch.Tensor, block: int, mask_id: int) -> float:  # noqa: ANN001
    """Sum over blocks of E_t[(1/t) sum_masked CE | clean blocks before] by enumerating every mask
    pattern of every block (shift: position 0 is context), per predicted token."""
    import itertools
    import math

    def beta(k: int, n: int) -> float:  # integral of (1/t) t^k (1 - t)^(n - k) over (0, 1)
        return math.factorial(k - 1) * math.factorial(n - k) / math.factorial(n)

    length = window.numel()
    total = 0.0
    for lo in range(0, length, block):
        hi = min(lo + block, length)
        maskable = [j for j in range(lo, hi) if j > 0]
        n = len(maskable)
        allowed = torch.tensor([[j // block <= i // block for j in range(hi)] for i in range(hi)])
        bias = torch.zeros(hi, hi).masked_fill(~allowed, torch.finfo(torch.float32).min)
        for k in range(1, n + 1):
            for subset in itertools.combinations(maskable, k):
                x = window[:hi].clone()
                x[list(subset)] = mask_id
                with torch.no_grad():
                    logits = model(input_ids=x[None], attention_mask=bias[None, None]).logits[0]
                logp = logits.float().log_softmax(-1)
                total += beta(k, n) * sum(-float(logp[j - 1, window[j]]) for j in subset)
    return total / (length - 1)


def test_block_elbo_monte_carlo_matches_exact_enumeration(converted) -> None:  # noqa: ANN001
    import math

    from adapt.evaluation.evaluate import elbo_samples

    model, tok, settings = load_diffusion_model(converted["llama"], device="cpu")
    settings = settings.with_block_size(2)
    window = torch.tensor(tok("The river ran slowly past")["input_ids"][:6])  # blocks [0 1] [2 3] [4 5]
    exact = exact_block_elbo(model, window, 2, settings.mask_token_id)
    est, tokens = elbo_samples(
        model, window[None], settings, 512, 256, generator=torch.Generator().manual_seed(0)
    )
    assert tokens.tolist() == [5]
    mean, se = float(est.mean()), float(est.std() / math.sqrt(est.numel()))
    assert abs(mean - exact) < 4 * se + 0.01 * exact, (mean, exact, se)
    # deterministic: the evaluation's per-row sum of CE / t is the per-block reference's
    from adapt.evaluation.evaluate import block_masked_nll

    ids = torch.randint(10, len(tok), (3, 10), generator=torch.Generator().manual_seed(1))
    masked = torch.rand(3, 10, generator=torch.Generator().manual_seed(2)) < 0.5
    masked[:, 0] = False
    t = torch.rand(3, 10, generator=torch.Generator().manual_seed(3)).clamp(min=0.1)
    t = t[:, ::2].repeat_interleave(2, dim=1)  # one t per block of 2
    sums = block_masked_nll(model, ids, masked, t, settings, batch_size=2)
    for r in range(3):
        expected = reference_block_loss(model, ids[r : r + 1], masked[r : r + 1], t[r : r + 1], 2, True,
                                        settings.mask_token_id) * 10  # fmt: skip
        assert float(sums[r]) == pytest.approx(float(expected), rel=1e-5)


def test_eval_reports_a_block_checkpoint_with_its_own_bound(converted, tmp_path) -> None:  # noqa: ANN001
    import json
    import shutil

    from adapt.evaluation.evaluate import EvalConfig, evaluate_model
    from adapt.tiny import SAMPLE_TEXT

    path = tmp_path / "block"
    shutil.copytree(converted["llama"], path)
    config = json.loads((path / "config.json").read_text())
    config["diffusion"]["block_size"] = 4
    (path / "config.json").write_text(json.dumps(config))
    data = tmp_path / "eval.txt"
    data.write_text(SAMPLE_TEXT)
    cfg = EvalConfig(data=str(data), seq_len=16, max_sequences=4, mc_samples=2, batch_size=4)
    block, full = evaluate_model(str(path), cfg), evaluate_model(str(converted["llama"]), cfg)
    assert block["block_size"] == 4 and full["block_size"] is None
    assert block["nll"] != full["nll"] and math_ok(block["nll"])
    assert set(block["masked_accuracy"]) == {"0.15", "0.5", "0.9"}


def math_ok(x: float) -> bool:
    import math

    return math.isfinite(x) and x > 0
