"""The tiled pair kernel: exactly sdpa's attention over the block pair (outputs, losses, gradients) on
LLaMA, Qwen2 and Gemma, with padding, packing and both clean rules, while it really computes per tile."""

from __future__ import annotations

import pytest
import torch

import adapt.core.pair_attention as pair_attention
from adapt.core.attention import MaskStyle
from adapt.loading.model import load_diffusion_model
from adapt.training.objectives.loss import TokenLoss
from tests.test_flex import OBJECTIVES, batches, objective_of

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK_OBJECTIVES = [name for name in OBJECTIVES if OBJECTIVES[name][0] == "block"]


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Tiles of 4 query columns (so a 12-token row has 3 per half), and the query lengths sdpa was run on."""
    import transformers.integrations.sdpa_attention as sdpa

    monkeypatch.setattr(pair_attention, "TILE", 4)
    seen: list[int] = []
    original = sdpa.sdpa_attention_forward

    def counted(module, query, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", counted)
    return seen


def step(model, objective, batch):  # noqa: ANN001, ANN201
    inputs = objective.inputs(
        batch, 3, torch.Generator().manual_seed(7), MaskStyle.for_model(model, torch.float32)
    )
    model.zero_grad()
    loss, nll, _ = TokenLoss(model)(**inputs)
    loss.backward()
    return (
        loss.detach(),
        nll.detach(),
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_the_tiled_kernel_has_sdpa_s_loss_and_gradients(arch: str, converted, small_tiles) -> None:  # noqa: ANN001
    dense, _, settings = load_diffusion_model(converted[arch], device="cpu", attn_implementation="sdpa")
    tiled, _, _ = load_diffusion_model(converted[arch], device="cpu", attn_implementation="sdpa")
    pair_attention.use_pair_sdpa(tiled)
    dense.train(), tiled.train()
    layers = tiled.config.num_hidden_layers
    all_batches = batches(dense.config.vocab_size)
    ids = all_batches["padded"]["input_ids"]
    all_batches["unpadded"] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for batch_name, batch in all_batches.items():
        for name in BLOCK_OBJECTIVES:
            objective = objective_of(name, settings)
            want = step(dense, objective, batch)  # plain sdpa: the whole pair at once
            small_tiles.clear()
            got = step(tiled, objective, batch)
            # B = 4: tiles of 4 queries, 3 per half; B = 3: tiles of 3, 4 per half; a plainly causal clean
            # half (no padding, one document) is one causal call over its 12 queries
            size = objective.config.block_size
            per_half = 12 // size
            plain = batch_name == "unpadded" and objective.config.clean_attention == "causal"
            calls = [size] * per_half + ([12] if plain else [size] * per_half)
            assert small_tiles == calls * layers, (name, batch_name, small_tiles)
            where = f"{arch}, {name}, {batch_name}"
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6, msg=where)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5, msg=where)
            for key, value in want[2].items():
                torch.testing.assert_close(got[2][key], value, rtol=1e-4, atol=1e-6, msg=f"{where}, {key}")


def test_without_the_pair_it_is_plain_sdpa(converted, small_tiles) -> None:  # noqa: ANN001
    model, tokenizer, _ = load_diffusion_model(converted["llama"], device="cpu", attn_implementation="sdpa")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    want = model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]])).logits
    pair_attention.use_pair_sdpa(model)
    small_tiles.clear()
    got = model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]])).logits
    assert small_tiles == [6] * model.config.num_hidden_layers
    torch.testing.assert_close(got, want)


def test_the_tiled_step_builds_no_pair_mask(converted) -> None:  # noqa: ANN001
    model, _, settings = load_diffusion_model(converted["llama"], device="cpu", attn_implementation="sdpa")
    pair_attention.use_pair_sdpa(model)
    batch = batches(model.config.vocab_size)["packed"]
    inputs = objective_of("block, causal clean", settings).inputs(
        batch, 0, torch.Generator().manual_seed(0), MaskStyle.for_model(model, torch.float32)
    )
    mask = inputs["attention_mask"]
    assert mask.shape == (2, 1, 24, 24) and mask.untyped_storage().nbytes() == 1  # one element, not 2l x 2l
    assert inputs["pair"].mask_mod is not None and inputs["pair"].length == 12


def test_a_placeholder_mask_without_its_layout_is_refused(converted) -> None:  # noqa: ANN001
    model, _, _ = load_diffusion_model(converted["llama"], device="cpu", attn_implementation="sdpa")
    pair_attention.use_pair_sdpa(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(RuntimeError, match="placeholder mask without the pair's layout"):
        model(input_ids=ids, attention_mask=pair_attention.no_dense_mask(1, 4, ids.device))


@pytest.mark.parametrize("clean", ["block", "causal"])
def test_slices_of_a_dense_mask_give_sdpa_s_attention(clean: str, small_tiles) -> None:  # noqa: ANN001
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from adapt.core.attention import block_pair_allowed

    am = torch.tensor([[1] * 10, [0] * 3 + [1] * 7])
    positions = (am.cumsum(-1) - 1).clamp(min=0)
    mask = block_pair_allowed(positions, 3, am, None, clean)  # [2, 1, 20, 20]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 20, 8, generator=gen)
    k, v = torch.randn(2, 2, 20, 8, generator=gen), torch.randn(2, 2, 20, 8, generator=gen)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 2, False, False
    want, _ = sdpa_attention_forward(module, q, k, v, mask)
    layout = pair_attention.PairLayout(10, 3)
    got, _ = pair_attention.pair_sdpa_forward(module, q, k, v, mask, adapt_pair=layout)
    assert small_tiles == [20] + [3, 3, 3, 1] * 2  # sdpa whole, then tiles of 3 queries: 4 per half
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_block_finetune_trains_through_the_tiled_kernel(llama_diffusion, tmp_path, small_tiles) -> None:  # noqa: ANN001, E501
    from adapt.tiny import SAMPLE_TEXT
    from adapt.training.config import load_recipe
    from adapt.training.run import run

    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join([SAMPLE_TEXT] * 4))
    overrides = [f"model.path={llama_diffusion}", f"data.path={corpus}", f"data.eval_path={corpus}",
                 f"training.output_dir={tmp_path / 'run'}", "data.max_length=16", "diffusion.block_size=4",
                 "diffusion.block_schedule=null", "training.max_steps=2", "training.eval_every=0",
                 "training.checkpoint_every=0", "training.gradient_checkpointing=true",
                 "logging.report_to=[]", "logging.progress_bar=false"]  # fmt: skip
    state, final = run(load_recipe("recipes/block_text.yaml", overrides))
    assert state.step == 2 and (final / "model.safetensors").exists()
    # tiles of 4 queries (TILE 4, B 4): 8 per pass over [x_t ; x_0] of 2 x 16 columns, nothing longer
    assert small_tiles and set(small_tiles) == {4}, sorted(set(small_tiles))
    assert "adapt_pair_sdpa" not in (final / "config.json").read_text()  # the export is a stock checkpoint
