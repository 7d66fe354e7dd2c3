"""Outputs adapt writes: atomic directories, leftovers of killed runs, and what may never be replaced.

`atomic_dir(out)` builds a directory beside `out` as `.NAME.tmp-PID-XXXX` and renames it into place; a
replaced `out` waits as `.NAME.old-PID` until the new one is in. A process killed in between leaves
those behind: the next `atomic_dir` in the same parent removes or recovers them (by the dead PID) and
says so. `prepare_output_dir` refuses, even with --force, an output that is, contains or lies inside
a source, and one that holds anything but a checkpoint adapt wrote.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from adapt.core.boundary import check_writable
from adapt.core.errors import AdaptError

log = logging.getLogger(__name__)

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename.

    On any exception the temporary directory is removed and `out` is left as it was. The directory
    gets the umask's permissions (not mkdtemp's 0700).
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o777 & ~current_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def json_text(data: Any) -> str:
    """Strict, indented JSON: NaN and infinities (not JSON) are written as null."""
    return json.dumps(finite_or_null(data), indent=2, allow_nan=False)


def finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def recover_leftovers(parent: Path) -> list[str]:
    """Clean what killed `atomic_dir`s left in `parent`; returns one line per action (also logged).

    A dead process's temporary directory is removed, unless it was killed between its two renames
    (its output missing, its backup present): then the temporary directory is complete and is renamed
    into place. A dead process's backup is restored when the output is missing, else removed.
    """
    found: dict[tuple[str, int], dict[str, Path]] = {}
    for p in parent.iterdir() if parent.is_dir() else []:
        m = _LEFTOVER.match(p.name)
        if m and p.is_dir() and not pid_alive(int(m["pid"])):
            found.setdefault((m["name"], int(m["pid"])), {})[m["kind"]] = p
    actions = [_recover(parent / name, parts) for (name, _), parts in sorted(found.items())]
    for line in actions:
        log.warning("%s", line)
    return actions


def _recover(out: Path, parts: dict[str, Path]) -> str:
    tmp, old = parts.get("tmp"), parts.get("old")
    if not out.exists() and tmp is not None and old is not None:
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return f"recovered {out} from an interrupted replacement (its new contents were complete)"
    if not out.exists() and old is not None:
        os.replace(old, out)
        return f"restored {out} from the backup an interrupted run left in {old.name}"
    for leftover in (tmp, old):
        if leftover is not None:
            shutil.rmtree(leftover, ignore_errors=True)
    names = ", ".join(p.name for p in (tmp, old) if p is not None)
    return f"removed {names} beside {out}, left by a run that was killed"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_output_dir(
    out: str | os.PathLike, force: bool, sources: Iterable[str | os.PathLike] = ()
) -> Path:
    """Check OUT before any work: not a source, empty unless forced, replaceable, writable (not created)."""
    p = Path(out)
    recover_leftovers(p.absolute().parent)  # a killed earlier write: its output back before the checks
    for source in sources:
        check_apart(p, source, f"the output {p}", "the source")
    if p.exists() and not p.is_dir():
        raise AdaptError(f"output path {p} exists and is not a directory")
    if p.exists() and any(p.iterdir()):
        if not force:
            raise AdaptError(f"output directory {p} is not empty; pass --force to overwrite it")
        check_replaceable(p)
    check_writable(p, "output directory")
    return p


def check_apart(out: str | os.PathLike, source: str | os.PathLike, what: str, source_what: str) -> None:
    """Refuse an output that is, contains or lies inside a local source (replacing it would destroy it).

    `what` and `source_what` name them in the message, e.g. "the output out/x" and "the source model".
    """
    src = Path(source).expanduser()
    if not src.exists():
        return  # a Hub id: nothing local to protect
    a, b = Path(out).expanduser().resolve(), src.resolve()
    if a == b or a in b.parents or b in a.parents:
        relation = "is" if a == b else ("contains" if a in b.parents else "lies inside")
        raise AdaptError(
            f"{what} {relation} {source_what} {source}; writing it would destroy it (--force does not "
            "allow that); choose an output outside it"
        )


def check_replaceable(p: Path) -> None:
    """A non-empty directory may be replaced only if it is a checkpoint adapt wrote."""
    if not written_by_adapt(p):
        sample = ", ".join(sorted(c.name for c in p.iterdir())[:3])
        raise AdaptError(
            f"refusing to replace {p}: it holds files adapt did not write ({sample}); --force only replaces "
            "a diffusion checkpoint written by adapt; choose an empty or new directory"
        )


def written_by_adapt(p: Path) -> bool:
    """A directory adapt wrote: a diffusion checkpoint (config.json with its `diffusion` block) or
    a LoRA adapter export (adapter_config.json beside training_summary.json)."""
    if (p / "adapter_config.json").is_file() and (p / "training_summary.json").is_file():
        return True
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("diffusion"), dict)
