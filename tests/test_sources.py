"""Packaged real data: the wiki-markup cleaner on a hand-written page, and the packages when present."""

from __future__ import annotations

import importlib.util

import pytest

from adapt.core.errors import AdaptError
from adapt.sources import clean_wiki, package_dir


def test_clean_wiki_keeps_prose_and_link_text():
    markup = (
        "{{Infobox person|name=X {{nested|a}}}}\n"
        "'''Ada''' was a [[mathematician|mathematics writer]] from [[London]].<ref>A book</ref>\n"
        "[[File:Ada.jpg|thumb|A [[portrait]]]]\n"
        "== Life ==\n"
        "{| class=wikitable\n| cell\n|}\n"
        "She wrote <!-- hidden -->notes on the [https://example.org Engine].\n"
        "* a list item\n"
        "[[Category:People]]"
    )
    assert clean_wiki(markup) == "Ada was a mathematics writer from London.\nShe wrote notes on the Engine."


def test_missing_package_is_a_clear_error():
    with pytest.raises(AdaptError, match="pip install"):
        package_dir("surely_not_an_installed_package_xyz")


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim data not installed")
def test_packaged_wiki_corpus_is_real_prose(tmp_path):
    from adapt.sources import write_corpus

    train, held_out = write_corpus("wiki", tmp_path)
    lines = train.read_text().splitlines()
    assert len(lines) > 50 and len(held_out.read_text().splitlines()) == 8
    assert "Anarchism" in held_out.read_text() and "{{" not in train.read_text()


def test_prepared_model_card_carries_the_license(tmp_path):
    from adapt.publishing.hub import source_license
    from adapt.sources import SMOLLM2_CARD

    (tmp_path / "README.md").write_text(SMOLLM2_CARD)
    assert source_license(str(tmp_path)) == "apache-2.0"
