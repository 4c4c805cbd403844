"""Parallel word lists for the latent-language experiment: the user's CSV or CLDR names via Babel.

A word list is a list of concepts, each a dict lang -> word, always holding English ("en", the
candidate latent language) beside the source and target languages.

CSV (Wendler et al.'s format): columns `lang,word_original,word_translation`; `word_original` is
the English word, `word_translation` the word in `lang`. Rows of the source and target languages
are joined on the English word:

    lang,word_original,word_translation
    fr,cloud,nuage
    zh,cloud,云

Built-in: CLDR's names of countries/territories, languages and months in any pair of locales
(`babel_words("fr", "zh")`), taken at run time from Babel's locale data.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Sequence

CSV_COLUMNS = ("lang", "word_original", "word_translation")
CATEGORIES = ("territories", "languages", "months")


def _is_one_word(word: str) -> bool:
    """A single word in any script: no spaces, digits or brackets ("Hong Kong SAR China" is out)."""
    return bool(word) and word[0].isalpha() and not any(c.isspace() or c.isdigit() or c in "()[],/&" for c in word)


def read_csv(path, source: str, target: str) -> list[dict[str, str]]:
    """Concepts present in both languages of a `lang,word_original,word_translation` CSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word list {path} not found")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; a word list needs the header "
                f"{','.join(CSV_COLUMNS)} (word_original = the English word), found {reader.fieldnames}"
            )
        by_lang: dict[str, dict[str, str]] = {}
        for line, row in enumerate(reader, start=2):
            lang, en, word = (str(row[c] or "").strip() for c in CSV_COLUMNS)
            if not (lang and en and word):
                raise ValueError(f"{path}:{line}: empty lang, word_original or word_translation in {row}")
            by_lang.setdefault(lang, {}).setdefault(en, word)
    by_lang.setdefault("en", {})
    for lang in (source, target):
        if lang != "en" and lang not in by_lang:
            raise ValueError(f"{path} has no rows for language {lang!r}; it has {sorted(by_lang)}")
    words = []
    for en in by_lang.get(source, {}) if source != "en" else by_lang.get(target, {}):
        row = {"en": by_lang["en"].get(en, en)}
        for lang in (source, target):
            row[lang] = row["en"] if lang == "en" else by_lang[lang].get(en)
        if all(row.values()):
            words.append(row)
    if not words:
        raise ValueError(f"{path}: no English word has both a {source!r} and a {target!r} translation")
    return words


def babel_words(source: str, target: str, categories: Sequence[str] = CATEGORIES) -> list[dict[str, str]]:
    """Parallel CLDR names (one word each in every language) for `source`, `target` and English."""
    from babel import Locale, UnknownLocaleError

    bad = [c for c in categories if c not in CATEGORIES]
    if bad:
        raise ValueError(f"unknown categories {bad}; choose from {CATEGORIES}")
    langs = list(dict.fromkeys(["en", source, target]))
    try:
        locales = {lang: Locale.parse(lang.replace("-", "_")) for lang in langs}
    except (UnknownLocaleError, ValueError) as e:
        raise ValueError(f"Babel/CLDR has no locale for {e}; use a locale code such as fr, de, ru, zh, ja") from None
    tables = {
        "territories": lambda loc: {k: v for k, v in loc.territories.items() if re.fullmatch(r"[A-Z]{2}", k)},
        "languages": lambda loc: {k: v for k, v in loc.languages.items() if re.fullmatch(r"[a-z]{2}", k)},  # ISO 639-1: the better-known ones
        "months": lambda loc: dict(loc.months["format"]["wide"]),
    }
    words, seen = [], set()
    for category in categories:
        names = {lang: tables[category](loc) for lang, loc in locales.items()}
        for key in names["en"]:
            row = {lang: str(names[lang].get(key, "")).strip() for lang in langs}
            if all(_is_one_word(w) for w in row.values()) and row["en"] not in seen:
                seen.add(row["en"])
                words.append(row)
    if not words:
        raise ValueError(f"CLDR gave no single-word names shared by {langs}")
    return words
