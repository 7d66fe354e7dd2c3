"""What adapt may delete: only what it can prove it wrote.

Every directory adapt writes atomically carries `.adapt-owner.json`: a unique id, the writing process
(pid, host) and, once complete, the list of files it wrote. A folder is never removed or renamed because
of its name: a leftover of a killed write is recognised by the id in its name matching the id inside it,
and a replaced or pruned output loses only the files its marker lists (anything else is kept and named).
Outputs of adapt versions older than the marker are recognised by their config's `diffusion` block and
adapt's own file names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER = ".adapt-owner.json"

# What adapt versions before the marker wrote into a checkpoint, an export or a training checkpoint.
_LEGACY = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|vocab\.json"
    r"|merges\.txt|chat_template\.(jinja|json)|recipe\.yaml|training_summary\.json|eval_results\.json"
    r"|adapter_config\.json|adapter_model\.safetensors|trainer_state\.json"
    r"|(optimizer|scheduler|random_states|sampler|model|pytorch_model)[\w.-]*\.(bin|pkl|pt|safetensors)"
    r"|pytorch_model_fsdp_\d+/.*|optimizer_\d+/.*|pytorch_model/.*|global_step\d+/.*|latest|zero_to_fp32\.py"
    r"|custom_checkpoint_\d+\.pkl)$"
)


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def host() -> str:
    return socket.gethostname()


def write_marker(d: Path, marker_id: str, files: list[str] | None = None) -> None:
    """Record that this process writes `d` (`files`: what it holds once complete)."""
    record: dict[str, Any] = {"writer": "adapt", "id": marker_id, "pid": os.getpid(), "host": host()}
    if files is not None:
        record["files"] = sorted(files)
    tmp = d / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, d / MARKER)


def read_marker(d: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(record, dict)
        or record.get("writer") != "adapt"
        or not isinstance(record.get("id"), str)
    ):
        return None
    return record


def files_under(d: Path) -> list[str]:
    """Every file (and symlink) below `d`, as posix paths relative to it, the marker excluded."""
    found = []
    for root, dirs, names in os.walk(d):
        rel = Path(root).relative_to(d)
        for name in names + [n for n in dirs if (Path(root) / n).is_symlink()]:
            path = (rel / name).as_posix()
            if path not in (MARKER, f"{MARKER}.tmp"):
                found.append(path)
    return found


def seal(d: Path, marker_id: str, umask: int) -> None:
    """A complete output: its files take the umask's permissions and the marker lists them."""
    for root, dirs, names in os.walk(d):
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~umask)
        for name in names:
            if not (Path(root) / name).is_symlink():
                os.chmod(Path(root) / name, 0o666 & ~umask)
    write_marker(d, marker_id, files_under(d))
    os.chmod(d / MARKER, 0o666 & ~umask)


def owned_files(d: Path) -> set[str] | None:
    """The files adapt wrote in `d` (None: nothing shows that adapt wrote `d`)."""
    record = read_marker(d)
    if record is not None and isinstance(record.get("files"), list):
        return {f for f in record["files"] if isinstance(f, str)}
    if record is None and legacy_output(d):
        return {f for f in files_under(d) if _LEGACY.match(f)}
    return None


def legacy_output(d: Path) -> bool:
    """A directory an adapt version before the marker wrote: a diffusion checkpoint, an adapter export, or
    a training checkpoint."""
    if (d / "trainer_state.json").is_file() and (d / "recipe.yaml").is_file():
        return True
    if (d / "adapter_config.json").is_file() and (d / "training_summary.json").is_file():
        return True
    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("diffusion"), dict)


def foreign_entries(d: Path) -> list[str]:
    """What in `d` adapt did not write, by top-level name (a folder as `name/`); everything when nothing
    shows that adapt wrote `d`."""
    owned = owned_files(d)
    foreign = {f for f in files_under(d) if owned is None or f not in owned}
    return sorted({f.split("/")[0] + ("/" if "/" in f else "") for f in foreign})


def add_owned(d: Path, *names: str) -> None:
    """Record files adapt adds to an output it wrote earlier (e.g. eval_results.json)."""
    record = read_marker(d)
    if record is not None and isinstance(record.get("files"), list):
        write_marker(d, record["id"], sorted({*record["files"], *names}))


def ensure_marker(d: Path) -> str:
    """The id of `d`'s marker; an output of an older adapt (or a training checkpoint) gets one listing
    the files adapt wrote there."""
    record = read_marker(d)
    if record is not None:
        return record["id"]
    marker_id = new_id()
    write_marker(d, marker_id, sorted(owned_files(d) or ()))
    return marker_id


def remove_owned(d: Path, whole: bool = False) -> list[str]:
    """Delete what adapt wrote in `d` and the folders that are then empty; keep (and return) the rest.

    `whole`: `d` is a temporary directory this or a killed adapt process created under a unique id (its
    marker proves it), so all of it is adapt's, complete or not.
    """
    if whole:
        shutil.rmtree(d, ignore_errors=True)
        return []
    owned = owned_files(d) or set()
    for f in owned:
        (d / f).unlink(missing_ok=True)
    kept = foreign_entries(d)  # everything, when nothing shows adapt wrote `d`
    (d / MARKER).unlink(missing_ok=True)
    for root, _, _ in sorted(os.walk(d), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(root)
    if kept:
        log.warning(
            "kept %s in %s: adapt did not write %s", ", ".join(kept), d, "it" if len(kept) == 1 else "them"
        )
    return kept
