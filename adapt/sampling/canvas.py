"""The canvas: prompts (or infilling templates) followed by mask tokens, padded into one batch.

Full-attention checkpoints pad on the left: every generated region is right-aligned, so blocks line up
across the batch. Block-diffusion checkpoints pad on the right: every row starts at column 0, so column
= position and the model's blocks (position // B) share their columns across the batch. Positions come
from `adapt.core.attention.position_ids_from_mask`, so padding never shifts a row's positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from adapt.core.attention import position_ids_from_mask
from adapt.core.checkpoint import DiffusionSettings
from adapt.core.errors import AdaptError


@dataclass
class Canvas:
    """A batch of rows being denoised."""

    ids: torch.Tensor  # [b, l] token ids, mask_id where still undecided
    attention_mask: torch.Tensor  # [b, l] 1 for real tokens, 0 for left padding
    position_ids: torch.Tensor  # [b, l]
    start: torch.Tensor  # [b] column of each row's first mask (start of its generated region)
    end: torch.Tensor  # [b] column after each row's last token (the canvas length with left padding)
    infill: list[bool]  # per row: a template with masks inside (its text after the masks is kept)
    prompts: list[list[int]]  # the unpadded rows as they started


def parse_infill(
    text: str, tokenizer: Any, mask_token: str, mask_id: int, max_length: int | None = None
) -> list[int]:
    """Token ids of a template where `<|mask|>` or `<|mask|>*N` stands for one or N masks.

    With `max_length`, a template longer than that fails before its masks are expanded.
    """
    pattern = re.compile(re.escape(mask_token) + r"(?:\*(\d+))?")
    ids: list[int] = []
    pos = 0
    for m in pattern.finditer(text):
        ids += encode(tokenizer, text[pos : m.start()])
        digits = m.group(1) or "1"
        count = int(digits) if len(digits) <= 12 else 10**12
        check_fits(len(ids) + count, max_length)
        ids += [mask_id] * count
        pos = m.end()
    return ids + encode(tokenizer, text[pos:])


def check_fits(length: int, max_length: int | None) -> None:
    """Refuse a row longer than the model's context (checked before the row is built)."""
    if max_length is not None and length > max_length:
        raise AdaptError(
            f"prompt plus output is {length} tokens, longer than the model's context of {max_length}; "
            "shorten the prompt or lower --gen-length"
        )


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """A text prompt as ids: through the chat template (as a user turn) or with the tokenizer's specials."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise AdaptError("this tokenizer has no chat template; drop --chat")
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return encode(tokenizer, text)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def build_canvas(
    prompts: list[str] | list[list[int]],
    tokenizer: Any,
    settings: DiffusionSettings,
    gen_length: int,
    chat: bool,
    max_length: int | None,
    device: torch.device,
    side: str = "left",
) -> Canvas:
    """Rows = prompt + gen_length masks (or a template with masks), padded on `side` to one length."""
    if not prompts:
        raise AdaptError("no prompts given")
    mask_id = settings.mask_token_id
    rows: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            has_mask = settings.mask_token in p
            ids = parse_infill(p, tokenizer, settings.mask_token, mask_id, max_length) if has_mask else None
            ids = ids if ids is not None else encode_prompt(tokenizer, p, chat)
        else:
            ids = [int(t) for t in p]
        if mask_id not in ids:
            check_fits(len(ids) + gen_length, max_length)
            ids = ids + [mask_id] * gen_length
        rows.append(with_first_token(ids, tokenizer, settings))
    for ids in rows:
        check_fits(len(ids), max_length)
    return pad_rows(rows, mask_id, pad_id(tokenizer), device, side)


def with_first_token(ids: list[int], tokenizer: Any, settings: DiffusionSettings) -> list[int]:
    """With shift, position 0 has no logits predicting it: it must be a given token (a prompt or BOS)."""
    if ids and ids[0] != settings.mask_token_id:
        return ids
    if not settings.shift:
        if not ids:
            raise AdaptError("empty prompt")
        return ids
    bos = tokenizer.bos_token_id
    if bos is None:
        raise AdaptError(
            "this checkpoint reads each prediction from the previous position (shift), so the text must "
            "start with a given token, and the tokenizer has no BOS; give a prompt"
        )
    return [bos, *ids]


def pad_id(tokenizer: Any) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def pad_rows(
    rows: list[list[int]], mask_id: int, pad: int, device: torch.device, side: str = "left"
) -> Canvas:
    """One [b, l] canvas from rows of different lengths, padded on the left or on the right."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        attention[i, span] = 1
    is_mask = ids == mask_id
    start = is_mask.long().argmax(-1)  # [b] first mask column
    end = torch.tensor([length if side == "left" else len(r) for r in rows])
    infill = [bool((~is_mask[i, int(start[i]) : int(end[i])]).any()) for i in range(len(rows))]
    return Canvas(
        ids=ids.to(device),
        attention_mask=attention.to(device),
        position_ids=position_ids_from_mask(attention).to(device),
        start=start.to(device),
        end=end.to(device),
        infill=infill,
        prompts=[list(r) for r in rows],
    )
