"""`whole_weights`: models load whole on this rank even while a ZeRO-3 config is selected."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def whole_weights() -> Iterator[None]:
    """Load models whole on this rank even while a ZeRO-3 config is selected.

    Selecting a ZeRO-3 plugin makes transformers partition every model it builds (deepspeed.zero.Init,
    whose collectives every rank must then join): a whole load, rank 0's plain copy for a LoRA export and
    a config's shapes built on the meta device turn that off.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ref is not None and ref() is not None:
            hf_deepspeed.set_hf_deepspeed_config(ref())
