"""Data loading with real `datasets` on small files: packing, document masks, chat prompt masks, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapt.core.errors import AdaptError
from adapt.tiny import build_tokenizer
from adapt.training.data import (
    Collator,
    DataConfig,
    DataStats,
    build_dataloaders,
    document_mask,
    encode_chat,
    load_raw,
    pack_documents,
    prepare_datasets,
)

DOCS = [
    "The river ran slowly past the old mill.",
    "Every morning she counted the sacks of grain and wrote the numbers in a small green book.",
    "def add(a, b):\n    return a + b",
    "Question: what is two plus three? Answer: five.",
    "A traveller came to the mill one evening.",
]
CHATS = [
    ("what is two plus three?", "five."),
    ("what colour is the sky on a clear day?", "blue."),
    ("tell me about the mill", "The river ran slowly past the old mill, and the wheel turned."),
    ("count", "one two three"),
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def doc_tokens(tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += tok(d)["input_ids"] + [tok.eos_token_id]
    return out


# --- text mode -----------------------------------------------------------------------------------


def test_packing_is_exact_and_positions_restart(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    cfg = DataConfig(path=str(path), max_length=16, overflow="split")
    data = prepare_datasets(cfg, tok)
    blocks = data.train
    assert all(len(b) == 16 for b in blocks["input_ids"])
    real = [
        i
        for b, m in zip(blocks["input_ids"], blocks["attention_mask"], strict=True)
        for i, k in zip(b, m, strict=True)
        if k
    ]
    assert real == doc_tokens(tok, DOCS), "blocks concatenated == documents + EOS concatenated"
    assert data.stats.tokens == len(real) and data.stats.examples == len(DOCS)
    padded = sum(m.count(0) for m in blocks["attention_mask"])
    assert padded == 16 * len(blocks) - len(real) and padded < 16, "only the last block is padded"
    # positions restart after each EOS; segments count documents inside a block
    eos = tok.eos_token_id
    for ids, seg, pos, m in zip(
        blocks["input_ids"],
        blocks["segment_ids"],
        blocks["position_ids"],
        blocks["attention_mask"],
        strict=True,
    ):
        assert pos[0] == 0 and seg[0] == 0
        for j in range(1, 16):
            if not m[j]:
                assert seg[j] == -1
            elif ids[j - 1] == eos:
                assert pos[j] == 0 and seg[j] == seg[j - 1] + 1
            else:
                assert pos[j] == pos[j - 1] + 1 and seg[j] == seg[j - 1]


def test_text_file_and_parquet_load(tmp_path: Path, tok) -> None:
    import datasets

    (tmp_path / "t.txt").write_text("\n\n".join(DOCS[:2]) + "\n\n\n")
    data = prepare_datasets(DataConfig(path=str(tmp_path / "t.txt"), max_length=64, overflow="split"), tok)
    real = [
        i
        for b, m in zip(data.train["input_ids"], data.train["attention_mask"], strict=True)
        for i, k in zip(b, m, strict=True)
        if k
    ]
    assert real == doc_tokens(tok, DOCS[:2]), "paragraphs are documents"

    datasets.Dataset.from_dict({"body": DOCS}).to_parquet(str(tmp_path / "d.parquet"))
    cfg = DataConfig(path=str(tmp_path / "d.parquet"), text_column="body", max_length=8, overflow="split")
    data = prepare_datasets(cfg, tok)
    assert sum(sum(m) for m in data.train["attention_mask"]) == len(doc_tokens(tok, DOCS))


def test_document_mask_is_block_diagonal() -> None:
    seg = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, -1, -1]])
    m = document_mask(seg)
    assert m.shape == (2, 1, 6, 6) and m.dtype == torch.bool
    want = torch.block_diag(torch.ones(2, 2), torch.ones(3, 3), torch.ones(1, 1)).bool()
    assert torch.equal(m[0, 0], want)
    assert m[1, 0, :4, :4].all() and not m[1, 0, :4, 4:].any()


def test_document_mask_isolates_documents_in_model(llama_diffusion: Path, tok) -> None:
    from adapt.core.diffusion import build_attention_mask
    from adapt.loading.model import load_diffusion_model

    model, mtok, _ = load_diffusion_model(llama_diffusion)
    a, b = mtok(DOCS[0])["input_ids"], mtok(DOCS[4])["input_ids"]
    packed = pack_documents([a, b], max_length=len(a) + len(b), pad_id=mtok.pad_token_id)
    batch = Collator(mtok.pad_token_id)([{k: v[0] for k, v in packed.items()}])
    mask = build_attention_mask(
        batch["attention_mask"], torch.float32, segment_allowed=document_mask(batch["segment_ids"])
    )
    with torch.no_grad():
        got = model(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]
        ).logits
        alone = model(input_ids=torch.tensor([b])).logits
    assert torch.allclose(got[0, len(a) :], alone[0], atol=1e-4), "second document unaffected by the first"


def test_truncate_and_skip_counts_text(tok) -> None:
    docs = [[5] * 3 + [1], [6] * 9 + [1], [7] * 2 + [1]]  # lengths 4, 10, 3
    stats = DataStats()
    out = pack_documents(docs, max_length=5, pad_id=2, overflow="truncate", stats=stats)
    assert stats.truncated == 1 and stats.skipped == 0
    assert out["input_ids"] == [[5, 5, 5, 1, 6], [6, 6, 6, 6, 7], [7, 1, 2, 2, 2]]
    stats = DataStats()
    out = pack_documents(docs, max_length=5, pad_id=2, overflow="skip", stats=stats)
    assert stats.skipped == 1 and stats.truncated == 0
    assert out["input_ids"] == [[5, 5, 5, 1, 7], [7, 1, 2, 2, 2]]
    assert out["segment_ids"] == [[0, 0, 0, 0, 1], [0, 0, -1, -1, -1]]


def test_cross_document_option_drops_segments(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    train, _, _ = build_dataloaders(
        DataConfig(path=str(path), max_length=16, allow_cross_document=True), tok, 2
    )
    batch = next(iter(train))
    assert set(batch) == {"input_ids", "attention_mask"}


# --- chat mode -----------------------------------------------------------------------------------


def _decode_split(tok, ids: list[int], prompt_mask: list[int]) -> tuple[str, str]:
    prompt = [i for i, p in zip(ids, prompt_mask, strict=True) if p]
    response = [i for i, p in zip(ids, prompt_mask, strict=True) if not p]
    assert prompt_mask == sorted(prompt_mask, reverse=True), "the prompt is a prefix"
    return tok.decode(prompt), tok.decode(response)


def test_chat_prompt_mask_covers_exactly_the_prompt(tmp_path: Path, tok) -> None:
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]} for p, r in CHATS
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    data = prepare_datasets(DataConfig(path=str(path), mode="chat", max_length=64), tok)
    assert len(data.train) == len(CHATS)
    for ex, (p, r) in zip(data.train, CHATS, strict=True):
        prompt, response = _decode_split(tok, ex["input_ids"], ex["prompt_mask"])
        assert prompt == f"<|user|>{p}<|end|><|assistant|>"
        assert response == f"{r}<|end|><|eos|>"


def test_chat_prompt_response_columns_and_multi_turn(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "pr.jsonl", [{"q": p, "a": r} for p, r in CHATS])
    cfg = DataConfig(path=str(path), mode="chat", prompt_column="q", response_column="a", max_length=64)
    ex = prepare_datasets(cfg, tok).train[0]
    assert _decode_split(tok, ex["input_ids"], ex["prompt_mask"]) == (
        "<|user|>what is two plus three?<|end|><|assistant|>",
        "five.<|end|><|eos|>",
    )
    turns = [
        {"role": "user", "content": "count"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "two"},
    ]
    enc, status = encode_chat(turns, tok, 64)
    assert status == "ok"
    prompt, response = _decode_split(tok, enc["input_ids"], enc["prompt_mask"])
    assert prompt == "<|user|>count<|end|><|assistant|>one<|end|><|user|>more<|end|><|assistant|>"
    assert response == "two<|end|><|eos|>"


def test_chat_eos_padding_and_collate(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": p, "response": r} for p, r in CHATS])
    cfg = DataConfig(path=str(path), mode="chat", max_length=40, pad_to_max_length_with_eos=True)
    data = prepare_datasets(cfg, tok)
    ex = data.train[0]
    assert len(ex["input_ids"]) == 40 and all(ex["attention_mask"])
    n = (
        len(
            tok.apply_chat_template(
                [{"role": "user", "content": CHATS[0][0]}, {"role": "assistant", "content": CHATS[0][1]}],
                return_dict=False,
            )
        )
        + 1
    )
    assert ex["input_ids"][n - 1 :] == [tok.eos_token_id] * (40 - n + 1), "EOS fill is trained on"

    cfg = DataConfig(path=str(path), mode="chat", max_length=64)
    train, _, _ = build_dataloaders(cfg, tok, batch_size=4, shuffle=False)
    batch = next(iter(train))
    lengths = batch["attention_mask"].sum(-1)
    assert batch["input_ids"].shape == (4, int(lengths.max()))
    assert batch["prompt_mask"].dtype == torch.bool
    for row, n_real in zip(batch["input_ids"], lengths, strict=True):
        assert (row[n_real:] == tok.pad_token_id).all(), "right padding with the pad id"
    assert not (batch["prompt_mask"] & ~batch["attention_mask"].bool()).any()


def test_chat_truncate_and_skip(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": p, "response": r} for p, r in CHATS])
    lengths = [
        len(
            encode_chat([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tok, 10**6)[0][
                "input_ids"
            ]
        )
        for p, r in CHATS
    ]
    limit = sorted(lengths)[-2]  # exactly one conversation is longer
    data = prepare_datasets(DataConfig(path=str(path), mode="chat", max_length=limit, overflow="skip"), tok)
    assert (data.stats.skipped, data.stats.truncated, len(data.train)) == (1, 0, len(CHATS) - 1)
    data = prepare_datasets(DataConfig(path=str(path), mode="chat", max_length=limit), tok)
    assert (data.stats.skipped, data.stats.truncated, len(data.train)) == (0, 1, len(CHATS))
    assert max(len(x) for x in data.train["input_ids"]) == limit


# --- splits and errors --------------------------------------------------------------------------------


def test_eval_split_fraction_count_and_file(tmp_path: Path, tok) -> None:
    rows = [{"text": f"{d} number {i}"} for i in range(4) for d in DOCS]  # 20 documents
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    frac = prepare_datasets(DataConfig(path=str(path), max_length=32, eval_fraction=0.25), tok)
    assert frac.stats.examples == 15 and frac.eval is not None
    count = prepare_datasets(DataConfig(path=str(path), max_length=32, eval_fraction=3), tok)
    assert count.stats.examples == 17
    other = write_jsonl(tmp_path / "e.jsonl", [{"text": DOCS[0]}])
    sep = prepare_datasets(DataConfig(path=str(path), eval_path=str(other), max_length=32), tok)
    assert sep.stats.examples == 20 and len(sep.eval) == 1
    with pytest.raises(AdaptError, match="eval"):
        prepare_datasets(DataConfig(path=str(path), max_length=32, eval_fraction=20), tok)


def test_errors(tmp_path: Path, tok) -> None:
    with pytest.raises(AdaptError, match="no such data file"):
        load_raw(str(tmp_path / "missing.jsonl"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "x", "id": 1}])
    with pytest.raises(AdaptError, match="column.*text.*the data has: body, id"):
        prepare_datasets(DataConfig(path=str(path)), tok)
    with pytest.raises(AdaptError, match="prompt, response.*body, id"):
        prepare_datasets(DataConfig(path=str(path), mode="chat"), tok)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": "   "}, {"text": ""}])
    with pytest.raises(AdaptError, match="no training samples"):
        prepare_datasets(DataConfig(path=str(blank)), tok)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a very long prompt " * 20, "response": "ok"}])
    with pytest.raises(AdaptError, match="no training samples"):
        prepare_datasets(DataConfig(path=str(long), mode="chat", max_length=8), tok)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(AdaptError, match="empty.jsonl is empty"):
        prepare_datasets(DataConfig(path=str(tmp_path / "empty.jsonl")), tok)
    weird = write_jsonl(tmp_path / "d.weird", [{"text": "x"}])
    with pytest.raises(AdaptError, match="set data.format"):
        load_raw(str(weird))
    assert list(load_raw(str(weird), format="json")["text"]) == ["x"]
    with pytest.raises(AdaptError, match="nobody/no-such-dataset"):
        load_raw("nobody/no-such-dataset")
    with pytest.raises(AdaptError, match="split"):
        DataConfig(path="x", mode="chat", overflow="split")


def test_overflow_auto_splits_text_and_truncates_chat(tmp_path):
    assert DataConfig(path="x.txt", mode="text").overflow == "split"
    assert DataConfig(path="x.jsonl", mode="chat").overflow == "truncate"
