"""Diffusion decoding: `generate(model, tokenizer, prompts, SamplingConfig(...)) -> GenerationOutput`.

Names are imported lazily so that the CLI's `--help` does not load torch.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "SamplingConfig": "adapt.sampling.config",
    "GenerationOutput": "adapt.sampling.config",
    "generate": "adapt.sampling.engine",
    "StepEvent": "adapt.sampling.engine",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'adapt.sampling' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
