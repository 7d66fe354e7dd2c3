"""One denoising engine for every strategy: blocks left to right, steps inside a block.

Each step runs the model once, reads the prediction of every masked position of the current block
(from the previous column when the checkpoint has `shift`), proposes a token for each, and lets the
strategy choose which to keep. Rows are independent, so a batch gives the tokens each prompt gives alone:
- full-attention checkpoints: each row's blocks count from its own generated region (`Canvas.start`);
- block-diffusion checkpoints (`block_size` recorded): the blocks are the model's own, position // B, the
  attention is block-causal and the KV cache of committed blocks is exact (`BlockDenoiser`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from adapt.core.bounds import context_length
from adapt.core.checkpoint import DiffusionSettings, read_settings
from adapt.core.errors import AdaptError
from adapt.sampling.ar_stream import check_checkpoint, warn_one_step, warn_untrained
from adapt.sampling.cache import BlockDenoiser, Denoiser
from adapt.sampling.canvas import Canvas, build_canvas, encode
from adapt.sampling.config import SPECULATIVE, GenerationOutput, SamplingConfig
from adapt.sampling.speculative import SpeculativeDecoder
from adapt.sampling.strategies import SCHEDULES, Strategy, make_strategy, propose, skip_empty_steps

T = TypeVar("T")


@dataclass
class StepEvent:
    """What a streaming display sees after every step."""

    ids: torch.Tensor  # [b, l] the canvas
    canvas: Canvas
    block: int
    nfe: int
    mask_id: int


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str] | list[list[int]],
    config: SamplingConfig | None = None,
    settings: DiffusionSettings | None = None,
    strategy: Strategy | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
) -> GenerationOutput:
    """Denoise one canvas per prompt. A prompt containing the mask token (`<|mask|>*N`) is an infill template.

    `strategy` overrides `config.strategy` with any object following `adapt.sampling.strategies.Strategy`.
    """
    config = config or SamplingConfig()
    settings = settings or read_settings(model.config)
    if settings is None:
        raise AdaptError(
            "the model is not a diffusion checkpoint (no diffusion settings); run `adapt convert`"
        )
    config = resolve_cache(config, settings)
    warn_one_step(config, settings)
    device = next(model.parameters()).device
    side = "right" if settings.block_size else "left"
    canvas = build_canvas(
        prompts,
        tokenizer,
        settings,
        config.gen_length,
        config.chat,
        context_length(model.config),
        device,
        side,
    )
    if settings.block_size and any(canvas.infill):
        raise AdaptError(
            f"infilling needs a full-attention checkpoint: this one is block-causal (block size "
            f"{settings.block_size}), so a block never sees the text after it"
        )
    if config.strategy in SPECULATIVE:
        return decode_ar_stream(model, tokenizer, canvas, config, settings, on_step)
    approximate = config.cache != "none" and not settings.block_size
    groups = cache_groups(canvas) if approximate else [list(range(len(prompts)))]
    if len(groups) > 1:
        parts = [
            generate(model, tokenizer, [prompts[i] for i in g], config, settings, strategy, on_step)
            for g in groups
        ]
        return merge_outputs(parts, groups)
    strategy = strategy or make_strategy(config)
    eos_ids = stop_token_ids(tokenizer, model)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    denoiser = make_denoiser(model, config, settings)
    state = _Run(canvas, config, settings, strategy, eos_ids, generator, denoiser, on_step, tokenizer)
    _, seconds = timed(state.run, device)
    sequences, texts = finish(canvas, state.ids, tokenizer, config, eos_ids, settings.mask_token_id)
    return GenerationOutput(
        sequences, texts, denoiser.nfe, denoiser.nfe, seconds, state.decoded, canvas.prompts
    )


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """`fn()` under inference mode and the seconds it took (the device synchronised on both sides)."""
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        value = fn()
    _sync(device)
    return value, time.perf_counter() - t0


def decode_ar_stream(
    model: Any,
    tokenizer: Any,
    canvas: Canvas,
    config: SamplingConfig,
    settings: DiffusionSettings,
    on_step: Callable[[StepEvent], None] | None,
) -> GenerationOutput:
    """`ar` and `verify`: the checkpoint's AR stream, left to right or checking diffusion drafts."""
    draft_length, masks = check_checkpoint(config, settings)
    warn_untrained(config, settings)
    eos_ids = stop_token_ids(tokenizer, model)
    device = canvas.ids.device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    vocab = max(len(tokenizer), settings.mask_token_id + 1)
    decoder = SpeculativeDecoder(
        model,
        config,
        settings.mask_token_id,
        masks,
        draft_length,
        vocab,
        eos_ids,
        generator,
    )

    def stopped(region: list[int]) -> bool:
        if config.stop_at_eos and any(t in eos_ids for t in region):
            return True
        return (
            bool(config.stop)
            and first_stop(tokenizer.decode(region, skip_special_tokens=True), config.stop) is not None
        )

    def notify(ids: torch.Tensor, passes: int) -> None:
        if on_step is not None:
            on_step(StepEvent(ids, canvas, 0, passes, settings.mask_token_id))

    decoded, seconds = timed(lambda: decoder.decode(canvas, stopped, notify), device)
    sequences, texts = finish(canvas, decoded.ids, tokenizer, config, eos_ids, settings.mask_token_id)
    passes = decoded.passes
    out = GenerationOutput(sequences, texts, passes, passes, seconds, decoded.tokens, canvas.prompts)
    out.drafted, out.accepted = decoded.drafted, decoded.accepted
    return out


def resolve_cache(config: SamplingConfig, settings: DiffusionSettings) -> SamplingConfig:
    """`cache=auto` made concrete, and the sampling settings checked against a block checkpoint."""
    import dataclasses

    block = settings.block_size
    if config.strategy in SPECULATIVE:
        check_checkpoint(config, settings)
    if config.cache == "auto":
        return resolve_cache(dataclasses.replace(config, cache="prefix" if block else "none"), settings)
    if not block:
        return config
    if config.cache == "dual":
        raise AdaptError(
            f"--cache dual is for full-attention checkpoints; this block checkpoint (block size {block}) "
            "has an exact cache: use --cache prefix (the default) or none"
        )
    if config.block_length is not None and config.block_length % block:
        raise AdaptError(
            f"--block-length {config.block_length} must be a multiple of the checkpoint's block size {block} "
            f"(e.g. {block} or {2 * block}), or left out"
        )
    return config


def make_denoiser(model: Any, config: SamplingConfig, settings: DiffusionSettings) -> Any:
    """The forward passes a checkpoint needs: block-causal with an exact cache, or full attention."""
    if settings.block_size:
        cached = config.cache == "prefix"
        return BlockDenoiser(
            model, settings.block_size, cached, settings.clean_attention, settings.mask_token_id
        )
    return Denoiser(model, config.cache, config.cache_refresh)


def cache_groups(canvas: Canvas) -> list[list[int]]:
    """Rows whose generated regions start at the same distance from the end, in first-seen order.

    Plain prompts all share one region; infilling templates with masks in different places do not.
    The KV cache is shared by the batch and holds the columns before the earliest block, so rows whose
    blocks do not line up would see a different approximation than alone: they are decoded apart.
    """
    groups: dict[int, list[int]] = {}
    for r, start in enumerate(canvas.start.tolist()):
        groups.setdefault(canvas.ids.shape[1] - int(start), []).append(r)
    return list(groups.values())


def merge_outputs(parts: list[GenerationOutput], groups: list[list[int]]) -> GenerationOutput:
    """One output in the original row order from the outputs of row groups; counters add up."""
    n = sum(len(g) for g in groups)
    sequences: list[list[int]] = [[] for _ in range(n)]
    texts, prompts = [""] * n, [[] for _ in range(n)]
    for part, rows in zip(parts, groups, strict=True):
        for j, r in enumerate(rows):
            sequences[r], texts[r], prompts[r] = part.sequences[j], part.texts[j], part.prompts[j]
    return GenerationOutput(
        sequences=sequences,
        texts=texts,
        nfe=sum(p.nfe for p in parts),
        steps=sum(p.steps for p in parts),
        seconds=sum(p.seconds for p in parts),
        tokens=sum(p.tokens for p in parts),
        prompts=prompts,
    )


class _Run:
    """The mutable state of one generate call."""

    def __init__(
        self,
        canvas: Canvas,
        config: SamplingConfig,
        settings: DiffusionSettings,
        strategy: Strategy,
        eos_ids: list[int],
        generator: torch.Generator,
        denoiser: Denoiser,
        on_step: Callable[[StepEvent], None] | None,
        tokenizer: Any,
    ) -> None:
        self.canvas, self.config, self.strategy = canvas, config, strategy
        self.mask_id, self.shift = settings.mask_token_id, int(settings.shift)
        self.eos_ids, self.generator, self.denoiser = eos_ids, generator, denoiser
        self.on_step, self.tokenizer = on_step, tokenizer
        self.ids = canvas.ids.clone()  # [b, l]
        self.done = torch.zeros(len(canvas.prompts), dtype=torch.bool, device=canvas.ids.device)  # [b]
        self.decoded = 0
        self.vocab = max(len(tokenizer), settings.mask_token_id + 1)
        self.model_block = settings.block_size  # None: full attention, blocks are the config's
        self.width = self.model_block or config.block  # columns of one block
        steps = config.steps if config.steps is not None else config.gen_length
        self.steps_per_block = (
            max(1, steps * self.model_block // config.gen_length)
            if self.model_block
            else config.steps_per_block
        )

    def run(self) -> None:
        for i, (begin, end) in enumerate(self.plan()):
            if not bool(((end > begin) & ~self.done).any()):
                continue  # no row generates here (the prompts of other rows)
            self.run_block(i, begin, end)
            self.update_done(end)
            if bool(self.done.all()):
                break

    def plan(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(begin [b], end [b]) of every block, in order: each row's columns to decode in that block."""
        start, stop = self.canvas.start, self.canvas.end
        if self.model_block is None:  # semi-autoregressive blocks counted from each row's region
            for i in range(
                max(-(-(int(e) - int(s)) // self.width) for s, e in zip(start, stop, strict=True))
            ):
                begin = start + i * self.width
                yield begin, (begin + self.width).clamp(max=stop)
            return
        size = self.model_block  # the model's blocks: the same columns for every row
        for c in range(int(start.min()) // size, (int(stop.max()) - 1) // size + 1):
            yield start.clamp(min=c * size), stop.clamp(max=(c + 1) * size)

    def run_block(self, index: int, begin: torch.Tensor, end: torch.Tensor) -> None:
        length = self.ids.shape[1]
        window = begin[:, None] + torch.arange(self.width, device=begin.device)[None, :]  # [b, w]
        valid = (window < end[:, None]) & ~self.done[:, None]  # [b, w]
        window = window.clamp(max=length - 1)
        lo = max(int(begin.min()) - self.shift, 0)
        hi = int(end.max())
        self.denoiser.start_block(lo, hi if self.config.cache == "dual" or self.model_block else length)
        source = window - self.shift  # [b, w] the column whose logits predict each window position

        candidates = valid & (self.ids.gather(1, window) == self.mask_id)  # [b, w]
        masked = candidates.sum(-1)  # [b]
        if self.strategy.scheduled:
            steps = self.steps_per_block
            k_table = row_schedule(masked, steps, self.config.step_schedule)  # [b, steps]
            max_steps = int((k_table > 0).sum(-1).max())
        else:
            k_table, max_steps = None, int(masked.max())
        for step in range(max_steps):
            if not bool(candidates.any()):
                break
            canvas = self.canvas
            keep = source[candidates].unique()  # [k] sorted: only still-masked positions need logits
            logits = self.denoiser.logits(self.ids, canvas.attention_mask, canvas.position_ids, keep)
            readout = torch.searchsorted(keep, source).clamp(max=keep.numel() - 1)  # [b, w] into keep
            logits = logits.gather(1, readout[..., None].expand(-1, -1, logits.shape[-1]))  # [b, w, V]
            proposal = propose(logits, self.config, self.mask_id, self.eos_ids, self.generator, self.vocab)
            k = k_table[:, step] if k_table is not None else masked.new_zeros(masked.shape)
            transfer = self.strategy.select(proposal, candidates, k, self.generator) & candidates
            rows, slots = transfer.nonzero(as_tuple=True)
            self.ids[rows, window[rows, slots]] = proposal.tokens[rows, slots]
            self.decoded += int(transfer.sum())
            candidates &= ~transfer
            if self.on_step is not None:
                self.on_step(StepEvent(self.ids, self.canvas, index, self.denoiser.nfe, self.mask_id))

    def update_done(self, end: torch.Tensor) -> None:
        """Rows whose decided part already holds an EOS or a stop string need no further blocks."""
        for r in range(self.ids.shape[0]):
            if self.done[r] or self.canvas.infill[r]:
                continue
            region = self.ids[r, int(self.canvas.start[r]) : int(end[r])].tolist()
            hit = self.config.stop_at_eos and any(t in self.eos_ids for t in region)
            if not hit and self.config.stop:
                text = self.tokenizer.decode(region, skip_special_tokens=True)
                hit = first_stop(text, self.config.stop) is not None
            if hit or int(end[r]) >= int(self.canvas.end[r]):
                self.done[r] = True


def row_schedule(masked: torch.Tensor, steps: int, kind: str = "uniform") -> torch.Tensor:
    """Tokens each row unmasks per step of a block, steps that unmask nothing left out. [b] -> [b, steps]

    Uniform: LLaDA's even split over min(steps, masked[b]) steps, zero-padded to `steps`.
    """
    return skip_empty_steps(SCHEDULES[kind](masked, steps))


def finish(
    canvas: Canvas,
    ids: torch.Tensor,
    tokenizer: Any,
    config: SamplingConfig,
    eos_ids: list[int],
    mask_id: int,
) -> tuple[list[list[int]], list[str]]:
    """Per row: the generated tokens (cut at EOS) or the filled template, and its text (cut at stops)."""
    sequences, texts = [], []
    for r in range(ids.shape[0]):
        if canvas.infill[r]:
            seq = ids[r, int(canvas.end[r]) - len(canvas.prompts[r]) : int(canvas.end[r])].tolist()
        else:
            seq = ids[r, int(canvas.start[r]) : int(canvas.end[r])].tolist()
            if config.stop_at_eos:
                seq = cut_at(seq, lambda t: t in eos_ids)
            seq = cut_at(seq, lambda t: t == mask_id)  # masks left by rows that stopped early
        seq, text = cut_at_stop(seq, tokenizer, config.stop)
        sequences.append(seq)
        texts.append(text)
    return sequences, texts


def cut_at(seq: list[int], stop: Callable[[int], bool]) -> list[int]:
    for i, t in enumerate(seq):
        if stop(t):
            return seq[:i]
    return seq


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index in `text` where the earliest stop string begins, or None when none occurs."""
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def cut_at_stop(seq: list[int], tokenizer: Any, stops: tuple[str, ...]) -> tuple[list[int], str]:
    """Text cut before the first stop string, and the shortest token prefix that still covers it."""
    text = tokenizer.decode(seq, skip_special_tokens=True)
    cut = first_stop(text, stops)
    if cut is None:
        return seq, text
    for n in range(len(seq) + 1):
        if len(tokenizer.decode(seq[:n], skip_special_tokens=True)) >= cut:
            return seq[:n], text[:cut]
    return seq, text[:cut]


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Ids that end an output: the tokenizer's EOS, every id of `generation_config.eos_token_id` (an int
    or a list; chat models often have several) and the chat template's end-of-turn token."""
    ids = {tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(int(i) for i in ids if i is not None)


PROBE = "adapt end of turn probe"


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token the chat template writes right after an assistant message (<|im_end|>,
    <|eot_id|>, <end_of_turn>, ...): [id], or [] without a template or when none follows the message."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    from jinja2 import TemplateError

    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except (TemplateError, ValueError, KeyError, TypeError, IndexError):
        return []  # a template that cannot render an assistant reply names no end-of-turn token
    if not isinstance(text, str) or PROBE not in text:
        return []
    tail = text[text.rindex(PROBE) + len(PROBE) :]
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    for t in encode(tokenizer, tail):
        if t in special:
            return [int(t)]
        if tokenizer.decode([t]).strip():
            return []  # text, not a special token, closes the turn
    return []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
