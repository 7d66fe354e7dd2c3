"""Per-step decisions: which token each masked position gets, and which positions are unmasked.

Everything works on the current window of each row: logits [b, w, V] and a boolean `candidates` [b, w]
(positions still masked). A strategy returns the boolean `transfer` [b, w] of positions to unmask now;
scheduled strategies unmask exactly `k[b]` positions, adaptive ones decide how many themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from adapt.sampling.config import SamplingConfig

NEG_INF = float("-inf")


@dataclass
class Proposal:
    """The model's proposal for every window position."""

    tokens: torch.Tensor  # [b, w] chosen token ids
    probs: torch.Tensor  # [b, w, V] distribution the scores (margin, entropy) are read from
    confidence: torch.Tensor  # [b, w] probability of the chosen token under `probs`


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as Dream does it: a token is removed when the tokens ranked above it already
    hold more than `top_p` of the mass (so the top token always stays). [b, w, V] -> [b, w, V]"""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)  # [b, w, V] mass up to and including each rank
    drop_sorted = torch.zeros_like(cum, dtype=torch.bool)
    drop_sorted[..., 1:] = cum[..., :-1] > top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits (and ties with the k-th); 0 is off. [b, w, V] -> [b, w, V]"""
    if not top_k or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]  # [b, w, 1]
    return logits.masked_fill(logits < kth, NEG_INF)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Dream's order: top-p, then top-k; removed tokens get -inf. [b, w, V] -> [b, w, V]"""
    return top_k_filter(top_p_filter(logits, top_p), top_k)


def sampling_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The logits tokens are drawn from: divided by the temperature first, then filtered (Dream's order)."""
    if config.temperature > 0:
        logits = logits / config.temperature
    return filter_logits(logits, config.top_k, config.top_p)


def ranks_tempered(config: SamplingConfig) -> bool:
    """Whether positions are ranked by the distribution sampled from (Dream) or by the model's (LLaDA)."""
    if config.confidence == "auto":
        return config.strategy in ("margin", "entropy")
    return config.confidence == "tempered"


def model_logits(
    logits: torch.Tensor, config: SamplingConfig, mask_id: int, eos_ids: list[int], vocab_size: int | None
) -> torch.Tensor:
    """float32 logits without the tokens that are never proposed, less the EOS penalty. [b, w, V]"""
    logits = logits.float()
    logits[..., mask_id] = NEG_INF
    if vocab_size is not None:
        logits[..., vocab_size:] = NEG_INF
    if eos_ids and config.eos_penalty:
        logits[..., eos_ids] -= config.eos_penalty
    return logits


def gumbel_argmax(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A sample of softmax(logits) per position by the Gumbel-max trick, in float64. [b, w, V] -> [b, w]"""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
    return (logits.double() + gumbel).argmax(-1)


def propose(
    logits: torch.Tensor,
    config: SamplingConfig,
    mask_id: int,
    eos_ids: list[int],
    generator: torch.Generator | None,
    vocab_size: int | None = None,
) -> Proposal:
    """Pick a token for every window position: argmax (greedy) or a Gumbel-max sample. logits [b, w, V]

    Never proposed: the mask token, and embedding rows beyond the tokenizer (`vocab_size`; padding rows).
    Confidence is the chosen token's probability under the model's own softmax, in float64 (LLaDA,
    Fast-dLLM; over the tokens top-k/top-p kept, when they are on), or under the tempered, filtered
    distribution it was drawn from (Dream); `config.confidence` chooses.
    """
    logits = model_logits(logits, config, mask_id, eos_ids, vocab_size)  # [b, w, V]
    sampled = sampling_logits(logits, config)
    tokens = gumbel_argmax(sampled, generator) if config.temperature > 0 else sampled.argmax(-1)  # [b, w]
    ranked = sampled if ranks_tempered(config) else logits.masked_fill(sampled == NEG_INF, NEG_INF)
    probs = ranked.softmax(-1)
    source = probs if ranks_tempered(config) else ranked.double().softmax(-1)
    confidence = source.gather(-1, tokens[..., None]).squeeze(-1)  # [b, w]
    if eos_ids and config.eos_confidence_cap is not None:
        capped = confidence.clamp(max=config.eos_confidence_cap)
        is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
        confidence = torch.where(is_eos, capped, confidence)
    return Proposal(tokens=tokens, probs=probs, confidence=confidence)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each distribution. [b, w, V] -> [b, w]"""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def margin(probs: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability. [b, w, V] -> [b, w]"""
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def select_top(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Exactly min(k[b], #candidates[b]) highest-scoring candidates per row. scores [b, w], k [b] -> [b, w]"""
    scores = scores.masked_fill(~candidates, NEG_INF)
    kmax = int(k.max().item()) if k.numel() else 0
    if kmax == 0:
        return torch.zeros_like(candidates)
    top = scores.topk(min(kmax, scores.shape[-1]), dim=-1).indices  # [b, kmax]
    keep = torch.arange(top.shape[-1], device=k.device)[None, :] < k[:, None]  # [b, kmax]
    transfer = torch.zeros_like(candidates)
    transfer.scatter_(-1, top, keep)
    return transfer & candidates


def select_threshold(confidence: torch.Tensor, candidates: torch.Tensor, tau: float) -> torch.Tensor:
    """Fast-dLLM's rule: every candidate with confidence >= tau, and the most confident one in any case."""
    one = select_top(confidence, candidates, candidates.any(-1).long())
    return one | (candidates & (confidence >= tau))


def select_entropy_bounded(ent: torch.Tensor, candidates: torch.Tensor, bound: float) -> torch.Tensor:
    """EB-sampler: the largest low-entropy set U with sum(H) - max(H) <= bound (never empty)."""
    ent = ent.masked_fill(~candidates, float("inf"))
    sorted_ent, order = ent.sort(dim=-1)  # [b, w] ascending
    finite = sorted_ent.isfinite()
    cum = torch.where(finite, sorted_ent, 0.0).cumsum(-1)
    # sorted ascending, so the max of the first j+1 entries is entry j
    within = (cum - torch.where(finite, sorted_ent, 0.0) <= bound) & finite
    within = within.long().cumprod(-1).bool()  # a prefix of the order
    transfer = torch.zeros_like(candidates)
    transfer.scatter_(-1, order, within)
    return transfer & candidates


class Strategy(Protocol):
    """Picks the positions to unmask at one step; `scheduled` ones unmask exactly k[b] per row."""

    scheduled: bool

    def select(
        self, proposal: Proposal, candidates: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """candidates [b, w] bool (still masked), k [b] -> transfer [b, w] bool."""
        ...


Scorer = Callable[[Proposal, "torch.Generator | None"], torch.Tensor]


@dataclass
class Ranked:
    """Scheduled strategy: unmask the k[b] best-scoring masked positions (LLaDA, Dream)."""

    scorer: Scorer
    scheduled: bool = True

    def select(
        self, proposal: Proposal, candidates: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        return select_top(self.scorer(proposal, generator), candidates, k)


@dataclass
class Threshold:
    """Fast-dLLM parallel decoding: every position with confidence >= tau, at least one."""

    tau: float
    scheduled: bool = False

    def select(
        self, proposal: Proposal, candidates: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        return select_threshold(proposal.confidence, candidates, self.tau)


@dataclass
class EntropyBounded:
    """EB-sampler: the largest low-entropy set whose entropy, less its largest term, stays under a bound."""

    bound: float
    scheduled: bool = False

    def select(
        self, proposal: Proposal, candidates: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        return select_entropy_bounded(entropy(proposal.probs), candidates, self.bound)


def _random_scores(proposal: Proposal, generator: torch.Generator | None) -> torch.Tensor:
    c = proposal.confidence
    return torch.rand(c.shape, generator=generator, device=c.device)


SCORERS: dict[str, Scorer] = {
    "low_confidence": lambda p, g: p.confidence,
    "margin": lambda p, g: margin(p.probs),
    "entropy": lambda p, g: -entropy(p.probs),
    "random": _random_scores,
}


def make_strategy(config: SamplingConfig) -> Strategy:
    """The strategy named in `config`."""
    if config.strategy == "threshold":
        return Threshold(config.threshold)
    if config.strategy == "entropy_bounded":
        return EntropyBounded(config.entropy_bound)
    return Ranked(SCORERS[config.strategy])


def schedule(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: how many tokens each row unmasks at each step of a block.

    masked [b] masks in the block -> [b, steps]; spread evenly, the remainder on the first steps.
    """
    base = masked // steps  # [b]
    extra = masked % steps
    k = base[:, None].expand(-1, steps).clone()
    k += (torch.arange(steps, device=masked.device)[None, :] < extra[:, None]).long()
    return k


DREAM_EPS = 1e-3  # Dream's default `eps`: the last time of its schedule


def dream_schedule(masked: torch.Tensor, steps: int, eps: float = DREAM_EPS) -> torch.Tensor:
    """Dream's schedule: times t_i = linspace(1, eps, steps + 1); step i unmasks
    floor(n_i (1 - t_{i+1} / t_i)) of the n_i masks still left (in float32, as Dream computes it), and the
    last step unmasks the rest.

    masked [b] -> [b, steps]; each row uses its own count (Dream averages the count over the batch).
    """
    t = torch.linspace(1.0, eps, steps + 1, device=masked.device)  # [steps + 1] float32
    left = masked.clone()  # [b]
    k = torch.zeros(masked.shape[0], steps, dtype=torch.long, device=masked.device)
    for i in range(steps):
        last = i == steps - 1
        k[:, i] = left if last else (left.float() * (1 - t[i + 1] / t[i])).floor().long()
        left = left - k[:, i]
    return k


def skip_empty_steps(table: torch.Tensor) -> torch.Tensor:
    """Each row's non-zero entries moved to the front, in order: steps that unmask nothing are not run.

    [b, steps] -> [b, steps]. The model is not conditioned on time, so a step that unmasks nothing would
    only repeat the same forward pass (dllm skips them too).
    """
    order = torch.sort((table == 0).int(), dim=-1, stable=True).indices  # [b, steps]
    return table.gather(-1, order)


SCHEDULES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "uniform": schedule,
    "dream": dream_schedule,
}
