"""One model's shared-space reading (Lim et al. 2505.13141): for each query language and its
parallel English items, the representation similarity of the prompts (`similarity`), which
language the answer forms in (`answer_language`), and the model's own accuracy and cross-language
consistency (option log-likelihood, `evaluation`). `jaxlens shared-space` runs it for several
models on the same items and sets them side by side against relative depth.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxlens.data.items import Item
from jaxlens.data.templates import Template
from jaxlens.methods.scoring import score_items
from jaxlens.methods import evaluation as ev
from jaxlens.methods.answer_language import answer_language, summarize
from jaxlens.methods.similarity import prompt_states, similarity


def paired(items: Sequence[Item], english: Sequence[Item]) -> tuple[list[Item], list[Item]]:
    """The items that have an English partner (same id), and those partners, in the same order."""
    by_id = {it.id: it for it in english}
    keep = [it for it in items if it.id in by_id]
    return keep, [by_id[it.id] for it in keep]


def read_model(model, by_lang: dict[str, Sequence[Item]], english: dict[str, tuple[str, Sequence[Item]]],
               template: Template, *, batch_rows: int = 8, chunk: int = 4096, n_boot: int = 1000, seed: int = 0,
               progress: bool = True) -> dict:
    """-> {lang: {"n", "similarity", "answer" (summarize's dict), "reading" (AnswerReading),
    "accuracy" {query, en}, "consistency"}} for every language with parallel English items."""
    out = {}
    for lang, items in by_lang.items():
        if lang == "en" or lang not in english:
            continue
        xx, en = paired(items, english[lang][1])
        if len(xx) < 2:
            raise ValueError(f"{lang}: {len(xx)} item(s) with a parallel English item; the similarity needs at least 2")
        X = prompt_states(model, [template.context_text(it) for it in xx], batch_rows=batch_rows, progress=progress)
        Y = prompt_states(model, [template.context_text(it) for it in en], batch_rows=batch_rows, progress=progress)
        reading = answer_language(model, xx, en, template, batch_rows=batch_rows, chunk=chunk, progress=progress)
        scores = score_items(list(xx) + list(en), model.tokenizer, template=template, model=model, methods=("options",),
                                batch_rows=batch_rows, progress=progress)
        answers = np.array([it.answer for it in xx])
        ll_xx, ll_en = scores.ll[: len(xx)], scores.ll[len(xx) :]
        out[lang] = {
            "n": len(xx),
            "similarity": similarity(X, Y, n_boot=n_boot, seed=seed),
            "answer": summarize(reading, n_boot=n_boot, seed=seed),
            "reading": reading,
            "accuracy": {"query": ev.accuracy(ll_xx, answers), "en": ev.accuracy(ll_en, answers)},
            "consistency": ev.consistency(ll_xx, ll_en),
        }
    if not out:
        raise ValueError("no language has parallel English items (XCOPA: any language; JSONL: items with lang 'en')")
    return out
