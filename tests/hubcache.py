"""A Hugging Face Hub cache staged on disk, so that Hub ids resolve offline exactly as after a download."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

PROBED = ("config.json",)
"""Files transformers asks the Hub for even when a repo (a LoRA adapter) has none: a download records the
Hub's 404 in `.no_exist/COMMIT/NAME`, and offline lookups read that record as "missing", not "unreachable"."""


def stage(folder: Path, repo_id: str, cache: Path, revision: str = "main") -> Path:
    """Copy `folder` into `cache` as the snapshot of `repo_id` at `revision`; returns the snapshot dir.

    The layout is huggingface_hub's: models--OWNER--NAME/{refs/REVISION, snapshots/COMMIT/...,
    .no_exist/COMMIT/...}.
    """
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    for name in PROBED:
        if not (folder / name).exists():
            (repo / ".no_exist" / commit).mkdir(parents=True, exist_ok=True)
            (repo / ".no_exist" / commit / name).touch()
    return snapshot


def edited_copy(src: Path, dst: Path, **diffusion: object) -> Path:
    """A copy of the checkpoint `src` at `dst` with `diffusion` settings changed in its config.json."""
    import json

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["diffusion"].update(diffusion)
    (dst / "config.json").write_text(json.dumps(config))
    return dst
