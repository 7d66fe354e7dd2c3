"""FlexAttention block masks: every mask function answers what its dense builder answers, a BlockMask
skips the tiles it should, and every objective's loss (and, on CUDA, its gradients) through transformers'
flex_attention equals the sdpa path's on LLaMA, Qwen2 and Gemma.

torch 2.13 runs FlexAttention on CPU only without gradients, and transformers compiles it (about 20 s per
shape here), so the default run compares losses with flex's eager kernel (same function, same BlockMask);
`test_compiled_flex_matches_sdpa` runs transformers' own compiled path (slow) and the gradient test runs
where CUDA is.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from adapt.core.attention import MaskStyle, block_pair_allowed, pair_mask_mod
from adapt.core.diffusion import annealing_allowed, build_attention_mask
from adapt.core.errors import AdaptError
from adapt.core.flex import (
    block_mask,
    check_flex_architecture,
    dense_pattern,
    flex_cannot_train,
    full_mask_mod,
)
from adapt.loading.model import load_diffusion_model
from adapt.training.config import DiffusionConfig
from adapt.training.objectives.block import BlockDiffusion
from adapt.training.objectives.loss import TokenLoss
from adapt.training.objectives.masked import MaskedDiffusion
from tests.test_block import PAIR_L8_B2, PAIR_L8_B2_CAUSAL_CLEAN, grid

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ("llama", "qwen2", "gemma")
L = 12


def create_mask(mod, batch: int, length: int) -> torch.Tensor:  # noqa: ANN001
    from torch.nn.attention.flex_attention import create_mask as torch_create_mask

    return torch_create_mask(mod, batch, 1, length, length, device="cpu")


def layouts() -> list[dict[str, torch.Tensor]]:
    """Left padding (rows of 12, 9 and 5 real tokens), and packed documents whose positions restart."""
    am = torch.tensor([[1] * 12, [0] * 3 + [1] * 9, [0] * 7 + [1] * 5])
    padded = {"attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp(min=0)}
    seg = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 3 + [2] * 6])
    pos = torch.tensor([list(range(5)) + list(range(7)), [0, 1, 2, 0, 1, 2] + list(range(6))])
    packed = {"attention_mask": torch.ones_like(seg), "position_ids": pos, "segment_ids": seg}
    return [padded, packed]


@pytest.mark.parametrize("clean", ["block", "causal"])
@pytest.mark.parametrize("block", [1, 2, 3, 4, 12])
def test_pair_mask_function_is_the_dense_pattern(block: int, clean: str) -> None:
    for layout in layouts():
        pos, am, seg = layout["position_ids"], layout["attention_mask"], layout.get("segment_ids")
        dense = block_pair_allowed(pos, block, am, seg, clean)
        got = create_mask(pair_mask_mod(pos, block, am, seg, clean), pos.shape[0], 2 * L)
        assert torch.equal(got, dense), (block, clean, layout.keys())


@pytest.mark.parametrize("anneal", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_full_mask_function_is_the_dense_pattern(anneal: bool, packed: bool) -> None:
    layout = layouts()[1 if packed else 0]
    am, seg = layout["attention_mask"], layout.get("segment_ids")
    annealed = annealing_allowed(3, 10, L, torch.Generator().manual_seed(0)) if anneal else None
    got = create_mask(full_mask_mod(am, seg, annealed), am.shape[0], L)
    if not anneal and not packed:  # the model's own bidirectional mask over a 2D padding mask
        assert torch.equal(got, am.bool()[:, None, None, :].expand(-1, 1, L, L))
        return
    from adapt.training.data import document_mask

    segments = None if seg is None else document_mask(seg)
    steps = (3, 10) if anneal else (0, 0)
    dense = build_attention_mask(am, torch.bool, *steps, segments, torch.Generator().manual_seed(0))
    assert torch.equal(got, dense)


def test_block_mask_of_l8_b2_is_the_hand_written_pattern() -> None:
    ones = torch.ones(1, 8, dtype=torch.long)
    for clean, expected in (("block", PAIR_L8_B2), ("causal", PAIR_L8_B2_CAUSAL_CLEAN)):
        mask = block_mask(pair_mask_mod(torch.arange(8)[None], 2, ones, None, clean), 1, 16, "cpu", tile=4)
        assert torch.equal(dense_pattern(mask)[0, 0], expected)
        # tiles of 4 x 4: 7 of 16 are empty (never computed), e.g. clean queries never reach noisy keys
        assert torch.equal(mask.to_dense()[0, 0].bool(), grid("1010 0111 0010 0011".replace(" ", "\n")))


def test_a_wrong_mask_function_is_caught() -> None:
    pos, ones = torch.arange(8)[None], torch.ones(1, 8, dtype=torch.long)
    right = pair_mask_mod(pos, 2, ones)

    def leaky(b, h, q, k):  # noqa: ANN001, ANN202 - noisy tokens also see their own block's clean copy
        return right(b, h, q, k) | ((q < 8) & (k >= 8) & (q // 2 == (k - 8) // 2))

    assert torch.equal(create_mask(right, 1, 16)[0, 0], PAIR_L8_B2)
    assert not torch.equal(create_mask(leaky, 1, 16)[0, 0], PAIR_L8_B2)


# ----------------------------------------------------------------------------- the model, both kernels


@pytest.fixture
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' flex integration with FlexAttention's eager kernel instead of a compiled one."""
    import transformers.integrations.flex_attention as integration
    from torch.nn.attention.flex_attention import flex_attention

    def eager(query, key, value, training=False, **kwargs):  # noqa: ANN001, ANN202
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(integration, "compile_friendly_flex_attention", eager)
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


OBJECTIVES = {
    "full": ("masked", {}),
    "full annealed": ("masked", {"anneal_steps": 10}),
    "full complementary": ("masked", {"complementary_masking": True}),
    "block, block clean": ("block", {"block_size": 4}),
    "block, causal clean": ("block", {"block_size": 4, "clean_attention": "causal"}),
    "block, causal clean, AR term": (
        "block",
        {"block_size": 4, "clean_attention": "causal", "ar_loss_weight": 1.0},
    ),
    "block complementary": ("block", {"block_size": 3, "complementary_masking": True}),
}


def objective_of(name: str, settings):  # noqa: ANN001, ANN201
    kind, fields = OBJECTIVES[name]
    config = DiffusionConfig(**fields)
    return BlockDiffusion(config, settings) if kind == "block" else MaskedDiffusion(config, settings)


def batches(vocab: int) -> dict[str, dict[str, torch.Tensor]]:
    """Padded, packed and SFT batches of random tokens."""
    padded, packed = layouts()
    out = {}
    for name, layout in (("padded", padded), ("packed", packed)):
        ids = torch.randint(
            3, vocab - 2, layout["attention_mask"].shape, generator=torch.Generator().manual_seed(1)
        )
        out[name] = {"input_ids": ids, **layout}
    sft = dict(out["padded"])
    sft["prompt_mask"] = torch.zeros_like(sft["input_ids"], dtype=torch.bool)
    sft["prompt_mask"][:, :8] = True
    sft["prompt_mask"] &= sft["attention_mask"].bool()
    out["sft"] = sft
    return out


def losses(model, objective, batch, grad: bool = False):  # noqa: ANN001, ANN201
    """(loss, per-target nll) of one step through `model`'s own attention kernel, and the gradients."""
    style = MaskStyle.for_model(model, torch.float32)
    inputs = objective.inputs(batch, 3, torch.Generator().manual_seed(7), style)
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    module = TokenLoss(model)
    with torch.set_grad_enabled(grad):
        loss, nll, _ = module(**inputs)
    if not grad:
        return loss, nll, None
    model.zero_grad()
    loss.backward()
    return loss.detach(), nll, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_objective_has_the_sdpa_loss_under_flex(arch: str, converted, eager_flex) -> None:  # noqa: ANN001
    sdpa, _, settings = load_diffusion_model(converted[arch], device="cpu", attn_implementation="sdpa")
    flex, _, _ = load_diffusion_model(converted[arch], device="cpu", attn_implementation="flex_attention")
    assert flex.config._attn_implementation == "flex_attention"
    for batch_name, batch in batches(sdpa.config.vocab_size).items():
        for name in OBJECTIVES:
            objective = objective_of(name, settings)
            inputs = objective.inputs(
                batch, 3, torch.Generator().manual_seed(7), MaskStyle.for_model(flex, torch.float32)
            )
            assert type(inputs["attention_mask"]).__name__ == "BlockMask"  # the flex path really ran
            want_loss, want_nll, _ = losses(sdpa, objective, batch)
            got_loss, got_nll, _ = losses(flex, objective, batch)
            where = f"{arch}, {name}, {batch_name}"
            torch.testing.assert_close(got_nll, want_nll, rtol=1e-5, atol=1e-5, msg=where)
            torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5, msg=where)


def test_a_wrong_block_mask_changes_the_loss(converted, eager_flex, monkeypatch) -> None:  # noqa: ANN001
    import adapt.training.objectives.block as block_module

    model, _, settings = load_diffusion_model(
        converted["llama"], device="cpu", attn_implementation="flex_attention"
    )
    objective = objective_of("block, block clean", settings)
    batch = batches(model.config.vocab_size)["padded"]
    right, _, _ = losses(model, objective, batch)
    original = block_module.pair_mask_mod

    def leaky(positions, block_size, attention_mask, segment_ids=None, clean="block"):  # noqa: ANN001, ANN202
        mod = original(positions, block_size, attention_mask, segment_ids, clean)
        length = positions.shape[1]
        return lambda b, h, q, k: mod(b, h, q, k) | ((q < length) & (k == q + length))  # sees its own answer

    monkeypatch.setattr(block_module, "pair_mask_mod", leaky)
    wrong, _, _ = losses(model, objective, batch)
    assert (wrong - right).abs() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention trains on CUDA only (torch 2.13)")
@pytest.mark.parametrize("arch", ARCHS)
def test_every_objective_has_the_sdpa_gradients_under_flex_on_cuda(arch: str, converted) -> None:  # noqa: ANN001
    sdpa, _, settings = load_diffusion_model(converted[arch], device="cuda", attn_implementation="sdpa")
    flex, _, _ = load_diffusion_model(converted[arch], device="cuda", attn_implementation="flex_attention")
    sdpa.train(), flex.train()
    for batch in batches(sdpa.config.vocab_size).values():
        for name in OBJECTIVES:
            objective = objective_of(name, settings)
            want, _, want_grads = losses(sdpa, objective, batch, grad=True)
            got, _, got_grads = losses(flex, objective, batch, grad=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{arch}, {name}")
            for key, value in want_grads.items():
                torch.testing.assert_close(
                    got_grads[key], value, rtol=1e-4, atol=1e-5, msg=f"{arch}, {name}, {key}"
                )


@pytest.mark.slow
def test_compiled_flex_matches_sdpa(converted) -> None:  # noqa: ANN001
    """transformers' own path: flex_attention compiled by its integration (no patch)."""
    sdpa, _, settings = load_diffusion_model(converted["llama"], device="cpu", attn_implementation="sdpa")
    flex, _, _ = load_diffusion_model(converted["llama"], device="cpu", attn_implementation="flex_attention")
    objective = objective_of("block, causal clean", settings)
    batch = batches(sdpa.config.vocab_size)["packed"]
    torch.testing.assert_close(
        losses(flex, objective, batch)[0], losses(sdpa, objective, batch)[0], rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------- refusals


def test_flex_training_on_cpu_is_refused_with_torch_s_reason() -> None:
    reason = flex_cannot_train("cpu")
    if torch.__version__.startswith("2.13"):
        assert reason is not None and "backward on CPU" in reason


def test_an_architecture_without_flex_is_refused_naming_the_choices(tiny_models) -> None:  # noqa: ANN001
    from transformers import AutoConfig

    with pytest.raises(AdaptError, match="GPT2LMHeadModel .* does not take flex_attention.*sdpa or eager"):
        check_flex_architecture(AutoConfig.from_pretrained(tiny_models["gpt2"]))
    check_flex_architecture(AutoConfig.from_pretrained(tiny_models["llama"]))  # no error


def test_the_style_follows_the_kernel(converted) -> None:  # noqa: ANN001
    model, _, _ = load_diffusion_model(converted["llama"], device="cpu", attn_implementation="eager")
    assert MaskStyle.for_model(model, torch.bfloat16) == MaskStyle("additive", torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    assert dataclasses.astuple(MaskStyle.for_model(model, torch.float32))[0] == "bool"


@pytest.mark.parametrize("block", [None, 4])
def test_the_elbo_of_eval_is_the_same_under_flex(block, converted, eager_flex) -> None:  # noqa: ANN001
    from adapt.evaluation.evaluate import elbo_samples

    sdpa, _, settings = load_diffusion_model(converted["qwen2"], device="cpu", attn_implementation="sdpa")
    flex, _, _ = load_diffusion_model(converted["qwen2"], device="cpu", attn_implementation="flex_attention")
    settings = settings.with_block_size(block, "causal") if block else settings
    windows = torch.randint(
        3, sdpa.config.vocab_size - 2, (3, 16), generator=torch.Generator().manual_seed(3)
    )
    want, _ = elbo_samples(sdpa, windows, settings, 2, generator=torch.Generator().manual_seed(4))
    got, _ = elbo_samples(flex, windows, settings, 2, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
