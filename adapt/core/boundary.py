"""The error boundary of every entry point: expected failures of the libraries underneath become one line.

`explain(e)` turns what the file system, safetensors, torch's safe unpickler, text decoding, the Hub
and datasets raise into one line that says what is at fault and what to do; it returns None for
anything else, a bug whose traceback the user should see. `about(what)` prefixes that line with the
file or option at fault where the library's own message does not name it. Checks that can run before
expensive work (`check_writable`, `resolve_device`) live here too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

from adapt.core.errors import AdaptError, first_line

_HINTS = {
    errno.ENOSPC: "free some disk space or choose another location",
    errno.EDQUOT: "free some space or choose another location",
    errno.EFBIG: "the file outgrew the size this process may write (ulimit -f) or the filesystem allows",
    errno.EROFS: "choose a writable location",
    errno.EACCES: "choose a location you may write to, or fix its permissions",
    errno.EPERM: "choose a location you may write to, or fix its permissions",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "expected a file, found a directory",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def explain(e: BaseException) -> str | None:
    """One line for an expected failure (user input, files, environment); None for a bug."""
    if isinstance(e, AdaptError):
        return one_line(str(e))
    if type(e).__name__ == "SafetensorError" and "Error while serializing" in str(e):
        code = re.search(r"\(os error (\d+)\)", str(e))  # a failed write (full disk, ulimit), not bad weights
        hint = _HINTS.get(int(code[1]) if code else 0, "check the location and its free space")
        return f"writing a safetensors weight file failed ({first_line(e)}); {hint}"
    if type(e).__name__ == "SafetensorError":
        return (
            f"a safetensors weight file is corrupt, truncated or not safetensors ({first_line(e)}); "
            "re-download or re-export the model"
        )
    if isinstance(e, pickle.UnpicklingError):
        return (
            "refused to unpickle a PyTorch weight file: it holds objects other than tensors, and adapt never "
            "runs code from checkpoints; convert the weights to safetensors from a copy you trust"
        )
    if isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e):
        return f"a PyTorch weight file is corrupt or truncated ({first_line(e)}); re-download the model"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text ({e.reason} at byte {e.start}); re-save the file as UTF-8"
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return "out of memory; lower the batch size, the lengths, or use a smaller model"
    if isinstance(e, OSError):
        return _explain_os_error(e)
    cause = e.__cause__
    if cause is not None and type(e).__module__.startswith("datasets"):
        return explain(cause)  # datasets wraps the real reason (bad bytes, bad JSON) in its own error
    return None


def _explain_os_error(e: OSError) -> str:
    if e.filename is None:
        return first_line(e)  # transformers and the Hub raise OSError with a full sentence
    hint = _HINTS.get(e.errno or 0, "check the path and its permissions")
    return f"{e.strerror or first_line(e)}: {e.filename}; {hint}"


def one_line(text: str) -> str:
    """A message on one line (continuation lines joined with spaces)."""
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


@contextlib.contextmanager
def about(what: str) -> Iterator[None]:
    """Re-raise an expected library failure inside the block as `AdaptError("WHAT: explanation")`."""
    try:
        yield
    except AdaptError:
        raise
    except Exception as e:
        message = explain(e)
        if message is None:
            raise
        raise AdaptError(f"{what}: {message}") from e


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Fail early when `path` cannot be created or written (probes its nearest existing ancestor)."""
    p = Path(path).absolute()
    ancestor = p
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise AdaptError(f"cannot use {p} as the {what}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):  # no probe file: the tree stays untouched
        reason = "read-only file system" if _read_only(ancestor) else "permission denied"
        raise AdaptError(f"cannot use {p} as the {what}: cannot create files in {ancestor} ({reason})")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_output_file(path: str | os.PathLike, option: str) -> None:
    """Fail early when the file an option names cannot be written (before the work that fills it)."""
    p = Path(path)
    if p.is_dir():
        raise AdaptError(f"{option} {p} is a directory; give a file name")
    check_writable(p.absolute().parent, f"directory of {option} {p.name}")


def check_hub_reachable(name: str, revision: str | None = None) -> None:
    """A Hub id that is not a local path must be cached or its server reachable: one 3 s probe instead of
    huggingface_hub's half a minute of retries. Offline mode (HF_HUB_OFFLINE=1) is left to the Hub library."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if Path(name).expanduser().exists() or constants.HF_HUB_OFFLINE:
        return
    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=3).close()
    except OSError as e:
        raise AdaptError(
            f"{name!r} is not a local directory, not in the Hub cache, and {constants.ENDPOINT} cannot be "
            f"reached ({e.strerror or first_line(e)}); check the path, or connect to fetch it"
        ) from None


def resolve_device(name: str | None) -> str:
    """A usable torch device string: `name` checked, or cuda when available, else cpu."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise AdaptError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AdaptError(
                f"--device {name}: this torch has no CUDA support or sees no GPU; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AdaptError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise AdaptError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise AdaptError(f"--device {name}: adapt runs on cpu, cuda or mps")
    return str(device)
