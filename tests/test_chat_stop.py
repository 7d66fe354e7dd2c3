"""Outputs end where the answer ends: EOS, every id of `generation_config.eos_token_id` and the chat
template's end-of-turn token stop generation and are cut from the text (sampler, CLI, lm-eval model).

The tiny tokenizer's chat template ends turns with `<|end|>`, a token other than its EOS `<|eos|>`. A forward
hook makes the untrained model predict a chosen token at a chosen position, so where the answer ends is
known, and text follows it that a missed stop would let through.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import adapt.loading.model
from adapt.cli import app
from adapt.loading.model import load_diffusion_model
from adapt.sampling import SamplingConfig, generate
from adapt.sampling.canvas import encode_prompt
from adapt.sampling.engine import end_of_turn_ids, stop_token_ids

ANSWER = 2  # generated tokens before the forced stop token


def force_at(model, token: int, position: int) -> torch.utils.hooks.RemovableHandle:  # noqa: ANN001
    """`position` is predicted to be `token` (the logits at column j predict j + 1: shift)."""

    def hook(module, args, kwargs, out):  # noqa: ANN001, ANN202
        positions = kwargs["position_ids"]  # [b, l_in]
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor):
            positions = positions[:, keep]  # [b, k] the columns the logits belong to
        out.logits[..., token] += 100.0 * (positions + 1 == position)

    return model.register_forward_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def llama(llama_diffusion: Path) -> Iterator[tuple]:
    yield load_diffusion_model(llama_diffusion)


def end_id(tok) -> int:  # noqa: ANN001
    return tok.convert_tokens_to_ids("<|end|>")


def test_end_of_turn_token_is_found_in_the_chat_template(llama) -> None:  # noqa: ANN001
    model, tok, _ = llama
    assert end_of_turn_ids(tok) == [end_id(tok)] != [tok.eos_token_id]
    assert stop_token_ids(tok, model) == sorted({tok.eos_token_id, end_id(tok)})


def test_templates_without_an_end_of_turn_token(llama) -> None:  # noqa: ANN001
    _, tok, _ = llama
    assert end_of_turn_ids(SimpleNamespace(chat_template=None)) == []
    saved = tok.chat_template
    try:
        tok.chat_template = "{% for m in messages %}{{ m['content'] }} END {% endfor %}"  # text closes a turn
        assert end_of_turn_ids(tok) == []
        tok.chat_template = "{{ raise_exception('only user turns') }}"
        assert end_of_turn_ids(tok) == []
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize("extra", [7, [1, 7]])
def test_every_generation_config_eos_id_stops(llama, extra) -> None:  # noqa: ANN001
    model, tok, _ = llama
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = extra
    try:
        assert 7 in stop_token_ids(tok, model)
        out = chat_generate(model, tok, 7)
    finally:
        model.generation_config.eos_token_id = saved
    assert len(out.sequences[0]) == ANSWER and 7 not in out.sequences[0]


def chat_generate(model, tok, token: int, **kw):  # noqa: ANN001, ANN003, ANN201
    prompt = "What is the capital of France?"
    start = len(encode_prompt(tok, prompt, chat=True))
    config = SamplingConfig(gen_length=16, steps=16, block_length=4, chat=True, **kw)
    handle = force_at(model, token, start + ANSWER)
    try:
        return generate(model, tok, [prompt], config)
    finally:
        handle.remove()


def test_chat_stops_at_the_end_of_turn_and_cuts_it(llama) -> None:  # noqa: ANN001
    model, tok, _ = llama
    out = chat_generate(model, tok, end_id(tok))
    (seq,) = out.sequences
    assert len(seq) == ANSWER and not set(seq) & set(stop_token_ids(tok, model))
    assert out.texts[0] == tok.decode(seq, skip_special_tokens=True) and "<|end|>" not in out.texts[0]
    assert out.nfe == 4  # the block holding the end of turn is the last one decoded
    full = chat_generate(model, tok, end_id(tok), stop_at_eos=False)
    assert len(full.sequences[0]) == 16 and full.sequences[0][ANSWER] == end_id(tok)
    assert tok.decode(full.sequences[0][ANSWER + 1 :], skip_special_tokens=True)  # text a missed stop shows


def test_sample_chat_command_stops_at_the_end_of_turn(
    llama_diffusion: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = adapt.loading.model.load_diffusion_model

    def load(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        model, tok, settings = real(*args, **kw)
        start = len(encode_prompt(tok, "hi", chat=True))
        force_at(model, end_id(tok), start + ANSWER)
        return model, tok, settings

    monkeypatch.setattr(adapt.loading.model, "load_diffusion_model", load)
    args = ["sample", str(llama_diffusion), "--prompt", "hi", "--chat", "--gen-length", "8", "--json"]
    result = CliRunner().invoke(app, [*args, "--block-length", "4"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert len(record["sequences"][0]) == ANSWER and "<|end|>" not in record["texts"][0]


def test_lm_eval_generation_stops_at_the_end_of_turn(llama_diffusion: Path) -> None:
    pytest.importorskip("lm_eval")
    from adapt.evaluation.lm_eval_model import AdaptLM

    lm = AdaptLM(str(llama_diffusion), max_gen_toks=8)
    tok = lm.tokenizer
    context = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    start = len(encode_prompt(tok, context, chat=False))
    force_at(lm.model, end_id(tok), start + ANSWER)
    (text,) = lm.generate_until([SimpleNamespace(args=(context, {"until": ["\n\n"]}))])
    config = SamplingConfig(gen_length=8, steps=8, stop_at_eos=False)
    whole = generate(lm.model, tok, [context], config).sequences[0]
    assert whole[ANSWER] == end_id(tok) and tok.decode(whole[ANSWER + 1 :], skip_special_tokens=True)
    assert text == tok.decode(whole[:ANSWER], skip_special_tokens=True)


@pytest.fixture(scope="module")
def block_llama(converted: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama recorded as a block-diffusion checkpoint of block size 4."""
    path = tmp_path_factory.mktemp("block") / "llama"
    shutil.copytree(converted["llama"], path)
    config = json.loads((path / "config.json").read_text())
    config["diffusion"]["block_size"] = 4
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_block_checkpoint_stops_after_the_block_holding_the_end_of_turn(block_llama: Path) -> None:
    model, tok, settings = load_diffusion_model(block_llama)
    prompt = "The river ran"
    start = len(encode_prompt(tok, prompt, chat=False))
    assert start % 4 == 0  # the generated blocks are whole model blocks: start..start+3, ...
    force_at(model, end_id(tok), start + 4 + ANSWER)  # in the second block
    config = SamplingConfig(gen_length=16, steps=16)
    out = generate(model, tok, [prompt], config, settings)
    assert len(out.sequences[0]) == 4 + ANSWER and out.nfe == 8  # two blocks of 4 steps, then stop
