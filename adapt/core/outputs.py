"""Outputs adapt writes: atomic directories, leftovers of killed runs, and what may never be replaced.

`atomic_dir(out)` builds a directory beside `out` as `.NAME.tmp-PID-ID` (ID: the unique id of the
`.adapt-owner.json` marker written inside it first) and renames it into place; a replaced `out` waits as
`.NAME.old-PID-ID` (its own marker's id) until the new one is in. A process killed in between leaves
those behind: the next `atomic_dir` in the same parent removes or recovers them and says so, but only
those whose marker proves adapt wrote them (the id in the name is the id inside, the PID is dead on this
host); a folder that merely looks like one is never touched. `prepare_output_dir` refuses, even with
--force, an output that is, contains or lies inside a source, and one that holds a file adapt did not
write (see `adapt.core.ownership`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from adapt.core.boundary import check_writable
from adapt.core.errors import AdaptError
from adapt.core.ownership import (
    ensure_marker,
    foreign_entries,
    host,
    new_id,
    read_marker,
    remove_owned,
    seal,
    write_marker,
)

log = logging.getLogger(__name__)

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<id>[0-9a-f]{16})$")


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename.

    On any exception the temporary directory is removed and `out` is left as it was. The directory and
    the files written into it get the umask's permissions. A replaced `out` loses only the files adapt
    wrote there; anything else moves to `NAME.kept-ID` beside it, named in a warning.
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(out.parent)
    marker_id = new_id()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{marker_id}")
    tmp.mkdir()
    try:
        write_marker(tmp, marker_id)
        yield tmp
        seal(tmp, marker_id, current_umask())
    except BaseException:
        remove_owned(tmp, whole=True)
        raise
    old = None
    if out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{new_id()}")
    elif out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{ensure_marker(out)}")
    if old is not None:
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        keep_foreign(old, out)


def keep_foreign(old: Path, out: Path) -> None:
    """Remove the replaced output's files; what adapt did not write moves to a visible folder, named."""
    if old.is_symlink():  # a link was replaced, not what it points to
        old.unlink()
        return
    kept = remove_owned(old)
    if kept:
        where = out.with_name(f"{out.name}.kept-{old.name.rsplit('-', 1)[-1]}")
        os.replace(old, where)
        log.warning("%s held files adapt did not write (%s): moved to %s", out, ", ".join(kept), where)


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

    Only a folder whose marker proves it (the id in its name is the id inside, written by a process of
    this host that is gone) is touched. A temporary directory is removed, unless it was killed between
    its two renames (its output missing, its backup present): then the temporary directory is complete
    and is renamed into place. A backup is restored when the output is missing, else removed.
    """
    found: dict[tuple[str, int], dict[str, Path]] = {}
    for p in parent.iterdir() if parent.is_dir() else []:
        m = _LEFTOVER.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and _proven(p, m):
            found.setdefault((m["name"], int(m["pid"])), {})[m["kind"]] = p
    actions = [_recover(parent / name, parts) for (name, _), parts in sorted(found.items())]
    for line in actions:
        log.warning("%s", line)
    return actions


def _proven(p: Path, m: re.Match[str]) -> bool:
    record = read_marker(p)
    if record is None or record["id"] != m["id"] or record.get("host") != host() or pid_alive(int(m["pid"])):
        return False
    return m["kind"] == "old" or record.get("pid") == int(m["pid"])  # a backup keeps its writer's marker


def _recover(out: Path, parts: dict[str, Path]) -> str:
    tmp, old = parts.get("tmp"), parts.get("old")
    if not out.exists() and tmp is not None and old is not None and read_marker(tmp).get("files") is not None:
        os.replace(tmp, out)
        keep_foreign(old, out)
        return f"recovered {out} from an interrupted replacement (its new contents were complete)"
    if not out.exists() and old is not None:
        os.replace(old, out)
        if tmp is not None:
            remove_owned(tmp, whole=True)
        return f"restored {out} from the backup an interrupted run left in {old.name}"
    if tmp is not None:
        remove_owned(tmp, whole=True)
    if old is not None:
        keep_foreign(old, out)
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


def check_replaceable(p: Path, what: str = "--force") -> None:
    """A non-empty directory may be replaced only if adapt wrote every file in it."""
    foreign = foreign_entries(p)
    if foreign:
        sample = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise AdaptError(
            f"refusing to replace {p}: it holds files adapt did not write ({sample}); {what} only replaces "
            "what adapt wrote: move them out, or choose an empty or new directory"
        )
