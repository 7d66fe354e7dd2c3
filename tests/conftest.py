"""Shared fixtures: tiny random models of several architectures, built offline once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from adapt.tiny import build_tiny_model  # noqa: E402

CORE_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2", "olmo2", "phi3", "granite")


@pytest.fixture(scope="module")
def one_thread() -> object:
    """One torch thread for a module: tiny models run fastest so; several threads thrash on a busy
    2-core machine. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Source AR checkpoints on disk, one per architecture (qwen2 with spare embedding rows)."""
    root = tmp_path_factory.mktemp("tiny")
    return {a: build_tiny_model(a, root / a, spare_rows=8 if a == "qwen2" else 0) for a in CORE_ARCHS}


@pytest.fixture(scope="session")
def converted(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Diffusion checkpoints converted from `tiny_models`."""
    from adapt.conversion.convert import convert

    root = tmp_path_factory.mktemp("converted")
    return {a: convert(str(p), root / a).out for a, p in tiny_models.items()}


@pytest.fixture(scope="session")
def llama_src(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def llama_diffusion(converted: dict[str, Path]) -> Path:
    return converted["llama"]


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache, offline (environment and huggingface_hub's already-read constants)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for key, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(key, "1" if value is True else value)
        monkeypatch.setattr(constants, key, value)
    return cache
