"""Multiple-choice items: one question in one language, parallel across languages by `id`.

    items = load_xcopa(["et", "zh"], english=True)   # or load_jsonl("mmlu.jsonl")
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from jaxlens.data.xcopa import XCOPA_LANGS, xcopa

LETTERS = "ABCDEFGHIJ"  # option letters: a JSONL answer may be one, letter scoring prompts with them



@dataclasses.dataclass(frozen=True)
class Item:
    """One multiple-choice question in one language; parallel items share `id` across languages."""

    id: str
    lang: str
    prompt: str  # the question (XCOPA: the premise), in the item's language, before any template
    options: tuple[str, ...]
    answer: int  # index into options
    kind: str = ""  # a dataset-specific question type a template may name (XCOPA: cause | effect)


def xcopa_items(lang: str, split: str = "val", english: bool = False) -> list[Item]:
    """XCOPA items of one language; english=True: the English (machine-translated) side, lang "en"."""
    return [
        Item(str(r["idx"]), "en" if english else lang, r["premise"], (r["choice1"], r["choice2"]), int(r["label"]), r["question"])
        for r in xcopa(lang, split, english=english)
    ]


# data-gmt has no Quechua; Italian -> English is the highest-resource pair of the ten.
DEFAULT_ENGLISH_FROM = "it"


def load_xcopa(langs: Sequence[str] = XCOPA_LANGS, split: str = "val", english: bool = True,
               english_from: str = DEFAULT_ENGLISH_FROM, limit: int | None = None) -> list[Item]:
    """Items of each language (first `limit` per language), plus lang "en" when english=True.

    XCOPA has no original English file here: "en" is the `data-gmt` machine translation into
    English of the `english_from` language's items (same idx, so parallel to every language).
    """
    langs = [lang for lang in langs if lang != "en"]
    items = []
    if english:
        items += xcopa_items(english_from, split, english=True)[:limit]
    for lang in langs:
        items += xcopa_items(lang, split)[:limit]
    return items


def load_jsonl(path, limit: int | None = None) -> list[Item]:
    """Generic multiple choice, one JSON object per line (Global-MMLU, M-MMLU, XNLI, ...):

        {"id": "q17", "lang": "sw", "question": "...", "options": ["...", "..."], "answer": 1}

    `answer` is an index into `options` or a letter ("B"); parallel items share `id` across
    languages (English: lang "en"). `limit` keeps the first N items of each language.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSONL file at {path}")
    items, seen, per_lang = [], set(), {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            item = _jsonl_item(row, where)
            if (item.id, item.lang) in seen:
                raise ValueError(f"{where}: duplicate id {item.id!r} for lang {item.lang!r}")
            seen.add((item.id, item.lang))
            per_lang[item.lang] = per_lang.get(item.lang, 0) + 1
            if limit is None or per_lang[item.lang] <= limit:
                items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _jsonl_item(row, where: str) -> Item:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with id, lang, question, options, answer")
    missing = [k for k in ("id", "lang", "question", "options", "answer") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (need id, lang, question, options, answer)")
    if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
        raise ValueError(f"{where}: id must be a string or an integer, got {row['id']!r}")
    for key in ("lang", "question"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise ValueError(f"{where}: {key} must be a non-empty string, got {row[key]!r}")
    options = row["options"]
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
        raise ValueError(f"{where}: options must be a list of at least 2 non-empty strings, got {options!r}")
    if len(options) > len(LETTERS):
        raise ValueError(f"{where}: {len(options)} options; at most {len(LETTERS)} are supported")
    answer = row["answer"]
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
        raise ValueError(f"{where}: answer must be an option index 0..{len(options) - 1} or a letter "
                         f"A..{LETTERS[len(options) - 1]}, got {row['answer']!r}")
    return Item(str(row["id"]), row["lang"], row["question"], tuple(options), answer, str(row.get("kind", "")))
