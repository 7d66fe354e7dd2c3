"""Which checkpoints and settings the AR-stream decoders (`ar`, `verify`) take, and what they warn about.

A block checkpoint trained with causal clean attention and shift holds an AR model in its clean stream;
anything else is refused in one line before a weight is read. Allowed with a warning: a checkpoint trained
without the AR term (its AR head is untrained), and multi-step decoding of one trained with wholly masked
blocks (`diffusion.full_mask`: it only learned one-step drafts).
"""

from __future__ import annotations

import logging

from adapt.core.checkpoint import DiffusionSettings
from adapt.core.errors import AdaptError
from adapt.sampling.config import SPECULATIVE, SamplingConfig

log = logging.getLogger(__name__)


def check_checkpoint(config: SamplingConfig, settings: DiffusionSettings) -> tuple[int, int]:
    """Refuse `ar` / `verify` where the checkpoint has no AR stream; -> (the draft length to use (0: ar),
    the masks per mask block)."""
    block, name = settings.block_size, config.strategy
    if block is None or settings.clean_attention != "causal" or not settings.shift:
        what = (
            "full attention"
            if block is None
            else "clean_attention: block"
            if settings.clean_attention != "causal"
            else "no shift"
        )
        raise AdaptError(
            f"--strategy {name} decodes the AR stream of a block checkpoint trained with causal clean "
            f"attention and shift (diffusion.clean_attention: causal); this checkpoint has {what}: use "
            "--strategy threshold or low_confidence"
        )
    if config.cache in ("none", "dual"):
        raise AdaptError(
            f"--strategy {name} always decodes with the exact KV cache; drop --cache {config.cache}"
        )
    if name == "ar":
        return 0, block
    if block < 2:
        raise AdaptError(
            "--strategy verify needs drafts: a block size of 1 drafts nothing; use --strategy ar"
        )
    if config.candidates > 1 and config.draft_length not in (None, 1):  # a one-level tree
        raise AdaptError(
            f"--candidates {config.candidates} drafts alternatives for one token: --draft-length "
            f"{config.draft_length} would chain drafts after them; use --draft-length 1 (the default)"
        )
    length, masks = config.draft_length, config.mask_block
    if length is None:
        length = 1 if masks is None or config.candidates > 1 else masks - 1
    masks = masks if masks is not None else min(length + 1, block)
    if masks > block:
        raise AdaptError(
            f"--mask-block {masks} is more than the checkpoint's block of {block} (it trained mask blocks "
            f"of at most {block})"
        )
    most = masks - 1
    if length > most:
        raise AdaptError(
            f"--draft-length {length} is more than a block of {masks} masks drafts: at most {most} (the "
            "block's last mask would predict past it)"
        )
    return length, masks


def warn_one_step(config: SamplingConfig, settings: DiffusionSettings) -> None:
    """Allowed, but said: a full-mask checkpoint never saw a partly unmasked block."""
    if settings.full_mask and config.strategy not in SPECULATIVE:
        log.warning(
            "this checkpoint was trained with wholly masked blocks (diffusion.full_mask): its mask blocks "
            "draft in one step for --strategy verify; --strategy %s unmasks a block over several steps, "
            "which it was not trained for (use --strategy verify or ar)",
            config.strategy,
        )


def warn_untrained(config: SamplingConfig, settings: DiffusionSettings) -> None:
    """Allowed, but said: a checkpoint trained without the AR term has an untrained AR head."""
    if not settings.ar_loss_weight:
        log.warning(
            "this checkpoint was trained without the AR term (diffusion.ar_loss_weight 0): its clean stream "
            "predicts the next token only as a side effect of block diffusion,"
            " so %s with an untrained AR head",
            "verify checks drafts" if config.strategy == "verify" else "ar decodes",
        )
