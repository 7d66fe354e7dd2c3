"""What a model's weights must be before adapt runs, converts or publishes it: complete and finite.

transformers fills a tensor that is missing from the files, or of the wrong shape, with random weights and
only logs a report (which adapt's commands silence), and drops tensors it does not expect; peft's
`PeftModel.from_pretrained` only warns about a missing adapter tensor and returns no report.
`from_pretrained` and `load_adapter` here ask for the report and refuse the model, naming the tensors.

A NaN or infinite weight makes every output NaN: `first_non_finite` names the first one, of a loaded model
or a state dict; `non_finite_in_files` scans safetensors files tensor by tensor (one tensor in memory at a
time), for what is about to be published.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from adapt.core.errors import AdaptError

ADAPTER_NAME = "default"
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch.Size\(\[(.*?)\]\) from checkpoint, "
    r"the shape in current model is torch.Size\(\[(.*?)\]\)"
)
CHUNK = 1 << 24
"""Elements checked at once: the boolean mask `isfinite` builds stays small for huge tensors."""


def from_pretrained(cls: Any, path: str | os.PathLike, where: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(path, **kwargs)`, refused unless every tensor the config asks for was loaded
    from the files with its shape and the files hold no other tensor.

    transformers' own exceptions stay in the report: a tied head or a non-persistent buffer (rotary
    inv_freq) is not missing, a stale buffer of an older checkpoint is not unexpected.
    """
    model, info = cls.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    check_complete(where, info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])
    return model


def load_adapter(base: Any, adapter: str | os.PathLike, where: str) -> Any:
    """The peft model of `base` with the adapter in `adapter` loaded, refused unless every adapter tensor
    was in the files with its shape and the files hold no other tensor."""
    from peft import PeftConfig, get_peft_model

    config = PeftConfig.from_pretrained(adapter)
    config.inference_mode = True
    model = get_peft_model(base, config)
    missing, unexpected, mismatched = [], [], []
    try:
        result = model.load_adapter(adapter, adapter_name=ADAPTER_NAME)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    except KeyError as e:  # peft looks up the trainable-token rows without checking they are there
        missing = [str(e.args[0])]
    except RuntimeError as e:  # torch's load_state_dict refuses wrong shapes, naming them
        mismatched = _SIZE_MISMATCH.findall(str(e))
        if not mismatched:
            raise
    check_complete(
        where,
        [_as_saved(n) for n in missing],
        [_as_saved(n) for n in unexpected],
        [(_as_saved(n), found, expected) for n, found, expected in mismatched],
    )
    return model


def _as_saved(name: str) -> str:
    """An adapter tensor's name as its file spells it (peft inserts the adapter's name when loading)."""
    return name.replace(f".{ADAPTER_NAME}.", ".")


def check_complete(
    where: str, missing: Iterable[str], unexpected: Iterable[str], mismatched: Iterable
) -> None:
    """Refuse a load that left tensors missing, found unexpected ones, or found some of the wrong shape
    (`mismatched`: (name, shape in the file, shape expected))."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    wrong = sorted(
        f"{name} {_shape(found)} in the file, {_shape(expected)} expected"
        for name, found, expected in mismatched
    )
    problems = [
        f"{len(names)} {'tensor' if len(names) == 1 else 'tensors'} {kind} ({few(names)})"
        for kind, names in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong))
        if names
    ]
    if problems:
        raise AdaptError(
            f"{where}: the weight files do not match its config: {'; '.join(problems)}; a missing or "
            "mis-shaped tensor would be random, an unexpected one ignored: re-download or re-export the model"
        )


def few(names: list[str], n: int = 3) -> str:
    """The first `n` names, and how many more."""
    more = f", and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _shape(shape: Any) -> str:
    """[a, b] from a torch.Size, a tuple or torch's text of one ("a, b")."""
    return f"[{shape}]" if isinstance(shape, str) else f"[{', '.join(str(int(d)) for d in shape)}]"


def first_non_finite(tensors: Iterable[tuple[str, Any]], chunk: int = CHUNK) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity among (name, tensor) pairs;
    None when all are finite (other values are skipped)."""
    import torch

    for name, tensor in tensors:
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            flat = tensor.detach().reshape(-1)
            if any(not torch.isfinite(flat[i : i + chunk]).all() for i in range(0, flat.numel(), chunk)):
                return name
    return None


def check_finite_model(model: Any, where: str) -> None:
    """Refuse a loaded model with a NaN or infinite parameter, naming the first."""
    name = first_non_finite(model.named_parameters())
    if name is not None:
        raise AdaptError(
            f"{where}: weight {name} holds NaN or infinity, so every output would be NaN: the model is "
            "broken (a diverged run or a corrupt file); use an earlier checkpoint or re-export it"
        )


def non_finite_in_files(files: Iterable[str | os.PathLike]) -> tuple[Path, str] | None:
    """(file, tensor name) of the first tensor holding NaN or infinity in the safetensors `files`, read one
    tensor at a time; None when all are finite."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            name = first_non_finite((key, f.get_tensor(key)) for key in names)
        if name is not None:
            return Path(file), name
    return None
