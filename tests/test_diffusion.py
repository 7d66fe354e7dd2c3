"""Masked-diffusion math: hand-computed losses, masking statistics, attention annealing end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapt.core.attention import causal_mask_4d, key_padding_allowed, to_additive
from adapt.core.diffusion import (
    anneal_probability,
    annealing_allowed,
    build_attention_mask,
    complementary_mask,
    diffusion_loss,
    diffusion_loss_per_sample,
    mask_tokens,
    maskable_positions,
    masked_token_nll,
    random_causal_allowed,
    sample_t,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- sample_t ---------------------------------------------------------------------------------


def test_sample_t_range_and_uniformity() -> None:
    t = sample_t(20000, eps=0.1, generator=gen())
    assert t.shape == (20000,)
    assert t.min() >= 0.1 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.55) < 0.01  # mean of U(0.1, 1)


def test_low_discrepancy_t_is_stratified() -> None:
    eps, b = 1e-3, 16
    for seed in range(20):
        t = sample_t(b, eps=eps, low_discrepancy=True, generator=gen(seed))
        unit = (t - eps) / (1 - eps)
        strata = torch.floor(unit * b).long().clamp(max=b - 1).sort().values
        assert torch.equal(strata, torch.arange(b)), "exactly one t per stratum of width 1/b"
        assert t.min() >= eps and t.max() <= 1.0


# --- maskable_positions / mask_tokens ------------------------------------------------------------


def test_maskable_positions_excludes_prompt_padding_and_first_token() -> None:
    attn = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    prompt = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]).bool()
    got = maskable_positions(attn, shift=True, prompt_mask=prompt)
    want = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]).bool()
    assert torch.equal(got, want)
    no_shift = maskable_positions(attn, shift=False)
    assert torch.equal(no_shift, attn.bool())
    with_pad = maskable_positions(attn, shift=False, prompt_mask=prompt, train_on_padding=True)
    assert torch.equal(with_pad, torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]).bool())
    assert attn[0, 4] == 0, "inputs are not modified"


def test_masked_fraction_follows_t() -> None:
    length = 20000
    ids = torch.randint(0, 50, (3, length), generator=gen(1))
    t = torch.tensor([0.1, 0.5, 0.9])
    maskable = torch.ones(3, length, dtype=torch.bool)
    noisy, masked = mask_tokens(ids, t, mask_id=99, maskable=maskable, generator=gen(2))
    frac = masked.float().mean(-1)
    # binomial std <= sqrt(0.25 / 20000) = 0.0035
    assert torch.allclose(frac, t, atol=0.015), frac
    assert torch.equal(noisy[masked], torch.full((int(masked.sum()),), 99))
    assert torch.equal(noisy[~masked], ids[~masked])


def test_mask_tokens_never_touches_unmaskable_positions() -> None:
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]] * 4)
    prompt = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]] * 4).bool()
    maskable = maskable_positions(attn, shift=True, prompt_mask=prompt)
    ids = torch.arange(32).view(4, 8)
    noisy, masked = mask_tokens(ids, torch.ones(4), mask_id=-1, maskable=maskable, generator=gen())
    assert torch.equal(masked, maskable), "t = 1 masks every maskable token and nothing else"
    assert torch.equal(noisy[:, :3], ids[:, :3]) and torch.equal(noisy[:, 6:], ids[:, 6:])


def test_complementary_mask_partitions_maskable() -> None:
    maskable = torch.tensor([[0, 1, 1, 1, 0, 1]]).bool()
    _, masked = mask_tokens(torch.zeros(1, 6, dtype=torch.long), torch.tensor([0.5]), 7, maskable, gen(3))
    comp = complementary_mask(masked, maskable)
    assert not (comp & masked).any()
    assert torch.equal(comp | masked, maskable)


# --- diffusion_loss ---------------------------------------------------------------------------------


def _tiny_logits() -> tuple[torch.Tensor, torch.Tensor]:
    # CE of [ln2, 0, 0] is ln2 for class 0 and ln4 for the others; CE of [0, 0, 0] is ln3;
    # CE of [0, 0, ln3] is ln(5/3) for class 2.
    logits = torch.tensor(
        [
            [[LN2, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, LN2, 0.0]],
            [[0.0, 0.0, LN3], [0.0, LN3, 0.0], [0.0, 0.0, 0.0]],
        ]
    )
    ids = torch.tensor([[0, 1, 2], [2, 0, 1]])
    return logits, ids


def test_loss_hand_computed_without_shift() -> None:
    logits, ids = _tiny_logits()
    masked = torch.tensor([[0, 1, 1], [1, 0, 0]]).bool()
    t = torch.tensor([0.5, 0.25])
    # sample 0: pos 1 target 1 from [0,0,0] -> ln3; pos 2 target 2 from [0,ln2,0] -> ln4
    # sample 1: pos 0 target 2 from [0,0,ln3] -> ln(5/3)
    s0 = (LN3 + math.log(4.0)) / 0.5 / 3
    s1 = math.log(5.0 / 3.0) / 0.25 / 3
    loss = diffusion_loss(logits, ids, masked, t, shift=False)
    assert loss.item() == pytest.approx((s0 + s1) / 2, rel=1e-6)


def test_loss_hand_computed_with_shift_and_normalizer() -> None:
    logits, ids = _tiny_logits()
    masked = torch.tensor([[0, 1, 1], [0, 0, 1]]).bool()
    t = torch.tensor([0.5, 0.25])
    # shift: position j is predicted from logits[j - 1]
    # sample 0: pos 1 target 1 from [ln2,0,0] -> ln4; pos 2 target 2 from [0,0,0] -> ln3
    # sample 1: pos 2 target 1 from [0,ln3,0] -> ln(5/3)
    s0 = (math.log(4.0) + LN3) / 0.5 / 2
    s1 = math.log(5.0 / 3.0) / 0.25 / 1
    normalizer = torch.tensor([2, 1])
    per = diffusion_loss_per_sample(logits, ids, masked, t, shift=True, normalizer=normalizer)
    assert per.tolist() == pytest.approx([s0, s1], rel=1e-6)
    loss = diffusion_loss(logits, ids, masked, t, shift=True, normalizer=normalizer)
    assert loss.item() == pytest.approx((s0 + s1) / 2, rel=1e-6)


def test_loss_matches_dense_reference_and_backprops() -> None:
    b, n, v = 3, 9, 11
    logits = torch.randn(b, n, v, generator=gen(4), requires_grad=True)
    ids = torch.randint(0, v, (b, n), generator=gen(5))
    t = sample_t(b, generator=gen(6))
    maskable = maskable_positions(torch.ones(b, n), shift=True)
    _, masked = mask_tokens(ids, t, 0, maskable, gen(7))
    dense = F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1), reduction="none")
    dense = (dense.view(b, n - 1) * masked[:, 1:] / t[:, None]).sum(-1) / n
    loss = diffusion_loss(logits, ids, masked, t, shift=True)
    assert loss.item() == pytest.approx(dense.mean().item(), rel=1e-5)
    loss.backward()
    assert logits.grad is not None and logits.grad[:, -1].abs().sum() == 0, "last logits unused with shift"


def test_loss_with_nothing_masked_is_zero_and_differentiable() -> None:
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = diffusion_loss(
        logits, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4).bool(), torch.ones(2), True
    )
    assert loss.item() == 0.0
    loss.backward()


def test_shift_rejects_masked_first_position() -> None:
    masked = torch.tensor([[1, 0]]).bool()
    with pytest.raises(ValueError, match="position 0"):
        diffusion_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), masked, torch.ones(1), True)


def test_masked_token_nll_accuracy() -> None:
    logits, ids = _tiny_logits()
    masked = torch.tensor([[1, 0, 1], [1, 1, 0]]).bool()
    nll, rows, correct = masked_token_nll(logits, ids, masked, shift=False)
    assert rows.tolist() == [0, 0, 1, 1]
    assert correct.tolist() == [True, False, True, False]
    assert nll[0].item() == pytest.approx(LN2)


def test_low_precision_logits_are_upcast() -> None:
    logits, ids = _tiny_logits()
    masked = torch.tensor([[0, 1, 1], [1, 0, 0]]).bool()
    t = torch.tensor([0.5, 0.25])
    full = diffusion_loss(logits, ids, masked, t, shift=False)
    half = diffusion_loss(logits.bfloat16(), ids, masked, t, shift=False)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=1e-2)


# --- attention annealing ---------------------------------------------------------------------------


def test_anneal_probability_schedule() -> None:
    assert anneal_probability(0, 0) == 1.0
    assert anneal_probability(0, 10) == pytest.approx(0.1)
    assert anneal_probability(4, 10) == pytest.approx(0.5)
    assert anneal_probability(9, 10) == 1.0
    assert anneal_probability(50, 10) == 1.0


def test_annealing_mask_causal_early_open_late() -> None:
    length = 32
    causal = torch.ones(length, length).bool().tril()
    early = annealing_allowed(0, 10**9, length, generator=gen())
    assert early is not None and early.shape == (1, 1, length, length)
    assert torch.equal(early[0, 0], causal), "p = 1e-9: nothing opened"
    assert annealing_allowed(9, 10, length) is None
    assert annealing_allowed(0, 0, length) is None
    assert torch.equal(random_causal_allowed(length, 0.0)[0, 0], causal)
    assert random_causal_allowed(length, 1.0).all()


@pytest.mark.parametrize("step,anneal_steps", [(1, 10), (4, 10), (7, 10)])
def test_annealing_opens_upper_edges_with_probability_p(step: int, anneal_steps: int) -> None:
    length, draws = 64, 30
    g = gen(step)
    upper = torch.ones(length, length).bool().triu(1)
    opened, masks = [], []
    for _ in range(draws):
        m = annealing_allowed(step, anneal_steps, length, generator=g)[0, 0]
        assert m.tril().sum() == length * (length + 1) // 2, "past edges always open"
        opened.append(m[upper].float().mean())
        masks.append(m)
    p = (step + 1) / anneal_steps
    # 30 draws x 2016 edges: std of the mean <= 0.002
    assert torch.stack(opened).mean().item() == pytest.approx(p, abs=0.01)
    assert not torch.equal(masks[0], masks[1]), "a fresh mask at each draw"


def test_build_attention_mask_fast_path_and_padding() -> None:
    attn = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert build_attention_mask(attn, torch.float32, step=5, anneal_steps=0) is attn
    m = build_attention_mask(attn, torch.bfloat16, step=0, anneal_steps=10**9, generator=gen())
    assert m.shape == (2, 1, 4, 4) and m.dtype == torch.bfloat16
    assert torch.equal(m, causal_mask_4d(attn, torch.bfloat16)), "p ~ 0 is the causal padded mask"
    # segments without annealing: block-diagonal, padding key blocked except on its own row
    seg = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    seg_allowed = seg[:, None, :, None] == seg[:, None, None, :]
    m = build_attention_mask(attn, torch.float32, segment_allowed=seg_allowed)
    allowed = m == 0
    want0 = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]).bool()
    assert torch.equal(allowed[0, 0], want0)
    assert torch.equal(allowed[1, 0], seg_allowed[1, 0])


# --- end to end on a converted model ----------------------------------------------------------------


def _ordinary_ids(tokenizer, length: int) -> torch.Tensor:
    ids = tokenizer("The river ran slowly past the old mill, and the miller's daughter watched")["input_ids"]
    return torch.tensor(ids[:length])[None]


def test_annealed_mask_end_to_end(converted: dict[str, Path], tiny_models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    from adapt.loading.model import load_diffusion_model

    for arch in ("llama", "gpt2"):
        model, tok, _ = load_diffusion_model(converted[arch])
        source = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
        ids = _ordinary_ids(tok, 12)
        ids = torch.cat([ids, ids.flip(-1)])  # [2, 12]
        attn = torch.ones_like(ids)
        attn[1, -3:] = 0  # right padding in the second row
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        vocab = source.config.vocab_size
        with torch.no_grad():
            causal = to_additive(random_causal_allowed(12, 0.0) & key_padding_allowed(attn), torch.float32)
            got = model(input_ids=ids, attention_mask=causal, position_ids=pos).logits[..., :vocab]
            ref = source(input_ids=ids, attention_mask=attn, position_ids=pos).logits
            assert torch.allclose(got[attn.bool()], ref[attn.bool()], atol=1e-4), f"{arch}: p=0 is causal"

            half = build_attention_mask(attn, torch.float32, step=4, anneal_steps=10, generator=gen())
            annealed = model(input_ids=ids, attention_mask=half, position_ids=pos).logits
            assert torch.isfinite(annealed).all()
            bidir = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
            assert not torch.allclose(annealed[..., :vocab], got, atol=1e-4)
            assert not torch.allclose(annealed, bidir, atol=1e-4)
            full = build_attention_mask(attn, torch.float32, step=9, anneal_steps=10)
            assert full is attn
