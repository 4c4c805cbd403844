"""Multiple-choice reading through the logit lens (Lim et al. 2505.13141, METHODS.md §1).

For each question, at the answer position (the prompt's last token) and every layer: the
probability of each option label ("A", "B", ...: the token set of the label, with and without a
leading space) and of the correct one, per language; and the "shared space" measure, the cosine
between a language's last-token residual and the English residual of the parallel item.

Items and prompts are the evaluation harness's (`jaxlens.data.items`: `Item`, `load_xcopa` /
`xcopa_items`, `load_jsonl`; `jaxlens.data.templates`: a `Template`'s lettered prompt), so the lens reads exactly the
prompts `jaxlens eval` scores. Parallel items share their id; English is "en".
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxlens.methods.bootstrap import bootstrap_mean
from jaxlens.data.items import LETTERS, Item
from jaxlens.data.templates import XCOPA_TEMPLATE, Template
from jaxlens.methods.readout import read_last_token
from jaxlens.data.tokensets import token_set, vocab_strings


@dataclasses.dataclass
class LangReading:
    """One language's reading: p_labels [N, L, K], p_correct [N, L], correct [N, L] (the correct
    label has the highest label probability), cos_en [N, L] (None for English itself), and
    cos_en_centered [N, L]: the same after subtracting, per layer, the mean residual of both sides
    (raw residuals share a large common direction, so raw cosines sit near 1 at every layer)."""

    items: list[Item]
    p_labels: np.ndarray
    p_correct: np.ndarray
    correct: np.ndarray
    resid: np.ndarray
    cos_en: np.ndarray | None = None
    cos_en_centered: np.ndarray | None = None


def read_items(model, items: Sequence[Item], template: Template = XCOPA_TEMPLATE, batch_size: int = 16,
               progress: bool = True, desc: str = "mc") -> LangReading:
    vocab = vocab_strings(model.tokenizer)
    K = max(len(it.options) for it in items)
    labels = [token_set(label, vocab, byte_token=False) for label in LETTERS[:K]]
    prompts = [template.lettered_text(it) for it in items]
    sets = [[labels[j] if j < len(it.options) else frozenset() for j in range(K)] for it in items]
    read = read_last_token(model, prompts, sets, batch_size=batch_size, keep_resid=True, progress=progress, desc=desc)
    answer = np.array([it.answer for it in items])
    p_correct = np.take_along_axis(read.set_probs, answer[:, None, None], axis=2)[:, :, 0]  # [N, L]
    correct = read.set_probs.argmax(axis=2) == answer[:, None]
    return LangReading(list(items), read.set_probs, p_correct, correct, read.resid)


def cosine(a, b):
    """Row-wise cosine over the last axis (0 where a vector is 0)."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-30), 0.0)


def mc_lens(model, by_lang: dict[str, Sequence[Item]], english: dict[str, tuple[str, Sequence[Item]]],
            template: Template = XCOPA_TEMPLATE, batch_size: int = 16, progress: bool = True) -> dict[str, LangReading]:
    """by_lang: lang -> items; english: lang -> (name, the English items parallel to them, same ids).
    Returns name -> LangReading for every language and every English side read (each read once:
    the user's "en" items serve every language; XCOPA's "en:zh", "en:sw"... are per language)."""
    out: dict[str, LangReading] = {}
    for lang in sorted(by_lang, key=lambda x: x != "en"):  # English first: it is reused
        out[lang] = reading = read_items(model, by_lang[lang], template, batch_size, progress, desc=lang)
        if lang == "en" or lang not in english:
            continue
        name, en_items = english[lang]
        if name not in out:
            out[name] = read_items(model, en_items, template, batch_size, progress, desc=name)
        en_row = {it.id: r for r, it in enumerate(out[name].items)}
        pairs = [(i, en_row[it.id]) for i, it in enumerate(reading.items) if it.id in en_row]
        mine, theirs = reading.resid[[i for i, _ in pairs]], out[name].resid[[j for _, j in pairs]]  # [M, L, D]
        centre = np.concatenate([mine, theirs]).mean(axis=0)  # [L, D]
        reading.cos_en = np.full(reading.p_correct.shape, np.nan)  # [N, L]; NaN: no parallel English item
        reading.cos_en_centered = reading.cos_en.copy()
        rows = [i for i, _ in pairs]
        reading.cos_en[rows] = cosine(mine, theirs)
        reading.cos_en_centered[rows] = cosine(mine - centre, theirs - centre)
    return out


def summary_rows(readings: dict[str, LangReading], n_boot: int = 1000, seed: int = 0) -> tuple[list[str], list[list]]:
    """Per language and layer: mean and 95% band of P(correct), label accuracy, cosine to English."""
    header = ["lang", "layer", "n", "p_correct", "p_correct_lo", "p_correct_hi", "accuracy",
              "cos_en", "cos_en_lo", "cos_en_hi", "cos_en_centered", "cos_en_centered_lo", "cos_en_centered_hi"]
    rows = []
    for lang, r in readings.items():
        pc = bootstrap_mean(r.p_correct, n_boot=n_boot, seed=seed)
        acc = r.correct.mean(axis=0)
        paired = np.isfinite(r.cos_en[:, 0]) if r.cos_en is not None else None
        has_cos = paired is not None and paired.any()
        cos = bootstrap_mean(r.cos_en[paired], n_boot=n_boot, seed=seed) if has_cos else None
        cen = bootstrap_mean(r.cos_en_centered[paired], n_boot=n_boot, seed=seed) if has_cos else None
        for layer in range(r.p_correct.shape[1]):
            row = [lang, layer, len(r.items)] + [round(float(a[layer]), 6) for a in pc] + [round(float(acc[layer]), 6)]
            for band in (cos, cen):
                row += [round(float(a[layer]), 6) for a in band] if band else ["", "", ""]
            rows.append(row)
    return header, rows
