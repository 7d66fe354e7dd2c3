"""Training data for diffusion fine-tuning: load, tokenize, pack or template, split, batch.

Public API:
- `DataConfig`: what to load and how (embedded in the training recipe as its `data` section).
- `load_raw(path, format, sample_by) -> datasets.Dataset`: a local json/jsonl/parquet/text/csv file or
  directory, or a Hub dataset name (clear AdaptError offline or when it is missing).
- `prepare_datasets(config, tokenizer) -> PreparedData`: tokenized train (and eval) datasets + `DataStats`.
- `pack_documents(docs, eos_id, max_length, pad_id, ...)`: text mode packing into fixed-length blocks.
- `encode_chat(messages, tokenizer, ...)`: chat mode, prompt_mask True on prompt tokens.
- `Collator(pad_id)`: list of examples -> dict of tensors, right padded to the batch max.
- `document_mask(segment_ids [b, l]) -> bool [b, 1, l, l]`: block-diagonal pattern for packed documents.
- `build_dataloaders(config, tokenizer, batch_size, eval_batch_size=None) -> (train, eval | None, stats)`.

Batches hold `input_ids`, `attention_mask` [b, l] always; `prompt_mask` [b, l] bool in chat mode;
`segment_ids` and `position_ids` [b, l] in text mode unless `allow_cross_document` (feed
`document_mask(segment_ids)` to `adapt.core.diffusion.build_attention_mask(segment_allowed=...)` and pass
`position_ids` to the model so that positions restart at each document).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from adapt.core.errors import AdaptError, first_line

log = logging.getLogger(__name__)

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class DataConfig:
    """Where the training data is and how it becomes batches."""

    path: str = ""
    """Local file or directory (json, jsonl, parquet, txt, csv) or a Hub dataset name."""
    eval_path: str | None = None
    """Separate held-out file; when unset, `eval_fraction` of `path` is held out."""
    format: Literal["auto", "json", "parquet", "text", "csv"] = "auto"
    """File format; auto picks it from the file extension."""
    mode: Literal["text", "chat"] = "text"
    """text: pack documents into blocks (pretraining-style); chat: prompt/response pairs (SFT)."""
    text_column: str = "text"
    """Column holding documents in text mode."""
    messages_column: str = "messages"
    """Column holding a list of {role, content} messages in chat mode (used when present)."""
    prompt_column: str = "prompt"
    """Prompt column in chat mode when there is no messages column."""
    response_column: str = "response"
    """Response column in chat mode when there is no messages column."""
    max_length: int = 512
    """Block length in text mode; longest sample in chat mode."""
    overflow: Literal["auto", "truncate", "skip", "split"] = "auto"
    """Samples longer than max_length: cut them, drop them, or (text mode) continue in the next block.
    auto: split in text mode (packing keeps every token), truncate in chat mode."""
    eval_fraction: float = 0.0
    """Held-out share of `path` (< 1) or number of examples (>= 1); 0 for no eval split."""
    allow_cross_document: bool = False
    """Text mode: let packed documents attend to each other (no block-diagonal mask, no position reset)."""
    pad_to_max_length_with_eos: bool = False
    """Chat mode: fill each sample up to max_length with EOS tokens that are trained on (teaches length)."""
    sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    """Plain-text files: one document per line, per blank-line separated paragraph, or per file."""
    num_proc: int | None = None
    """Worker processes for tokenization."""
    seed: int = 0
    """Seed of the eval split and of the shuffling."""

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise AdaptError(f"data.max_length must be at least 2, got {self.max_length}")
        if self.eval_fraction < 0:
            raise AdaptError(f"data.eval_fraction must be >= 0, got {self.eval_fraction}")
        if self.overflow == "auto":
            self.overflow = "split" if self.mode == "text" else "truncate"
        if self.mode == "chat" and self.overflow == "split":
            raise AdaptError("data.overflow=split only applies to text mode; use truncate or skip")
        if self.mode == "text" and self.pad_to_max_length_with_eos:
            raise AdaptError("data.pad_to_max_length_with_eos only applies to chat mode")


@dataclass
class DataStats:
    """What happened to the examples on the way to batches (reported in the training log)."""

    examples: int = 0
    """Raw examples read (train split)."""
    empty: int = 0
    """Examples with no text, dropped."""
    truncated: int = 0
    """Examples longer than max_length that were cut."""
    skipped: int = 0
    """Examples longer than max_length that were dropped."""
    samples: int = 0
    """Training samples produced (blocks in text mode)."""
    tokens: int = 0
    """Real (non-padding) training tokens."""
    eval_samples: int = 0

    def summary(self) -> str:
        return (
            f"{self.examples} examples -> {self.samples} samples, {self.tokens} tokens "
            f"({self.truncated} truncated, {self.skipped} skipped, {self.empty} empty); "
            f"{self.eval_samples} eval samples"
        )


@dataclass
class PreparedData:
    train: Any
    """Tokenized training `datasets.Dataset` (list-valued columns, unpadded)."""
    eval: Any | None
    stats: DataStats = field(default_factory=DataStats)


# --- loading ---------------------------------------------------------------------------------------


def load_raw(path: str, format: str = "auto", sample_by: str = "paragraph") -> Any:
    """A `datasets.Dataset` from a local file or directory, or the train split of a Hub dataset."""
    import datasets

    p = Path(path).expanduser()
    if not path:
        raise AdaptError("no training data given (data.path is empty)")
    if p.exists():
        return _load_local(p, format, sample_by)
    if p.suffix.lower() in FORMATS or not _HUB_ID.match(path) or path.startswith((".", "/", "~")):
        raise AdaptError(f"no such data file: {p}")
    try:
        ds = datasets.load_dataset(path, split="train")
    except Exception as e:  # the Hub raises many types (offline, missing, gated)
        raise AdaptError(f"could not load dataset {path!r} from the Hugging Face Hub: {first_line(e)}") from e
    return ds


def _load_local(p: Path, format: str, sample_by: str) -> Any:
    import datasets

    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    if format == "auto":
        kinds = {FORMATS.get(f.suffix.lower()) for f in files} - {None}
        if len(kinds) != 1:
            raise AdaptError(
                f"cannot tell the format of {p} from its extension; set data.format "
                f"(one of {', '.join(sorted(set(FORMATS.values())))})"
            )
        format = kinds.pop()
    suffixes = tuple(k for k, v in FORMATS.items() if v == format)
    data_files = [str(f) for f in files if f.suffix.lower() in suffixes] if p.is_dir() else [str(p)]
    if not data_files:
        raise AdaptError(f"no {format} files in {p}")
    if all(Path(f).stat().st_size == 0 for f in data_files):
        raise AdaptError(f"{p} is empty: no examples")
    if format in ("text", "json", "csv"):
        for f in data_files:
            check_utf8(Path(f))
    kwargs = {"sample_by": sample_by} if format == "text" else {}
    try:
        ds = datasets.load_dataset(format, data_files=data_files, split="train", **kwargs)
    except Exception as e:
        raise AdaptError(f"could not read {p} as {format}: {first_line(e)}") from e
    if len(ds) == 0:
        raise AdaptError(f"{p} is empty: no examples")
    return ds


def check_utf8(path: Path) -> None:
    """Fail with the file, line and byte of its first invalid UTF-8 sequence.

    datasets either hides the reason or reads JSON strings unchecked and fails much later, mid-tokenizing.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    read, lines = 0, 1
    with path.open("rb") as f:
        for chunk in [*iter(lambda: f.read(1 << 20), b""), b""]:
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                line = lines + e.object[: e.start].count(b"\n")
                raise AdaptError(
                    f"{path} is not UTF-8 text: {e.reason} at byte {read - pending + e.start} (line {line}); "
                    "re-save it as UTF-8"
                ) from None
            read, lines = read + len(chunk), lines + chunk.count(b"\n")


def split_eval(ds: Any, eval_fraction: float, seed: int) -> tuple[Any, Any | None]:
    """Hold out a fraction (< 1) or a count (>= 1) of the examples: (train, eval or None)."""
    if eval_fraction <= 0:
        return ds, None
    size: float | int = eval_fraction if eval_fraction < 1 else int(eval_fraction)
    n_eval = int(round(size * len(ds))) if isinstance(size, float) else size
    if n_eval < 1 or n_eval >= len(ds):
        raise AdaptError(
            f"data.eval_fraction={eval_fraction} gives {n_eval} eval and {len(ds) - n_eval} training "
            f"examples out of {len(ds)}; both need at least one"
        )
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def require_columns(ds: Any, needed: list[str], what: str) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise AdaptError(
            f"{what} needs column(s) {', '.join(missing)}; the data has: {', '.join(ds.column_names)}"
        )


# --- text mode -------------------------------------------------------------------------------------


def pack_documents(
    docs: list[list[int]],
    max_length: int,
    pad_id: int,
    overflow: str = "truncate",
    stats: DataStats | None = None,
) -> dict[str, list[list[int]]]:
    """Concatenate token lists (each already ending in EOS) and cut them into blocks of max_length.

    Returns columns input_ids, attention_mask, segment_ids (document index within the block, -1 on
    padding) and position_ids (restarting at 0 at each document piece). The last block is right padded,
    so the real tokens of all blocks concatenated are exactly the (kept) documents concatenated.
    """
    stats = stats if stats is not None else DataStats()
    flat: list[int] = []
    doc_of: list[int] = []
    for i, doc in enumerate(docs):
        if len(doc) > max_length and overflow != "split":
            if overflow == "skip":
                stats.skipped += 1
                continue
            stats.truncated += 1
            doc = doc[:max_length]
        flat.extend(doc)
        doc_of.extend([i] * len(doc))
    out: dict[str, list[list[int]]] = {
        k: [] for k in ("input_ids", "attention_mask", "segment_ids", "position_ids")
    }
    for start in range(0, len(flat), max_length):
        ids, owners = flat[start : start + max_length], doc_of[start : start + max_length]
        segments, positions = _segments(owners)
        pad = max_length - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["attention_mask"].append([1] * len(ids) + [0] * pad)
        out["segment_ids"].append(segments + [-1] * pad)
        out["position_ids"].append(positions + list(range(pad)))
    stats.tokens += len(flat)
    return out


def _segments(owners: list[int]) -> tuple[list[int], list[int]]:
    # Renumber document indices 0, 1, 2 ... inside one block; positions count from each document start.
    segments, positions = [], []
    seg, pos = -1, 0
    for k, owner in enumerate(owners):
        if k == 0 or owner != owners[k - 1]:
            seg, pos = seg + 1, 0
        segments.append(seg)
        positions.append(pos)
        pos += 1
    return segments, positions


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal pattern: a query sees only keys of its own document. [b, l] -> bool [b, 1, l, l]"""
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


def tokenize_documents(
    ds: Any, tokenizer: Any, column: str, num_proc: int | None
) -> tuple[list[list[int]], int]:
    """Token ids of each non-empty document followed by EOS: (token lists, number dropped as empty).

    The tokenizer adds its own special tokens (e.g. a BOS for Llama-style tokenizers), as in pretraining.
    """
    eos = _require_id(tokenizer, "eos")
    before = len(ds)
    ds = ds.filter(lambda b: [bool(x and x.strip()) for x in b[column]], batched=True, num_proc=num_proc)
    if len(ds) == 0:
        return [], before

    def encode(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[column])["input_ids"]
        return {"ids": [x + [eos] if not x or x[-1] != eos else x for x in ids]}

    ds = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc)
    return list(ds["ids"]), before - len(ds)


def prepare_text(ds: Any, tokenizer: Any, config: DataConfig, stats: DataStats) -> Any:
    """Text mode: tokenize, append EOS, pack into blocks."""
    import datasets

    require_columns(ds, [config.text_column], "text mode")
    n_examples = len(ds)
    docs, empty = tokenize_documents(ds, tokenizer, config.text_column, config.num_proc)
    packed = pack_documents(docs, config.max_length, _pad_id(tokenizer), config.overflow, stats)
    stats.examples += n_examples
    stats.empty += empty
    if config.allow_cross_document:
        del packed["segment_ids"], packed["position_ids"]
    return datasets.Dataset.from_dict(packed)


# --- chat mode -------------------------------------------------------------------------------------


def encode_chat(
    messages: list[dict[str, str]],
    tokenizer: Any,
    max_length: int,
    overflow: str = "truncate",
    pad_to_max_length_with_eos: bool = False,
) -> tuple[dict[str, list[int]] | None, str]:
    """One conversation -> (columns, status) with status "ok", "truncated" or "skipped" (columns None).

    Columns: input_ids, attention_mask, prompt_mask (1 on prompt tokens) and length (real tokens).
    The prompt is everything before the final assistant message, with the generation header; only the
    final response (plus a closing EOS) is trained on.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise AdaptError("each conversation must end with an assistant message")
    eos = _require_id(tokenizer, "eos")
    prompt = _template(tokenizer, messages[:-1], add_generation_prompt=True)
    full = _template(tokenizer, messages, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise AdaptError("the chat template does not render the prompt as a prefix of the conversation")
    if full[-1] != eos:
        full = full + [eos]
    status = "ok"
    if len(full) > max_length:
        if overflow == "skip" or len(prompt) >= max_length:
            return None, "skipped"
        full, status = full[:max_length], "truncated"
    n_real = len(full)
    if pad_to_max_length_with_eos:
        full = full + [eos] * (max_length - len(full))
    return {
        "input_ids": full,
        "attention_mask": [1] * len(full),
        "prompt_mask": [1] * len(prompt) + [0] * (len(full) - len(prompt)),
        "length": [n_real],
    }, status


def _template(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise AdaptError("chat mode needs a tokenizer with a chat template; this tokenizer has none")
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return list(ids)


def prepare_chat(ds: Any, tokenizer: Any, config: DataConfig, stats: DataStats) -> Any:
    """Chat mode: a messages column, or prompt/response columns, rendered with the chat template."""
    use_messages = config.messages_column in ds.column_names
    if not use_messages:
        require_columns(
            ds,
            [config.prompt_column, config.response_column],
            f"chat mode (without a {config.messages_column!r} column)",
        )

    def encode(example: dict[str, Any]) -> dict[str, Any]:
        if use_messages:
            messages = example[config.messages_column]
        else:
            messages = [
                {"role": "user", "content": example[config.prompt_column]},
                {"role": "assistant", "content": example[config.response_column]},
            ]
        encoded, status = encode_chat(
            messages, tokenizer, config.max_length, config.overflow, config.pad_to_max_length_with_eos
        )
        if encoded is None:
            encoded = {"input_ids": [], "attention_mask": [], "prompt_mask": [], "length": [0]}
        return {**encoded, "length": encoded["length"][0], "status": status}

    stats.examples += len(ds)
    if len(ds) == 0:
        return ds
    ds = ds.map(encode, remove_columns=ds.column_names, num_proc=config.num_proc)
    statuses = list(ds["status"])
    stats.truncated += statuses.count("truncated")
    stats.skipped += statuses.count("skipped")
    stats.tokens += sum(ds["length"])
    ds = ds.filter(lambda b: [s != "skipped" for s in b["status"]], batched=True, num_proc=config.num_proc)
    return ds.remove_columns(["status", "length"])


# --- putting it together -----------------------------------------------------------------------------


def prepare_datasets(config: DataConfig, tokenizer: Any) -> PreparedData:
    """Load, split, tokenize: the train and eval datasets of a recipe, with stats (logged)."""
    raw = load_raw(config.path, config.format, config.sample_by)
    if config.eval_path:
        train_raw, eval_raw = raw, load_raw(config.eval_path, config.format, config.sample_by)
        if config.eval_fraction > 0:
            log.warning("data.eval_path is set; data.eval_fraction is ignored")
    else:
        train_raw, eval_raw = split_eval(raw, config.eval_fraction, config.seed)
    prepare = prepare_text if config.mode == "text" else prepare_chat
    stats = DataStats()
    train = prepare(train_raw, tokenizer, config, stats)
    if len(train) == 0:
        raise AdaptError(f"no training samples left in {config.path} ({stats.summary()})")
    evald = None
    if eval_raw is not None:
        evald = prepare(eval_raw, tokenizer, config, DataStats())
        if len(evald) == 0:
            raise AdaptError(f"no eval samples left in {config.eval_path or config.path}")
    stats.samples = len(train)
    stats.eval_samples = 0 if evald is None else len(evald)
    log.info("data: %s", stats.summary())
    return PreparedData(train, evald, stats)


@dataclass
class Collator:
    """List of tokenized examples -> dict of tensors, right padded to the longest in the batch."""

    pad_id: int

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "prompt_mask": 0, "segment_ids": -1}
        batch: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            if key == "position_ids":
                rows = [e[key] + list(range(len(e[key]), length)) for e in examples]
            else:
                rows = [e[key] + [fill[key]] * (length - len(e[key])) for e in examples]
            batch[key] = torch.tensor(rows, dtype=torch.long)  # [b, l]
        if "prompt_mask" in batch:
            batch["prompt_mask"] = batch["prompt_mask"].bool()
        return batch


def build_dataloaders(
    config: DataConfig,
    tokenizer: Any,
    batch_size: int,
    eval_batch_size: int | None = None,
    shuffle: bool = True,
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader | None, DataStats]:
    """Train and eval DataLoaders of dicts of tensors, plus the data stats."""
    from torch.utils.data import DataLoader

    data = prepare_datasets(config, tokenizer)
    collate = Collator(_pad_id(tokenizer))
    generator = torch.Generator().manual_seed(config.seed)
    train = DataLoader(
        data.train, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator
    )
    evald = None
    if data.eval is not None:
        evald = DataLoader(data.eval, batch_size=eval_batch_size or batch_size, collate_fn=collate)
    return train, evald, data.stats


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return _require_id(tokenizer, "eos")


def _require_id(tokenizer: Any, name: str) -> int:
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None:
        raise AdaptError(f"the tokenizer has no {name.upper()} token; data preparation needs one")
    return int(value)
