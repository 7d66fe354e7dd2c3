"""The diffusion checkpoint format: settings recorded in config.json, read back and checked.

A converted checkpoint is a plain Hugging Face causal-LM directory whose config.json carries
`is_causal: false`, `mask_token_id`, and a `diffusion` block (see `DiffusionSettings`). Stock
`AutoModelForCausalLM.from_pretrained` loads it with bidirectional attention and no remote code.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from adapt.core.bounds import context_length
from adapt.core.errors import AdaptError
from adapt.core.locate import locate, looks_like_hub_id

FORMAT_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")
INFERENCE_DTYPES = (*DTYPES, "checkpoint")
CLEAN_ATTENTION = ("block", "causal")


@dataclass
class DiffusionSettings:
    """What later steps (training, sampling, evaluation) read instead of asking the user."""

    mask_token_id: int
    """Vocabulary id of the mask token (never EOS or PAD)."""
    mask_token: str = "<|mask|>"
    """Text form of the mask token in the tokenizer."""
    shift: bool = True
    """Logits at position i predict token i + 1 (the AR head's meaning is kept)."""
    source_model: str | None = None
    """The AR model this checkpoint was converted from (Hub id or local path)."""
    source_revision: str | None = None
    """Commit hash of the source on the Hub, when known."""
    source_hash: str | None = None
    """sha256 over the source weight files, when converted from a local directory."""
    adapt_version: str = ""
    """Version of adapt that wrote the checkpoint."""
    format_version: int = FORMAT_VERSION
    block_size: int | None = None
    """Block diffusion: trained autoregressive over blocks of this many tokens (None: full attention)."""
    clean_attention: str = "block"
    """Block diffusion: how committed tokens attend to each other, "block" (blocks <= their own, BD3-LM)
    or "causal" (tokens before them, as in the AR source)."""
    ar_loss_weight: float = 0.0
    """Weight of the next-token loss the clean half was trained with (0: none). > 0: the checkpoint is an
    AR model too, and its AR head verifies diffusion drafts (`--strategy ar` / `verify`)."""
    full_mask: bool = False
    """Trained with every token of the noisy copy masked (TiDAR, `diffusion.full_mask`): its mask blocks
    draft in one step for `--strategy verify`; multi-step unmasking is outside what it was trained on."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_block_size(self, block_size: int | None, clean_attention: str = "block") -> DiffusionSettings:
        """A copy recording `block_size` (None: full attention) and how its clean tokens attend."""
        return replace(self, block_size=block_size, clean_attention=clean_attention)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def read_settings(config: Any) -> DiffusionSettings | None:
    """The diffusion settings of a loaded config, or None for a plain AR checkpoint."""
    data = getattr(config, "diffusion", None)
    if not isinstance(data, dict) or "mask_token_id" not in data:
        return None
    return DiffusionSettings.from_dict(data)


def write_settings(config: Any, settings: DiffusionSettings) -> None:
    """Record the settings on a config so that `save_pretrained` writes them to config.json."""
    config.diffusion = settings.to_dict()
    config.mask_token_id = settings.mask_token_id
    config.is_causal = False


def resolve_dtype(name: str) -> Any:
    """Map a dtype name from the CLI or a recipe to a torch dtype ("auto" stays a string)."""
    import torch

    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise AdaptError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def check_model_dir(path: str | os.PathLike) -> Path:
    """A local checkpoint directory that exists and has a config.json."""
    p = Path(path)
    if not p.exists():
        raise AdaptError(f"no such checkpoint directory: {p}")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise AdaptError(f"{p} is not a model directory (no config.json)")
    return p


def load_settings(path: str | os.PathLike) -> DiffusionSettings:
    """Settings of a diffusion checkpoint on disk (of its base model for a LoRA adapter export); a clear
    error for anything else."""
    import json

    base = adapter_base(path)
    if base is not None:
        return load_settings(config_dir(path))
    p = check_model_dir(path)
    try:
        data = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdaptError(f"{p / 'config.json'} is not valid JSON: {e}") from e
    settings = read_settings(_Namespace(data))
    if settings is None:
        raise AdaptError(
            f"{p} is not a diffusion checkpoint (no diffusion settings); run `adapt convert` first"
        )
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    check_settings(settings, text.get("vocab_size"), p / "config.json", context_length(_Namespace(text)))
    return settings


def adapter_base(path: str | os.PathLike) -> str | None:
    """The base model a LoRA adapter export names (a directory or Hub id); None for a full checkpoint."""
    import json

    p = Path(path)
    if (p / "config.json").is_file() or not (p / ADAPTER_CONFIG).is_file():
        return None
    try:
        base = json.loads((p / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise AdaptError(f"{p / ADAPTER_CONFIG} is not a valid adapter config: {e}") from e
    if not isinstance(base, str) or not base:
        raise AdaptError(f"{p / ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return base


def config_dir(path: str | os.PathLike) -> Path:
    """The directory holding config.json and the base weights: `path`, or an adapter's base model."""
    base = adapter_base(path)
    if base is None:
        return Path(path)
    try:
        found = locate(base)
        check_model_dir(found)
    except AdaptError as e:
        raise AdaptError(
            f"the LoRA adapter in {path} needs its base model {base}, which is missing: {e}"
        ) from e
    return found


def checked_settings(config: Any, where: str | os.PathLike) -> DiffusionSettings | None:
    """`read_settings` of a loaded config, checked against its vocabulary (None for an AR model)."""
    settings = read_settings(config)
    if settings is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        check_settings(settings, getattr(text, "vocab_size", None), where, context_length(text))
    return settings


def check_settings(
    settings: DiffusionSettings, vocab_size: int | None, where: str | os.PathLike, context: int | None = None
) -> None:
    """Refuse recorded settings that would crash or silently misbehave later (read from a file we did not
    necessarily write); a block longer than the model's `context` would only size tensors past it."""
    mask = settings.mask_token_id
    if isinstance(mask, bool) or not isinstance(mask, int) or mask < 0:
        raise AdaptError(f"{where}: mask_token_id must be a token id (an integer >= 0), got {mask!r}")
    if isinstance(vocab_size, int) and mask >= vocab_size:
        raise AdaptError(
            f"{where}: mask_token_id {mask} is outside the vocabulary of {vocab_size} rows; "
            "the checkpoint is corrupt or was edited; convert the source model again"
        )
    block = settings.block_size
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise AdaptError(f"{where}: diffusion.block_size must be an integer >= 1 or null, got {block!r}")
    if block is not None and context is not None and block > context:
        raise AdaptError(
            f"{where}: diffusion.block_size {block} is longer than the model's context of {context} tokens; "
            "the checkpoint is corrupt or was edited: restore its config.json"
        )
    if settings.clean_attention not in CLEAN_ATTENTION:
        raise AdaptError(
            f"{where}: diffusion.clean_attention must be one of {', '.join(CLEAN_ATTENTION)}, "
            f"got {settings.clean_attention!r}"
        )
    a = settings.ar_loss_weight
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
        raise AdaptError(f"{where}: diffusion.ar_loss_weight must be a finite number >= 0, got {a!r}")
    if not isinstance(settings.full_mask, bool):
        raise AdaptError(f"{where}: diffusion.full_mask must be true or false, got {settings.full_mask!r}")


def adapter_export(name: str, revision: str | None = None) -> Path | None:
    """The local directory of `name` when it is a LoRA adapter export (a directory, or a Hub repository
    holding adapter_config.json and no config.json); None for anything else, left to transformers."""
    from huggingface_hub import hf_hub_download

    if not looks_like_hub_id(name):
        return Path(name) if Path(name).is_dir() and adapter_base(name) is not None else None
    try:
        hf_hub_download(name, ADAPTER_CONFIG, revision=revision)
    except Exception:
        return None  # not an adapter (or not reachable: transformers' own lookup then says why)
    path = locate(name, revision)
    return path if adapter_base(path) is not None else None


class _Namespace:
    def __init__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(data)
