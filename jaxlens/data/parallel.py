"""Parallel prompt sets for the Lens subspace: {lang: [text]}, row i of every language the same item.

Shipped: XCOPA premises (CC BY 4.0; ../shared/data/xcopa): 100 validation and 500 test items per
language, English from the machine-translated side of Italian (same idx, so parallel to all).
Users give JSONL: one object per line with "lang" and "text" (and optionally "id": rows are then
aligned by id across languages, else by order).
"""

from __future__ import annotations

import json
from typing import Sequence

from jaxlens.data.xcopa import XCOPA_LANGS, xcopa

ENGLISH_FROM = "it"


def xcopa_premises(langs: Sequence[str], split: str = "val", start: int = 0, limit: int | None = None) -> dict[str, list[str]]:
    """{lang: premises[start:start+limit]} for XCOPA languages and "en"."""
    bad = [lang for lang in langs if lang != "en" and lang not in XCOPA_LANGS]
    if bad:
        raise ValueError(f"XCOPA has no language(s) {bad}; it has en, {', '.join(XCOPA_LANGS)}")
    end = None if limit is None else start + limit
    return {lang: [r["premise"] for r in xcopa(ENGLISH_FROM if lang == "en" else lang, split, english=lang == "en")][start:end]
            for lang in langs}


def read_prompts(path, langs: Sequence[str] | None = None) -> dict[str, list[str]]:
    """{lang: [text]} from JSONL rows {"lang", "text"[, "id"]}; with ids, only ids every language has, in order."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("lang"), str) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{n}: expected an object with string fields \"lang\" and \"text\"")
            rows.append(row)
    out: dict[str, dict] = {}
    for i, row in enumerate(rows):
        if langs is None or row["lang"] in langs:
            out.setdefault(row["lang"], {})[str(row.get("id", len(out.get(row["lang"], {}))))] = row["text"]
    if langs is not None and (missing := [l for l in langs if l not in out]):
        raise ValueError(f"{path} has no prompts in language(s) {missing}")
    shared = [i for i in next(iter(out.values())) if all(i in v for v in out.values())] if out else []
    return {lang: [texts[i] for i in shared] for lang, texts in out.items()}


def split_prompts(prompts: dict[str, list[str]], n_fit: int, n_test: int) -> tuple[dict, dict]:
    """The first n_fit rows to fit, the next n_test to test (parallel rows stay parallel)."""
    return ({l: v[:n_fit] for l, v in prompts.items()}, {l: v[n_fit : n_fit + n_test] for l, v in prompts.items()})
