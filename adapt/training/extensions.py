"""Stale build locks in torch's C++ extension cache, found before DeepSpeed waits on them for ever.

DeepSpeed builds (or, once built, still loads through torch's build step) C++ ops such as its CPU
shared-memory collective with `torch.utils.cpp_extension.load`, which serialises builds with a `lock` file
in `<cache>/<op>/lock` (`TORCH_EXTENSIONS_DIR`, else `~/.cache/torch_extensions/py<XY>_<cpu|cuXYZ>`). The
lock is a plain file that the building process creates exclusively and holds open until it removes it; a
build killed in between leaves the file behind, and every later launch then waits on it silently, for ever.
A lock that no live process holds open (read from Linux /proc) is stale; where /proc does not show every
process's files, a lock older than STALE_AFTER_S with no holder found is taken as stale.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from adapt.core.errors import AdaptError

STALE_AFTER_S = 600  # longer than any build of DeepSpeed's ops seen (its CPU op: about a minute)


def extensions_root() -> Path:
    """torch's extension cache, computed as `torch.utils.cpp_extension` does (without creating it)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    named = os.environ.get("TORCH_EXTENSIONS_DIR")
    if named:
        return Path(named)
    if torch.version.hip is not None:
        device = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        device = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        device = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{device}"


def open_files() -> tuple[set[Path], bool]:
    """The files open in any process this user may inspect, and whether every process could be read
    (False without /proc, or when some processes' descriptors are hidden)."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return set(), False
    found, complete = set(), True
    for pid in proc.iterdir():
        if not pid.name.isdigit():
            continue
        try:
            links = list((pid / "fd").iterdir())
        except PermissionError:
            complete = False
            continue
        except OSError:  # the process ended meanwhile
            continue
        for link in links:
            try:
                found.add(Path(os.readlink(link)))
            except OSError:
                continue
    return found, complete


def stale_locks(root: Path) -> list[Path]:
    """`<root>/<op>/lock` files no live process holds (or, where that cannot be seen, old ones)."""
    locks = sorted(root.glob("*/lock")) if root.is_dir() else []
    if not locks:
        return []
    held, complete = open_files()
    stale = []
    for lock in locks:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:  # released meanwhile
            continue
        if lock.resolve() in held or (not complete and age < STALE_AFTER_S):
            continue
        if lock.exists():
            stale.append(lock)
    return stale


def check_build_locks() -> None:
    """Refuse, before DeepSpeed starts, a launch that would wait for ever on a stale build lock."""
    stale = stale_locks(extensions_root())
    if stale:
        lock = stale[0]
        raise AdaptError(
            f"a build of torch extension {lock.parent.name} was interrupted and left its lock {lock}, on "
            f"which DeepSpeed would wait for ever (no process holds it); remove it: rm {lock}"
        )
