"""Where a checkpoint named on the command line lives: a local directory, or a Hub repository.

`locate(name, revision)` returns a local directory for either. A Hub id is resolved with
huggingface_hub's `snapshot_download`, so revisions (branch, tag or commit), `HF_TOKEN`, `HF_HUB_CACHE`
and `HF_HUB_OFFLINE` mean what they mean everywhere else: offline, the cached snapshot is used and
nothing is contacted. Only the files a checkpoint is made of are fetched (config, weights in
safetensors, tokenizer, adapter, recipe and summaries), never pickles or code.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapt.core.errors import AdaptError, first_line

CHECKPOINT_FILES = [
    "*.json",
    "*.safetensors",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "*.yaml",
    "README.md",
]
"""The files of a diffusion checkpoint or adapter export (adapt writes safetensors, never pickles)."""


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` or `name` that is not an existing local path and could not be mistaken for one."""
    from huggingface_hub.utils import validate_repo_id

    if not name or Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~")):
        return False
    if name.endswith("/") or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return False
    try:
        validate_repo_id(name)
    except Exception:
        return False
    return True


def locate(name: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory holding the checkpoint `name`: the directory itself, or the Hub snapshot.

    A `revision` only applies to Hub ids (a local directory has none, and saying so beats ignoring it).
    """
    text = os.fspath(name)
    if not looks_like_hub_id(text):
        if revision is not None:
            raise AdaptError(f"--revision {revision} applies to Hub ids; {text} is a local path")
        return Path(text)
    return Path(snapshot(text, revision))


def check_hub_id(name: str, revision: str | None = None) -> None:
    """Before a library looks `name` up in its own words: a Hub id whose repository or revision the Hub (or,
    offline, the cache) cannot serve is refused with the one line `locate` gives. Only config.json is
    fetched (the caller's library fetches the rest); local paths pass untouched."""
    if looks_like_hub_id(name):
        snapshot(name, revision, ("config.json",))


def snapshot(repo_id: str, revision: str | None, patterns: tuple[str, ...] | None = None) -> str:
    """The cached (or freshly downloaded) snapshot directory of a Hub model repository: its files matching
    `patterns` (default `CHECKPOINT_FILES`)."""
    from huggingface_hub import snapshot_download

    from adapt.core.boundary import check_hub_reachable

    check_hub_reachable(repo_id, revision)
    wanted = list(patterns or CHECKPOINT_FILES)
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=wanted)
    except Exception as e:
        message = hub_lookup_error(e, repo_id, revision)
        if message is None:
            raise
        raise AdaptError(message) from None
    if not (Path(path) / "config.json").is_file() and not (Path(path) / "adapter_config.json").is_file():
        raise AdaptError(f"Hub repository {repo_id!r} holds no config.json: it is not a model checkpoint")
    return path


def hub_lookup_error(e: Exception, repo_id: str, revision: str | None) -> str | None:
    """One line for a failed Hub lookup (never holding a token); None for an unexpected error (a bug)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    if isinstance(e, GatedRepoError):
        text = (
            f"Hub repository {repo_id!r} is gated: accept its terms on the Hub, then set HF_TOKEN "
            "or run `hf auth login`"
        )
    elif isinstance(e, RepositoryNotFoundError):
        text = (
            f"no local directory {repo_id} and no Hub repository {repo_id!r} that you can access "
            "(it does not exist, or it is private: set HF_TOKEN or run `hf auth login`)"
        )
    elif isinstance(e, RevisionNotFoundError):
        text = f"Hub repository {repo_id!r} has no revision {revision!r} (a branch, tag or commit)"
    elif isinstance(e, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        text = (
            f"no local directory {repo_id} and {where} is not in the Hub cache ({constants.HF_HUB_CACHE}), "
            f"and {why}; check the path, or go online once to download it"
        )
    elif isinstance(e, HfHubHTTPError):
        text = f"the Hub refused {where}: {first_line(e)}"
    else:
        return None
    return redact(text)


def redact(text: str, *secrets: str | None) -> str:
    """`text` with `secrets` and every token huggingface_hub knows of replaced by ***."""
    from huggingface_hub import get_token

    for secret in (*secrets, os.environ.get("HF_TOKEN"), get_token()):
        if secret:
            text = text.replace(secret, "***")
    return text
