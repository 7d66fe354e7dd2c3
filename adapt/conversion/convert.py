"""Convert a pretrained causal LM into a masked-diffusion checkpoint that stock transformers loads.

The conversion is one explicit function on one model instance: set `config.is_causal = False`
(transformers then builds bidirectional masks for every supported architecture), add a mask token,
verify the result against the source model, and write everything atomically.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from adapt.conversion.verify import (
    check_source_is_causal,
    make_probe,
    ordinary_token_ids,
    record_source,
    verify_converted,
)
from adapt.core.boundary import about
from adapt.core.bounds import check_weights
from adapt.core.checkpoint import (
    DiffusionSettings,
    check_model_dir,
    read_settings,
    resolve_dtype,
    write_settings,
)
from adapt.core.errors import AdaptError, first_line
from adapt.core.locate import check_hub_id
from adapt.core.outputs import atomic_dir, prepare_output_dir
from adapt.core.version import __version__
from adapt.loading.weights import check_finite_model, from_pretrained

log = logging.getLogger(__name__)

MASK_TOKEN = "<|mask|>"
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
MaskInit = Literal["mean", "normal", "zero"]
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class ConvertOptions:
    """How to convert; every field is also a CLI option of `adapt convert`."""

    dtype: str = "auto"
    """Weights dtype: auto (as stored), float32, bfloat16 or float16."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa or eager (flash-attention 2 cannot take the masks diffusion needs)."""
    mask_init: MaskInit = "mean"
    """Initial mask-token embedding: mean of the embeddings, normal(mean, std) noise, or zeros."""
    shift: bool = True
    """Keep the AR head's meaning (logits at i predict token i + 1); recorded in the checkpoint."""
    revision: str | None = None
    """Hub revision of the source model."""
    force: bool = False
    """Overwrite a non-empty output directory."""


@dataclass
class ConvertResult:
    out: Path | None
    settings: DiffusionSettings
    already_converted: bool = False
    reused_row: bool = False
    checks: list[str] = field(default_factory=list)


def convert(source: str, out: str | Path | None, options: ConvertOptions | None = None) -> ConvertResult:
    """Convert `source` (local directory or Hub id) and write the diffusion checkpoint to `out`.

    With `out=None` nothing is written (the converted model is verified only).
    """
    options = options or ConvertOptions()
    if options.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise AdaptError(
            f"check 'attention implementation' failed: {options.attn_implementation!r} cannot take the "
            f"arbitrary attention masks diffusion needs; use one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    config = load_config(source, options.revision)
    existing = read_settings(config)
    if existing is not None:
        return ConvertResult(out=None, settings=existing, already_converted=True)
    check_supported(config)
    if out is not None:
        out = prepare_output_dir(out, options.force, sources=[source])
    model, tokenizer = load_model_and_tokenizer(source, options)
    settings, reused, checks = convert_model(model, tokenizer, options, source=source)
    if out is None:
        return ConvertResult(out=None, settings=settings, reused_row=reused, checks=checks)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return ConvertResult(out=Path(out), settings=settings, reused_row=reused, checks=checks)


def convert_model(
    model: Any, tokenizer: Any, options: ConvertOptions, source: str = ""
) -> tuple[DiffusionSettings, bool, list[str]]:
    """Convert a loaded causal LM in place and verify it; returns (settings, reused_row, checks)."""
    model.eval()
    ordinary = ordinary_token_ids(model, tokenizer)
    probe = make_probe(ordinary)
    record_source(model, probe)
    check_source_is_causal(model, probe)
    ensure_pad_token(model, tokenizer)
    mask_id, reused = add_mask_token(model, tokenizer, options.mask_init)
    model.config.is_causal = False
    checks = verify_converted(model, probe, ordinary, pad_id=tokenizer.pad_token_id)
    settings = DiffusionSettings(
        mask_token_id=mask_id,
        mask_token=tokenizer.mask_token,
        shift=options.shift,
        source_model=source or None,
        source_revision=getattr(model.config, "_commit_hash", None) or options.revision,
        source_hash=weights_hash(source),
        adapt_version=__version__,
    )
    write_settings(model.config, settings)
    model.generation_config.mask_token_id = mask_id
    return settings, reused, checks


def load_config(source: str, revision: str | None) -> Any:
    """The source's config, with clear errors for missing, corrupt or unreachable models."""
    from transformers import AutoConfig

    _check_source_path(source)
    check_hub_id(source, revision)  # the Hub's refusals in adapt's words, not transformers'
    try:
        return AutoConfig.from_pretrained(source, revision=revision)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise AdaptError(
                f"{source} needs remote code (trust_remote_code); "
                "adapt converts transformers' own architectures only"
            ) from e
        raise AdaptError(f"cannot read the config of {source}: {first_line(e)}") from e
    except OSError as e:
        if Path(source).exists():
            raise AdaptError(f"cannot read the config of {source}: {first_line(e)}") from e
        raise AdaptError(
            f"{source!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"(offline or unknown id): {first_line(e)}"
        ) from e


def check_supported(config: Any) -> None:
    """Refuse models that are not decoder-only causal LMs or whose attention cannot go bidirectional."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    name = getattr(config, "model_type", "?")
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        raise AdaptError(f"{name} is an encoder-decoder model, not a causal LM")
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise AdaptError(f"not a causal LM: architectures {', '.join(archs)}")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise AdaptError(f"unsupported architecture {name!r}: transformers has no causal LM class for it")
    window = sliding_window_of(config)
    if window is not None:
        raise AdaptError(
            f"check 'sliding-window attention' failed: {name} limits some layers to a window of {window} "
            "tokens, which would cut bidirectional attention; set sliding_window to null in config.json "
            "if the model tolerates full attention"
        )


def sliding_window_of(config: Any) -> int | None:
    """The active attention window of a config, or None when every layer sees the whole sequence."""
    layer_types = getattr(config, "layer_types", None) or []
    local = [t for t in layer_types if "sliding" in str(t) or "chunked" in str(t)]
    local += [t for t in getattr(config, "attention_layers", None) or [] if t == "local"]
    window = getattr(config, "sliding_window", None) or getattr(config, "window_size", None)
    if layer_types and not local:
        return None
    if local:
        return window or -1
    if window and getattr(config, "use_sliding_window", True):
        return int(window)
    return None


def load_model_and_tokenizer(source: str, options: ConvertOptions) -> tuple[Any, Any]:
    """The source's tokenizer and model, every tensor of the model loaded from its files and finite."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with about(f"cannot load a tokenizer from {source}"):
            tokenizer = AutoTokenizer.from_pretrained(source, revision=options.revision)
    except (ValueError, TypeError) as e:
        raise AdaptError(f"cannot load a tokenizer from {source}: {first_line(e)}") from e
    if Path(source).is_dir():  # a Hub id's weights are not on disk before from_pretrained fetches them
        check_weights(source, resolve_dtype(options.dtype), "cpu")
    where = f"cannot load the weights of {source}"
    try:
        with about(where):  # corrupt safetensors, blocked pickles, I/O
            model = from_pretrained(
                AutoModelForCausalLM,
                source,
                where,
                revision=options.revision,
                dtype=resolve_dtype(options.dtype),
                attn_implementation=options.attn_implementation,
            )
    except (ValueError, RuntimeError) as e:
        raise AdaptError(f"{where}: {first_line(e)}") from e
    check_finite_model(model, where)
    return model, tokenizer


def ensure_pad_token(model: Any, tokenizer: Any) -> None:
    """Batches need a pad id; use EOS when the tokenizer has none (padding is always masked out)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise AdaptError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


def add_mask_token(model: Any, tokenizer: Any, init: MaskInit = "mean") -> tuple[int, bool]:
    """Give the model a mask token; returns (mask id, whether an existing embedding row was reused)."""
    emb = model.get_input_embeddings()
    rows, n_vocab = emb.num_embeddings, len(tokenizer)
    forbidden = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
    current = tokenizer.mask_token_id if tokenizer.mask_token is not None else None
    if current is None or current in forbidden or current >= rows:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    mask_id = tokenizer.mask_token_id
    reused = mask_id < rows
    new_rows = [mask_id]
    if not reused:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
        # The padding rows beyond the mask token come back randomly initialised; they still enter
        # every softmax, so give them the same deterministic init (conversion is then reproducible).
        new_rows = list(range(rows, model.get_input_embeddings().num_embeddings))
    init_embedding_rows(model, new_rows, n_real=min(n_vocab, rows), how=init)
    return mask_id, reused


@torch.no_grad()
def init_embedding_rows(model: Any, rows: list[int], n_real: int, how: MaskInit) -> None:
    """Initialise input (and untied output) embedding rows from the statistics of the real rows."""
    if how not in ("mean", "normal", "zero"):
        raise AdaptError(f"unknown mask init {how!r}; choose mean, normal or zero")
    weights = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != weights[0].data_ptr():
        weights.append(out.weight)
    for w in weights:
        real = w[:n_real].float()
        mean = torch.zeros(real.shape[1]) if how == "zero" else real.mean(0)
        std = real.std(0) if how == "normal" else None
        for row in rows:
            value = mean
            if std is not None:
                value = mean + std * torch.randn(real.shape[1], generator=torch.Generator().manual_seed(row))
            w[row] = value.to(w.dtype)


def weights_hash(source: str) -> str | None:
    """sha256 over a local source's weight files (None for Hub ids)."""
    path = Path(source)
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"})
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _check_source_path(source: str) -> None:
    path = Path(source).expanduser()
    if path.exists():
        check_model_dir(path)
    elif not _HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise AdaptError(f"no such model directory: {source}")
