"""What a sampling run is asked to do (`SamplingConfig`) and what it returns (`GenerationOutput`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from adapt.core.errors import AdaptError

Strategy = Literal[
    "low_confidence", "random", "margin", "entropy", "threshold", "entropy_bounded", "ar", "verify"
]
CacheMode = Literal["auto", "none", "prefix", "dual"]
Confidence = Literal["auto", "untempered", "tempered"]
StepSchedule = Literal["uniform", "dream"]
STRATEGIES: tuple[str, ...] = (
    "low_confidence",
    "random",
    "margin",
    "entropy",
    "threshold",
    "entropy_bounded",
    "ar",
    "verify",
)
SPECULATIVE: tuple[str, ...] = ("ar", "verify")  # decoders of a causal-clean checkpoint's AR stream
CACHE_MODES: tuple[str, ...] = ("auto", "none", "prefix", "dual")
CONFIDENCES: tuple[str, ...] = ("auto", "untempered", "tempered")
STEP_SCHEDULES: tuple[str, ...] = ("uniform", "dream")


@dataclass
class SamplingConfig:
    """How to denoise; every field is also an option of `adapt sample`."""

    gen_length: int = 128
    """Number of tokens to generate after each prompt (ignored for infilling templates)."""
    steps: int | None = None
    """Denoising steps over the whole output for scheduled strategies (default: gen_length)."""
    block_length: int | None = None
    """Semi-autoregressive block size: blocks are denoised left to right (default: gen_length; for a
    block-diffusion checkpoint its own block size, and a multiple of it only groups the step budget)."""
    strategy: Strategy = "low_confidence"
    """Which masked positions to unmask at each step; `ar` and `verify` decode a block checkpoint with
    causal clean attention through its AR stream (left to right, or drafts by diffusion verified by it)."""
    step_schedule: StepSchedule = "uniform"
    """Tokens per step of scheduled strategies: uniform (LLaDA: an even split, the remainder first) or dream
    (Dream: floor(left * (1 - s/t)) on the times linspace(1, 1e-3, steps + 1), the rest on the last step)."""
    threshold: float = 0.9
    """Confidence threshold of `threshold` decoding (Fast-dLLM): unmask all >= it, at least one."""
    draft_length: int | None = None
    """`verify`: diffusion drafts per pass, at most mask_block - 1 (default: mask_block - 1 when that is
    given, else 1, the fastest on the CPUs measured; docs/results/verify.md)."""
    mask_block: int | None = None
    """`verify`: masks in each mask block, 2 to the block size (default: draft_length + 1). Mask k drafts
    the token after the bonus + k, so a block of m masks drafts at most m - 1 tokens; fewer masks cost
    fewer tokens per pass (what makes `redraft` cheap where each token of a pass costs time)."""
    candidates: int = 1
    """`verify`: candidates for the next token's draft, each checked by the AR head in the same pass (a
    one-level draft tree: greedy takes the drafter's top k, sampling draws k from it). With more than one
    the draft length is 1 and every candidate gets its own mask block for the next drafts."""
    redraft: bool = True
    """`verify`: one mask block per possible number of accepted drafts (TiDAR), so the pass after a
    rejection has drafts too; costs a mask block per draft in every pass. False: the pass after a
    rejection only drafts anew."""
    entropy_bound: float = 1.0
    """Entropy budget (nats) per step of `entropy_bounded` decoding (EB-sampler)."""
    temperature: float = 0.0
    """0 is greedy (deterministic); > 0 samples with Gumbel noise."""
    top_k: int = 0
    """Keep only the k most likely tokens before sampling (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this total probability (1: off).
    Temperature is applied first, then top-p, then top-k (Dream's order)."""
    confidence: Confidence = "auto"
    """Which probabilities rank positions at temperature > 0: untempered (the model's softmax over the tokens
    top-p/top-k kept; LLaDA, Fast-dLLM, dllm), tempered (the distribution sampled from: temperature, top-p,
    top-k; Dream), or auto: tempered for margin and entropy (Dream's strategies), untempered otherwise.
    At temperature 0 both are the same."""
    cache: CacheMode = "auto"
    """KV cache: none, prefix (prompt and finished blocks) or dual (prefix and the masked suffix); auto is
    prefix for block-diffusion checkpoints (exact) and none for full-attention ones (approximate)."""
    cache_refresh: int = 0
    """Also recompute the cache every N steps inside a block (0: only when a block starts)."""
    stop_at_eos: bool = True
    """Cut each output at its first EOS, and stop once every output has one (checked when a block is done).
    EOS here is every stop token: the tokenizer's EOS, each id of `generation_config.eos_token_id` and the
    chat template's end-of-turn token."""
    eos_penalty: float = 0.0
    """Subtracted from the EOS logits (every stop token) at every step: fights EOS flooding the tail."""
    eos_confidence_cap: float | None = None
    """Cap the confidence of positions that chose EOS, so they are decided last (None: off)."""
    stop: tuple[str, ...] = ()
    """Stop strings: each output is cut before the first one, and generation stops once all have one."""
    chat: bool = False
    """Wrap each text prompt in the tokenizer's chat template as a user turn."""
    seed: int = 0
    """Seed of the Gumbel noise and of `random` remasking."""

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        if self.gen_length < 1:
            raise AdaptError(f"gen_length must be >= 1, not {self.gen_length}")
        if self.strategy not in STRATEGIES:
            raise AdaptError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.step_schedule not in STEP_SCHEDULES:
            raise AdaptError(
                f"unknown step schedule {self.step_schedule!r}; choose one of {', '.join(STEP_SCHEDULES)}"
            )
        if self.confidence not in CONFIDENCES:
            raise AdaptError(
                f"unknown confidence {self.confidence!r}; choose one of {', '.join(CONFIDENCES)}"
            )
        if self.cache not in CACHE_MODES:
            raise AdaptError(f"unknown cache mode {self.cache!r}; choose one of {', '.join(CACHE_MODES)}")
        block = self.block_length if self.block_length is not None else self.gen_length
        if not 1 <= block <= self.gen_length or self.gen_length % block:
            raise AdaptError(
                f"block_length ({block}) must divide gen_length ({self.gen_length}) and be at most gen_length"
            )
        steps = self.steps if self.steps is not None else self.gen_length
        blocks = self.gen_length // block
        if not blocks <= steps <= self.gen_length or steps % blocks:
            raise AdaptError(
                f"steps ({steps}) must be a multiple of the number of blocks ({blocks}) "
                f"and at most gen_length ({self.gen_length})"
            )
        _check_range("threshold", self.threshold, 0.0, 1.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.temperature < 0:
            raise AdaptError(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise AdaptError(f"top_k must be >= 0, not {self.top_k}")
        if self.entropy_bound < 0:
            raise AdaptError(f"entropy_bound must be >= 0, not {self.entropy_bound}")
        if self.draft_length is not None and self.draft_length < 1:
            raise AdaptError(f"draft_length must be >= 1, not {self.draft_length}")
        if self.candidates < 1:
            raise AdaptError(f"candidates must be >= 1, not {self.candidates}")
        if self.mask_block is not None and self.mask_block < 2:
            raise AdaptError(
                f"mask_block must be >= 2 (mask k drafts the token after the bonus + k), not "
                f"{self.mask_block}"
            )
        if self.cache_refresh < 0:
            raise AdaptError(f"cache_refresh must be >= 0, not {self.cache_refresh}")
        if self.eos_confidence_cap is not None:
            _check_range("eos_confidence_cap", self.eos_confidence_cap, 0.0, 1.0)
        if any(not s for s in self.stop):
            raise AdaptError("stop strings must not be empty")

    @property
    def blocks(self) -> int:
        """Number of blocks of the generated part."""
        return self.gen_length // self.block

    @property
    def block(self) -> int:
        return self.block_length if self.block_length is not None else self.gen_length

    @property
    def steps_per_block(self) -> int:
        return (self.steps if self.steps is not None else self.gen_length) // self.blocks


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise AdaptError(f"{name} must be in {bracket}{low}, {high}], not {value}")


@dataclass
class GenerationOutput:
    """Result of `adapt.generate`: one entry per prompt, plus counters for the whole batch."""

    sequences: list[list[int]]
    """Generated token ids per prompt (for infilling: the whole filled template)."""
    texts: list[str]
    """Decoded `sequences`, cut at stop strings."""
    nfe: int
    """Forward passes of the model (network function evaluations)."""
    steps: int
    """Denoising steps taken (each step is one forward pass)."""
    seconds: float
    """Wall-clock time of the denoising loop."""
    tokens: int
    """Positions the model decoded (masks filled by the model, summed over the batch)."""
    prompts: list[list[int]] = field(default_factory=list)
    """The token ids each canvas started from (prompt, or template with mask ids)."""
    drafted: list[int] = field(default_factory=list)
    """`verify`: drafts verified, by draft position (summed over the batch)."""
    accepted: list[int] = field(default_factory=list)
    """`verify`: drafts accepted, by draft position."""

    @property
    def acceptance(self) -> list[float]:
        """`verify`: share of the drafts at each position that the AR head accepted."""
        return acceptance(self.accepted, self.drafted)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "texts": self.texts,
            "sequences": self.sequences,
            "nfe": self.nfe,
            "steps": self.steps,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 2),
            **({"acceptance_by_position": [round(a, 4) for a in self.acceptance]} if self.drafted else {}),
        }


def acceptance(accepted: list[int], drafted: list[int]) -> list[float]:
    """Share of the drafts at each draft position that were accepted (0 where none was drafted)."""
    return [a / d if d else 0.0 for a, d in zip(accepted, drafted, strict=True)]


def add_counts(a: list[int], b: list[int]) -> list[int]:
    """Per-position counts of two runs added up (an empty list counts as zeros)."""
    if not a or not b:
        return list(a or b)
    return [x + y for x, y in zip(a, b, strict=True)]
