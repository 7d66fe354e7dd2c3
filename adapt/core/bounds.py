"""Every size bounded before it is allocated: the memory there is, what a job will hold, and a checkpoint's
config.json checked against the weights it describes.

- `available_memory(device)`: free memory of a CUDA device (`torch.cuda.mem_get_info`), else the host's
  available memory (psutil, or /proc/meminfo; a cgroup's memory.max when lower), capped by
  `ADAPT_MEMORY_LIMIT` (e.g. `ADAPT_MEMORY_LIMIT=8GB`: plan on at most 8 GB, on a shared machine).
- `check_fits(subject, terms, device, fix)`: refuse a job whose estimate, a list of named `Term`s each
  with its formula, exceeds that memory; the message gives the estimate and what to lower.
- `check_weights(path, dtype, device)`: before `from_pretrained` allocates anything, config.json is
  compared with the safetensors headers (read alone, never the tensors): the layer count first, then the
  shape of every tensor, from a model built on the `meta` device (no memory); then the weights must fit.
- The estimates (`logits_term`, `kv_cache_term`, `noisy_copies_term`, ...): lower bounds of what a job
  holds at once, so a refusal means the job cannot fit, never that it might not.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from adapt.core.errors import AdaptError

MEMORY_LIMIT_ENV = "ADAPT_MEMORY_LIMIT"
HEADER_LIMIT = 100_000_000
"""Largest safetensors header read (bytes): the safetensors library refuses larger ones too."""
CGROUP = Path("/sys/fs/cgroup")
"""Where a cgroup v2 container's memory.max, memory.current and memory.stat are read."""
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2}  # fmt: skip
_LAYER = re.compile(r"^(.*?)\.(?:layers|layer|h|blocks)\.(\d+)\.")

# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class Memory:
    """What a device can still hold, and where the figure comes from."""

    bytes: int
    source: str
    """How the message names it: "of memory available", "free on cuda:0", "ADAPT_MEMORY_LIMIT allows"."""
    limited: bool = False
    """The figure is ADAPT_MEMORY_LIMIT's: memory this process already holds counts against it."""


def parse_size(text: str, what: str = MEMORY_LIMIT_ENV) -> int:
    """'8GB', '512 MB', '2GiB', '1.5T' or a plain number of bytes -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgtp])(i)?)?b?\s*", text, re.IGNORECASE)
    if not m:
        raise AdaptError(f"{what}={text!r} is not a size; write e.g. 8GB, 512MB or 2GiB")
    unit = (m.group(2) or "").upper()
    scale = 1024 ** "_KMGTP".index(unit) if m.group(3) else _UNITS[unit]
    value = float(m.group(1)) * scale
    if not math.isfinite(value) or value < 1:
        raise AdaptError(f"{what}={text!r} must be at least one byte")
    return int(value)


def size(n: float) -> str:
    """A byte count for a message: '38.2 GB', '512.0 MB', '10 bytes'."""
    for unit in ("PB", "TB", "GB", "MB", "KB"):
        scale = _UNITS[unit[0]]
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def available_memory(device: Any = "cpu") -> Memory | None:
    """The memory `device` can still hold (None when unknown), at most ADAPT_MEMORY_LIMIT."""
    found = cuda_free(str(device)) if str(device).startswith("cuda") else host_available()
    limit = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if limit:
        cap = parse_size(limit)
        if found is None or cap < found.bytes:
            return Memory(cap, f"{MEMORY_LIMIT_ENV} allows", limited=True)
    return found


def cuda_free(device: str) -> Memory:
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return Memory(int(free), f"free on {device}")


def host_available() -> Memory | None:
    """Available host memory: psutil (Accelerate installs it) or /proc/meminfo, and a cgroup v2 limit."""
    found: int | None = None
    try:
        import psutil

        found = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    try:  # a container's own limit, when it is lower: what it holds beyond the file cache it can drop
        cgroup = CGROUP
        stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
        used = int((cgroup / "memory.current").read_text()) - int(stat.get("file", 0))
        room = int((cgroup / "memory.max").read_text()) - used
        found = room if found is None else min(found, room)
    except (OSError, ValueError):
        pass  # no cgroup v2 limit ("max", or not Linux)
    return None if found is None else Memory(max(found, 0), "of memory available")


# ----------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Term:
    """One thing a job holds at once: what it is, its bytes, and how they were counted."""

    what: str
    bytes: int
    formula: str
    host: bool = False
    """Held in host memory even when the model runs on an accelerator."""


def check_fits(subject: str, terms: list[Term], device: Any, fix: str, held: int = 0) -> None:
    """Refuse `subject` (the option or file that asks for it) when `terms` exceed the memory of `device`
    (host terms: of the host). `held`: bytes of `device` this process already holds (a loaded model),
    already gone from the free memory measured but counted against ADAPT_MEMORY_LIMIT."""
    pools = [("cpu", terms, held)]
    if str(device).startswith("cuda"):
        pools = [
            (str(device), [t for t in terms if not t.host], held),
            ("cpu", [t for t in terms if t.host], 0),
        ]
    for where, group, already in pools:
        group = sorted((t for t in group if t.bytes > 0), key=lambda t: -t.bytes)
        memory = available_memory(where) if group else None
        if memory is None:
            continue
        room = memory.bytes - (already if memory.limited else 0)
        need = sum(t.bytes for t in group)
        if need > room:
            if len(group) == 1:
                detail = f" for {group[0].what} ({group[0].formula})"
            else:
                detail = ": " + ", ".join(f"{size(t.bytes)} for {t.what} ({t.formula})" for t in group)
            raise AdaptError(
                f"{subject} needs about {size(need)}{detail}; more than the {size(max(room, 0))} "
                f"{memory.source}; {fix}"
            )


def logits_term(rows: int, length: int, vocab: int, what: str = "the logits", formula: str = "") -> Term:
    """rows x length x vocabulary float32 logits (the models' logits are read in float32)."""
    return Term(what, rows * length * vocab * 4, formula or "batch x length x vocabulary x 4 bytes")


def noisy_copies_term(windows: int, mc_samples: int, length: int) -> Term:
    """The ELBO's noisy copies of every window, built at once: ids and noisy ids (8 + 8 bytes), t and the
    uniform draw (4 + 4), the masked and maskable flags (1 + 1) per token."""
    return Term(
        f"the noisy copies of {windows} window(s)",
        windows * mc_samples * length * 26,
        "windows x mc-samples x length x 26 bytes",
        host=True,
    )


def kv_cache_term(config: Any, rows: int, length: int, dtype_bytes: int) -> Term:
    """The KV cache of `rows` rows of `length` tokens: 2 x KV heads x head dim per token and layer
    (a sliding-window layer holds at most its window)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (getattr(text, "hidden_size", 0) or 0) // heads
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    window = getattr(text, "sliding_window", None)
    kinds = getattr(text, "layer_types", None) or [None] * layers
    tokens = sum(min(length, window) if kind == "sliding_attention" and window else length for kind in kinds)
    return Term(
        "the KV cache",
        rows * tokens * 2 * kv_heads * head_dim * dtype_bytes,
        "prompts x length x layers x 2 x KV heads x head dim x bytes",
    )


def vocab_size(config: Any) -> int:
    return text_size(config, "vocab_size")


def hidden_size(config: Any) -> int:
    return text_size(config, "hidden_size")


def text_size(config: Any, name: str) -> int:
    """A size of the text model's config (a multimodal config's text part), 0 when it names none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, name, 0) or 0)


def context_length(config: Any) -> int | None:
    """The longest sequence a model config allows (None when it names none)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# ----------------------------------------------------------------------------- weights against config.json


@dataclass(frozen=True)
class Weights:
    """What the safetensors headers of a checkpoint hold."""

    shapes: dict[str, tuple[int, ...]]
    params: int
    stored_bytes: int

    def bytes_in(self, dtype: Any) -> int:
        """Bytes once loaded in `dtype` (a torch dtype; "auto" or None: as stored)."""
        itemsize = getattr(dtype, "itemsize", None)
        return self.params * itemsize if itemsize else self.stored_bytes

    def term(self, dtype: Any) -> Term:
        itemsize = getattr(dtype, "itemsize", None)
        how = f"x {itemsize} bytes" if itemsize else "as stored"
        return Term("the weights", self.bytes_in(dtype), f"{self.params:,} parameters {how}")


def read_weights(path: str | os.PathLike) -> Weights | None:
    """The tensors named by the safetensors headers of a checkpoint directory (one file or an index of
    shards); None when there are none or a header cannot be read (the loader then says why)."""
    p = Path(path)
    index = p / "model.safetensors.index.json"
    try:
        if index.is_file() and index.stat().st_size <= HEADER_LIMIT:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    params = stored = 0
    for name in files:
        header = read_header(p / str(name))
        if header is None:
            return None
        for tensor, (shape, dtype) in header.items():
            count = math.prod(shape)
            shapes[tensor] = shape
            params += count
            stored += count * _DTYPE_BYTES.get(dtype, 1)
    return Weights(shapes, params, stored)


def read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """name -> (shape, dtype) from one safetensors file's header (8 bytes of length, then JSON)."""
    try:
        with file.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little")
            if len(head) < 8 or length > HEADER_LIMIT:
                return None
            data = json.loads(f.read(length))
        out = {}
        for name, info in data.items():
            if name != "__metadata__":
                shape = tuple(int(d) for d in info["shape"])
                if any(d < 0 for d in shape):
                    return None
                out[name] = (shape, str(info["dtype"]))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def layer_count(shapes: dict[str, tuple[int, ...]]) -> int:
    """Decoder layers the weights hold: 1 + the highest `.layers.N.` (or .h.N., .blocks.N.) index."""
    found = [int(m.group(2)) for name in shapes if (m := _LAYER.match(name))]
    return max(found) + 1 if found else 0


def check_config_matches(config: Any, weights: Weights, where: str) -> None:
    """Refuse a config.json whose sizes disagree with the weights (edited, or another model's), naming the
    fields, before anything is built for real: a layer count above the weights', then every tensor's
    shape as a model built from the config on the `meta` device has it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    held = layer_count(weights.shapes)
    layers = getattr(text, "num_hidden_layers", None)
    if not held:
        return  # weights whose names we do not know: left to transformers
    if isinstance(layers, int) and layers > held:  # more in the weights is fine (MTP layers are skipped)
        raise AdaptError(
            f"{where}: config.json says num_hidden_layers={layers}, but the weights hold {held} layers; "
            "the config was edited or belongs to other weights: restore it"
        )
    if getattr(config, "quantization_config", None):
        return  # packed weights have other shapes than the model they unpack to
    model = meta_model(config)
    if model is None:
        return
    for name, tensor in model.state_dict().items():
        stored = weights.shapes.get(name)
        implied = tuple(tensor.shape)
        if stored is not None and stored != implied:
            raise AdaptError(
                f"{where}: config.json does not match the weights: {name} is {list(stored)} in the weights "
                f"but {list(implied)} by the config ({fields_of(text, stored, implied)}); the config was "
                "edited or belongs to other weights: restore it"
            )


def fields_of(text: Any, stored: tuple[int, ...], implied: tuple[int, ...]) -> str:
    """The config.json size fields whose value is a dimension the weights do not have ('vocab_size=...')."""
    wrong = {b for a, b in zip(stored, implied, strict=False) if a != b} | set(implied[len(stored) :])
    values = text.to_dict() if hasattr(text, "to_dict") else {}
    named = [f"{k}={v}" for k, v in values.items() if type(v) is int and v in wrong]
    return ", ".join(named) or "check its size fields"


def meta_model(config: Any) -> Any | None:
    """The model `config` describes, built on the meta device (shapes, no memory); None when transformers
    cannot build it (from_pretrained then says why, in its own words)."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapt.core.zero3 import whole_weights

    try:
        with torch.device("meta"), whole_weights():
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # whatever it is, from_pretrained raises it too, and the boundary reports it
        return None


def check_weights(path: str | os.PathLike, dtype: Any = None, device: Any = "cpu") -> Weights | None:
    """Before `from_pretrained(path)`: config.json agrees with the safetensors headers, and the weights
    in `dtype` (a torch dtype; "auto"/None: as stored) fit `device`, and the host they are read through.
    Returns what the headers hold (None without safetensors: a pickle or no weights, the loader decides)."""
    from transformers import AutoConfig

    from adapt.core.boundary import about

    weights = read_weights(path)
    if weights is None:
        return None
    with about(f"cannot read the config of {path}"):
        config = AutoConfig.from_pretrained(path)
    check_config_matches(config, weights, str(path))
    term = weights.term(dtype)
    terms = [term, replace(term, host=True)] if str(device).startswith("cuda") else [term]
    fix = "load them in a smaller dtype (bfloat16) or use a machine with more memory"
    check_fits(f"loading {path}", terms, device, fix)
    return weights
