"""Masked-diffusion math as pure torch functions: noise levels, masking, the loss, attention annealing.

Forward process (linear schedule, alpha_t = 1 - t): draw t ~ U(eps, 1) per sample and replace every
maskable token by the mask token independently with probability t. The model sees the noisy
sequence and is trained with cross-entropy on the masked positions only, weighted by 1/t and
normalised per sample (sequence length for pretraining, response length for SFT): an upper bound on
the negative log-likelihood (MDLM / LLaDA).

With `shift` (DiffuLLaMA, Dream) the logits at position i predict token i + 1, so the prediction
for position j is read from position j - 1 and position 0 is never masked.

Attention annealing (DiffuLLaMA) starts from the causal mask and opens each future edge with
probability p = min(1, (step + 1) / anneal_steps); afterwards attention is fully bidirectional.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapt.core.attention import MaskStyle, causal_allowed, key_padding_allowed


def sample_t(
    batch: int,
    eps: float = 1e-3,
    low_discrepancy: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Noise levels t ~ U(eps, 1), one per sample. [b]

    `low_discrepancy` stratifies the batch: t_i = eps + (1 - eps) * ((u + i / b) mod 1) with one
    shared u, so every interval [i / b, (i + 1) / b) of the unit range holds exactly one draw.
    """
    if low_discrepancy:
        u = torch.rand(1, generator=generator, device=device)
        unit = (u + torch.arange(batch, device=device) / batch) % 1.0  # [b]
    else:
        unit = torch.rand(batch, generator=generator, device=device)  # [b]
    return eps + (1.0 - eps) * unit


def maskable_positions(
    attention_mask: torch.Tensor,
    shift: bool,
    prompt_mask: torch.Tensor | None = None,
    train_on_padding: bool = False,
) -> torch.Tensor:
    """Positions that may be masked (and so enter the loss). [b, l] -> bool [b, l]

    Real tokens (padding too when `train_on_padding`), never prompt tokens, never column 0 or a row's
    first real token with `shift` (nothing before it could predict it).
    """
    if train_on_padding:
        allowed = torch.ones_like(attention_mask, dtype=torch.bool)
    else:
        allowed = attention_mask.bool().clone()
    if prompt_mask is not None:
        allowed &= ~prompt_mask.bool()
    if shift:
        allowed[:, 0] = False
        real = attention_mask.bool()
        allowed &= ~(real & (real.long().cumsum(-1) == 1))  # a left-padded row's first real token
    return allowed


def mask_tokens(
    input_ids: torch.Tensor,
    t: torch.Tensor,
    mask_id: int,
    maskable: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each maskable token by `mask_id` independently with probability t.

    input_ids [b, l], t [b], maskable bool [b, l] -> (noisy [b, l], masked bool [b, l]).
    """
    draws = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)  # [b, l]
    masked = (draws < t[:, None]) & maskable
    noisy = input_ids.masked_fill(masked, mask_id)
    return noisy, masked


def complementary_mask(masked: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """The complement of a mask within the maskable positions: a second, antithetic sample.

    Paired with noise level 1 - t, every maskable token is masked in exactly one of the two samples.
    """
    return maskable & ~masked


def masked_token_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor, shift: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy and argmax hits at the masked positions only.

    logits [b, l, V], input_ids [b, l], masked bool [b, l] -> (nll [n], sample index [n], correct [n])
    for the n masked positions in row-major order. Only the n needed rows of the logits are
    gathered and upcast to float32.
    """
    if shift and bool(masked[:, 0].any()):
        raise ValueError("with shift, position 0 has no prediction and must never be masked")
    rows, cols = masked.nonzero(as_tuple=True)  # [n], [n]
    source_cols = cols - 1 if shift else cols
    picked = logits[rows, source_cols].float()  # [n, V]
    targets = input_ids[rows, cols]  # [n]
    nll = F.cross_entropy(picked, targets, reduction="none")  # [n]
    correct = picked.argmax(-1) == targets  # [n]
    return nll, rows, correct


def diffusion_loss_per_sample(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    shift: bool,
    normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample ELBO estimate: sum over masked positions of CE / t, divided by `normalizer`. [b]"""
    batch, length = input_ids.shape
    nll, rows, _ = masked_token_nll(logits, input_ids, masked, shift)  # [n]
    weighted = nll / t.float()[rows]  # [n]
    sums = torch.zeros(batch, dtype=weighted.dtype, device=weighted.device).index_add(0, rows, weighted)
    if normalizer is None:
        return sums / length
    return sums / normalizer.to(sums.dtype).clamp(min=1)


def diffusion_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    shift: bool,
    normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked-diffusion loss: CE on masked positions weighted 1/t, per-sample sum / normalizer, batch mean.

    logits [b, l, V], input_ids [b, l] (the clean x0), masked bool [b, l], t [b]. `normalizer` [b]
    defaults to the sequence length l (pretraining); SFT passes the response length of each sample.
    """
    return diffusion_loss_per_sample(logits, input_ids, masked, t, shift, normalizer).mean()


def anneal_probability(step: int, anneal_steps: int) -> float:
    """Chance that a future edge is open at `step`: min(1, (step + 1) / anneal_steps); 1 without annealing."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / anneal_steps)


def random_causal_allowed(
    length: int,
    p: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Causal pattern with each future (upper-triangle) edge opened independently with probability p.

    -> bool [1, 1, l, l]; p = 0 is the causal mask, p = 1 the full one.
    """
    opened = torch.rand(length, length, generator=generator, device=device) < p  # [l, l]
    return causal_allowed(length, device) | opened[None, None]


def annealing_allowed(
    step: int,
    anneal_steps: int,
    length: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """DiffuLLaMA attention annealing pattern shared by the batch: bool [1, 1, l, l].

    None once attention is fully bidirectional (anneal_steps <= 0 or step + 1 >= anneal_steps): the
    caller then passes the plain 2D padding mask and the model's own bidirectional mask is used.
    """
    p = anneal_probability(step, anneal_steps)
    if p >= 1.0:
        return None
    return random_causal_allowed(length, p, generator, device)


def build_attention_mask(
    attention_mask: torch.Tensor,
    style: MaskStyle | torch.dtype,
    step: int = 0,
    anneal_steps: int = 0,
    segment_allowed: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The `attention_mask=` argument for a training batch.

    attention_mask [b, l] (0/1 padding); `segment_allowed` bool [b, 1, l, l] from packed documents
    (`adapt.training.data.document_mask`), if any. Returns the 2D mask unchanged when attention is fully
    bidirectional and there are no segments; otherwise the mask [b, 1, l, l] in `style` (`MaskStyle`, or a
    float dtype for an additive mask) combining annealing, segments and key padding. Every query keeps its
    own key so no row is empty.
    """
    length = attention_mask.shape[-1]
    annealed = annealing_allowed(step, anneal_steps, length, generator, attention_mask.device)
    if annealed is None and segment_allowed is None:
        return attention_mask
    allowed = key_padding_allowed(attention_mask)  # [b, 1, 1, l]
    if annealed is not None:
        allowed = allowed & annealed  # [b, 1, l, l]
    if segment_allowed is not None:
        allowed = allowed & segment_allowed.bool()
    allowed = allowed.expand(attention_mask.shape[0], 1, length, length)
    eye = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    return MaskStyle.of(style).dense(allowed | eye)
