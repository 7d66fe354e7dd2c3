"""`--strategy ar` and `--strategy verify`: a causal-clean block checkpoint's AR stream, decoded left to right
or checking diffusion drafts. Greedy `ar` equals stock transformers' generate on the same weights run
causally; greedy `verify` equals `ar` token for token; sampled `verify` follows the AR distribution."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapt.core.errors import AdaptError
from adapt.loading.model import load_diffusion_model
from adapt.sampling import SamplingConfig, generate
from adapt.sampling.canvas import build_canvas
from adapt.sampling.engine import stop_token_ids
from adapt.sampling.speculative import Row, SpeculativeDecoder
from adapt.tiny import SAMPLE_TEXT

ARCHS = ("llama", "qwen2", "gemma", "gpt2")
PROMPTS = ["The river ran", "A traveller came to the mill one evening and asked", "In the spring the"]

pytestmark = pytest.mark.usefixtures("one_thread")


def recorded(converted: dict, root: Path, block: int = 4, clean: str = "causal", weight: float = 1.0) -> dict:
    """Converted tiny checkpoints recorded as block checkpoints (block size, clean attention, AR weight)."""
    out = {}
    for arch in ARCHS:
        path = root / arch
        shutil.copytree(converted[arch], path)
        config = json.loads((path / "config.json").read_text())
        config["diffusion"].update(block_size=block, clean_attention=clean, ar_loss_weight=weight)
        (path / "config.json").write_text(json.dumps(config))
        out[arch] = path
    return out


@pytest.fixture(scope="module")
def causal(converted: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return recorded(converted, tmp_path_factory.mktemp("causal"))


@pytest.fixture(scope="module")
def trained(llama_diffusion: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama trained with the joint objective (B = 4) on the sample text: its drafts are often right,
    so rows accept different numbers of them."""
    from adapt.training.config import load_recipe
    from adapt.training.run import run

    root = tmp_path_factory.mktemp("joint")
    corpus = root / "text.txt"
    corpus.write_text("\n\n".join([SAMPLE_TEXT] * 8))
    overrides = [
        f"model.path={llama_diffusion}",
        f"data.path={corpus}",
        f"training.output_dir={root / 'run'}",
        "data.max_length=64",
        "diffusion.block_size=4",
        "diffusion.block_schedule=null",
        "diffusion.clean_attention=causal",
        "diffusion.ar_loss_weight=1.0",
        "training.max_steps=300",
        "training.lr=3e-3",
        "training.warmup_steps=0",
        "training.eval_every=0",
        "training.checkpoint_every=0",
        "training.mixed_precision=no",
        "logging.report_to=[]",
        "logging.progress_bar=false",
    ]
    _, final = run(load_recipe("recipes/block_text.yaml", overrides))
    assert final is not None
    return final


def decode(path: Path, prompts: list, **kw) -> object:  # noqa: ANN003
    model, tokenizer, settings = load_diffusion_model(path, device="cpu")
    kw.setdefault("stop_at_eos", False)
    kw.setdefault("gen_length", 24)
    return generate(model, tokenizer, prompts, SamplingConfig(**kw), settings)


# ----------------------------------------------------------------------------- greedy: exact


@pytest.mark.parametrize("arch", ARCHS)
def test_ar_is_stock_generate_on_the_same_weights_run_causally(causal: dict, arch: str) -> None:
    model, tokenizer, settings = load_diffusion_model(causal[arch], device="cpu")
    stock = AutoModelForCausalLM.from_pretrained(causal[arch], is_causal=True).eval()
    out = generate(model, tokenizer, PROMPTS, SamplingConfig(gen_length=16, strategy="ar", stop_at_eos=False))
    rows = stock.get_output_embeddings().weight.shape[0]
    never = [settings.mask_token_id, *range(len(tokenizer), rows)]  # adapt never proposes these
    for prompt, got in zip(PROMPTS, out.sequences, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        want = stock.generate(
            ids, max_new_tokens=16, do_sample=False, suppress_tokens=never, eos_token_id=None, pad_token_id=0
        )[0, ids.shape[1] :]
        assert got == want.tolist()
    assert out.nfe == 16 and out.tokens == 3 * 16  # one pass per token


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"redraft": True},
        {"draft_length": 1},
        {"draft_length": 2, "redraft": True},
        {"mask_block": 2, "redraft": True},
        {"mask_block": 3},
        {"candidates": 3, "mask_block": 2, "redraft": True},
        {"candidates": 2},
    ],
)
def test_greedy_verify_equals_ar_token_for_token(causal: dict, arch: str, extra: dict) -> None:
    ar = decode(causal[arch], PROMPTS, strategy="ar", gen_length=21)
    verify = decode(causal[arch], PROMPTS, strategy="verify", gen_length=21, **extra)
    assert verify.sequences == ar.sequences
    assert verify.tokens == ar.tokens == 3 * 21
    assert sum(verify.drafted) > 0  # drafts were made and checked


def test_trained_drafts_are_accepted_and_rows_accept_different_numbers(trained: Path) -> None:
    ar = decode(trained, PROMPTS, strategy="ar", gen_length=40)
    for extra in (
        {},
        {"redraft": True},
        {"draft_length": 2},
        {"mask_block": 2, "redraft": True},
        {"candidates": 3, "mask_block": 2, "redraft": True},
    ):
        verify = decode(trained, PROMPTS, strategy="verify", gen_length=40, **extra)
        assert verify.sequences == ar.sequences
        assert verify.nfe < 0.6 * ar.nfe  # passes saved: several tokens committed per pass
        assert min(verify.acceptance) > 0.5 and max(verify.acceptance) < 1.0  # some drafts are rejected
    chain = {"draft_length": 3, "redraft": False}  # long chains: rows part ways in passes needed
    alone = [decode(trained, [p], strategy="verify", gen_length=40, **chain) for p in PROMPTS]
    assert [a.sequences[0] for a in alone] == ar.sequences
    assert len({a.nfe for a in alone}) > 1  # rows need different numbers of passes: different acceptance


def test_eos_stop_strings_and_chat_end_as_in_ar(trained: Path) -> None:
    model, tokenizer, settings = load_diffusion_model(trained, device="cpu")
    free = generate(
        model, tokenizer, PROMPTS[:1], SamplingConfig(gen_length=30, strategy="ar", stop_at_eos=False)
    )
    tokens = free.sequences[0]
    # EOS: declare the 7th generated token a stop token; both decoders end right before it
    model.generation_config.eos_token_id = [tokens[6]]
    assert tokens[6] in stop_token_ids(tokenizer, model)
    config = SamplingConfig(gen_length=30, strategy="ar", stop_at_eos=True)
    ar = generate(model, tokenizer, PROMPTS, config)
    verify = generate(model, tokenizer, PROMPTS, dataclasses.replace(config, strategy="verify"))
    assert ar.sequences[0] == tokens[: tokens.index(tokens[6])]
    assert verify.sequences == ar.sequences and verify.texts == ar.texts
    model.generation_config.eos_token_id = None
    # a stop string in the middle of a pass's accepted run
    stop = tokenizer.decode(tokens[9:11])
    config = SamplingConfig(gen_length=30, strategy="ar", stop=(stop,), stop_at_eos=False)
    ar = generate(model, tokenizer, PROMPTS, config)
    verify = generate(model, tokenizer, PROMPTS, dataclasses.replace(config, strategy="verify"))
    assert stop not in ar.texts[0] and len(ar.texts[0]) < len(free.texts[0])
    assert verify.sequences == ar.sequences and verify.texts == ar.texts
    # chat template: its end-of-turn token ends both
    config = SamplingConfig(gen_length=24, strategy="ar", chat=True)
    ar = generate(model, tokenizer, PROMPTS, config)
    verify = generate(model, tokenizer, PROMPTS, dataclasses.replace(config, strategy="verify", redraft=True))
    assert verify.sequences == ar.sequences


def test_a_batch_gives_each_row_what_it_gives_alone(causal: dict) -> None:
    batch = decode(causal["qwen2"], PROMPTS, strategy="verify", gen_length=17)
    for prompt, seq in zip(PROMPTS, batch.sequences, strict=True):
        assert decode(causal["qwen2"], [prompt], strategy="verify", gen_length=17).sequences[0] == seq


# ----------------------------------------------------------------------------- sampling: the AR distribution


class AlwaysAccept(SpeculativeDecoder):
    """A wrong rule (every draft accepted), to show the statistical test can fail."""

    def accept(self, row: Row, p: torch.Tensor) -> tuple[int, int]:
        d = len(row.drafts)
        return d, int(torch.multinomial(p[d], 1, generator=self.generator))


class NoResidual(SpeculativeDecoder):
    """A subtly wrong candidates rule: a rejected candidate leaves p as it was (no norm(max(0, p - q)))."""

    def accept_candidate(self, row: Row, p: torch.Tensor) -> tuple[int, int]:
        for j, x in enumerate(row.drafts):
            ratio = float(p[0, x]) / max(float(row.q[0, x]), 1e-30)  # type: ignore[index]
            if float(torch.rand((), generator=self.generator)) < min(1.0, ratio):
                return 1 + j, int(torch.multinomial(p[1 + j], 1, generator=self.generator))
        return 0, int(torch.multinomial(p[0], 1, generator=self.generator))


def two_token_counts(
    path: Path, decoder: type, n: int, config: SamplingConfig, masks: int = 4
) -> torch.Tensor:
    """Counts [V, V] of the first two sampled tokens over n rows of one prompt."""
    model, tokenizer, settings = load_diffusion_model(path, device="cpu")
    vocab = max(len(tokenizer), settings.mask_token_id + 1)
    canvas = build_canvas(
        ["The river"] * n, tokenizer, settings, config.gen_length, False, None, torch.device("cpu"), "right"
    )
    generator = torch.Generator().manual_seed(config.seed)
    dec = decoder(model, config, settings.mask_token_id, masks, 1, vocab, [], generator)
    with torch.inference_mode():
        out = dec.decode(canvas, lambda region: False)
    assert sum(out.drafted) == n  # every row verified one draft (its second token)
    start = int(canvas.start[0])
    pairs = out.ids[:, start : start + 2]
    counts = torch.zeros(vocab, vocab)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(n), accumulate=True)
    return counts


def exact_two_token(path: Path, config: SamplingConfig) -> torch.Tensor:
    """P(x1, x2 | prompt) [V, V] of the AR stream (stock transformers, run causally), top-k filtered."""
    from adapt.sampling.strategies import model_logits, sampling_logits

    model, tokenizer, settings = load_diffusion_model(path, device="cpu")
    stock = AutoModelForCausalLM.from_pretrained(path, is_causal=True).eval()
    vocab = max(len(tokenizer), settings.mask_token_id + 1)

    def probs(logits: torch.Tensor) -> torch.Tensor:
        return sampling_logits(model_logits(logits[None], config, settings.mask_token_id, [], vocab), config)[
            0
        ].softmax(-1)

    ids = tokenizer("The river", return_tensors="pt").input_ids
    with torch.no_grad():
        p1 = probs(stock(ids).logits[0, -1])
        table = torch.zeros(p1.shape[0], p1.shape[0])
        for x1 in p1.nonzero()[:, 0].tolist():
            nxt = stock(torch.cat([ids, torch.tensor([[x1]])], dim=1)).logits[0, -1]
            table[x1] = p1[x1] * probs(nxt)
    return table[:vocab, :vocab]


def chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of `counts` against probabilities `expected` (support > 0)."""
    n = counts.sum()
    support = expected > 0
    if float(counts[~support].sum()) > 0:
        return 0.0  # outcomes the AR distribution cannot produce
    e = expected[support] * n
    stat = float(((counts[support] - e) ** 2 / e).sum())
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))


def test_sampled_verify_follows_the_ar_distribution_and_a_wrong_rule_is_caught(causal: dict) -> None:
    path = causal["llama"]
    config = SamplingConfig(
        gen_length=3, strategy="verify", temperature=1.5, top_k=3, seed=11, stop_at_eos=False
    )
    expected = exact_two_token(path, config)
    right = two_token_counts(path, SpeculativeDecoder, 3000, config)
    wrong = two_token_counts(path, AlwaysAccept, 3000, config)
    assert chi_square_p(right, expected) > 1e-3
    assert chi_square_p(wrong, expected) < 1e-6
    wrong_in_support = wrong * (expected > 0)  # even where it stays inside the support, its shares are off
    assert chi_square_p(wrong_in_support, expected) < 1e-6


def test_sampled_candidates_follow_the_ar_distribution_and_wrong_rules_are_caught(causal: dict) -> None:
    """Two candidates drawn from the drafter, SpecInfer's rule: the first two tokens follow the AR
    distribution; always taking a candidate, or skipping the residual after a rejection, do not."""
    path = causal["llama"]
    config = SamplingConfig(
        gen_length=3, strategy="verify", temperature=1.5, top_k=3, seed=11, stop_at_eos=False, candidates=2
    )
    expected = exact_two_token(path, config)
    right = two_token_counts(path, SpeculativeDecoder, 3000, config, masks=2)
    assert chi_square_p(right, expected) > 1e-3
    for wrong in (AlwaysAccept, NoResidual):
        assert chi_square_p(two_token_counts(path, wrong, 3000, config, masks=2), expected) < 1e-6, wrong


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("clean", "block", "message"),
    [("block", 4, "clean_attention: block"), ("causal", 1, "block size of 1 drafts nothing")],
)
def test_checkpoints_without_an_ar_stream_are_refused(converted, tmp_path, clean, block, message) -> None:  # noqa: ANN001
    path = recorded(converted, tmp_path, block=block, clean=clean)["llama"]
    with pytest.raises(AdaptError, match=message):
        decode(path, PROMPTS[:1], strategy="verify")


def test_a_mask_block_of_m_masks_is_what_each_pass_feeds(causal: dict) -> None:
    """Pass widths, counted at the model: the fed token and its drafts (m - 1 of them), then one block of m
    masks, or with redraft one per possible number of accepted drafts."""
    model, tokenizer, settings = load_diffusion_model(causal["llama"], device="cpu")
    widths: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        for masks, redraft, want in ((2, True, 1 + 1 + 2 * 2), (3, False, 1 + 2 + 3), (4, False, 1 + 3 + 4)):
            widths.clear()
            config = SamplingConfig(
                gen_length=12, strategy="verify", mask_block=masks, redraft=redraft, stop_at_eos=False
            )
            out = generate(model, tokenizer, PROMPTS[:1], config, settings)
            assert len(out.drafted) == masks - 1  # drafts per pass: the block's masks but the last
            # after the prompt's pass, passes with drafts to check feed exactly `want` tokens
            assert want in widths[1:] and max(widths[1:]) == want
    finally:
        hook.remove()


def test_full_attention_and_bad_draft_lengths_are_refused(converted, causal) -> None:  # noqa: ANN001
    with pytest.raises(AdaptError, match="full attention"):
        decode(converted["llama"], PROMPTS[:1], strategy="ar")
    with pytest.raises(AdaptError, match="draft_length must be >= 1"):
        SamplingConfig(strategy="verify", draft_length=0)
    with pytest.raises(AdaptError, match="at most 3"):
        decode(causal["llama"], PROMPTS[:1], strategy="verify", draft_length=4)
    with pytest.raises(AdaptError, match="exact KV cache"):
        decode(causal["llama"], PROMPTS[:1], strategy="verify", cache="none")
    with pytest.raises(AdaptError, match="mask_block must be >= 2"):
        SamplingConfig(strategy="verify", mask_block=1)
    with pytest.raises(AdaptError, match="more than the checkpoint's block of 4"):
        decode(causal["llama"], PROMPTS[:1], strategy="verify", mask_block=5)
    with pytest.raises(AdaptError, match="candidates must be >= 1"):
        SamplingConfig(strategy="verify", candidates=0)
    with pytest.raises(AdaptError, match="use --draft-length 1"):
        decode(causal["llama"], PROMPTS[:1], strategy="verify", candidates=2, draft_length=2)
    with pytest.raises(AdaptError, match="block of 2 masks drafts: at most 1"):
        decode(causal["llama"], PROMPTS[:1], strategy="verify", mask_block=2, draft_length=2)


def test_a_checkpoint_trained_without_the_ar_term_decodes_with_a_warning(converted, tmp_path, caplog) -> None:  # noqa: ANN001
    path = recorded(converted, tmp_path, weight=0.0)["llama"]
    with caplog.at_level(logging.WARNING):
        out = decode(path, PROMPTS[:1], strategy="verify", gen_length=8)
    assert len(out.sequences[0]) == 8
    assert "untrained AR head" in caplog.text


def test_a_full_mask_checkpoint_warns_multi_step_decoders_only(converted, tmp_path, caplog) -> None:  # noqa: ANN001
    path = recorded(converted, tmp_path)["llama"]
    config = json.loads((path / "config.json").read_text())
    config["diffusion"]["full_mask"] = True
    (path / "config.json").write_text(json.dumps(config))
    for strategy, warned in (("threshold", True), ("low_confidence", True), ("verify", False), ("ar", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            out = decode(path, PROMPTS[:1], strategy=strategy, gen_length=8)
        assert len(out.sequences[0]) == 8
        assert ("wholly masked blocks" in caplog.text) == warned, strategy


def test_the_cli_refuses_in_one_line_and_writes_nothing(causal, tmp_path) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from adapt.cli import app

    before = sorted(p.name for p in causal["llama"].iterdir())
    result = CliRunner().invoke(
        app, ["sample", str(causal["llama"]), "--prompt", "hi", "--strategy", "verify", "--draft-length", "9"]
    )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--draft-length 9" in lines[0]
    assert sorted(p.name for p in causal["llama"].iterdir()) == before
    ok = CliRunner().invoke(
        app,
        [
            "sample",
            str(causal["llama"]),
            "--prompt",
            "hi",
            "--strategy",
            "verify",
            "--json",
            "--gen-length",
            "6",
        ],
    )
    assert ok.exit_code == 0, ok.output
    record = json.loads(ok.output.strip().splitlines()[-1])
    assert len(record["sequences"][0]) == 6 and "acceptance_by_position" in record
    plain = CliRunner().invoke(
        app, ["sample", str(causal["llama"]), "--prompt", "hi", "--strategy", "verify", "--gen-length", "6"]
    )
    assert plain.exit_code == 0 and "drafts accepted by position" in plain.output.splitlines()[-1]
