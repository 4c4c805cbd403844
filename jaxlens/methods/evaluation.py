"""Multilingual multiple-choice metrics (METHODS.md §1): accuracy, cross-language consistency,
transfer, on the scores of `jaxlens.methods.scoring`.

    result = evaluate(items, scores)   # per language, and per pair with English
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxlens.data.items import Item
from jaxlens.methods.scoring import Scores

# ---------------------------------------------------------------------------------------------
# Metrics (numpy; METHODS.md §1)


def predictions(scores: np.ndarray) -> np.ndarray:
    """[..., N, O] -> [..., N] argmax over the valid (non-NaN) options; ties go to the first."""
    return np.argmax(np.where(np.isnan(scores), -np.inf, scores), axis=-1)


def accuracy(scores: np.ndarray, answers: np.ndarray) -> float:
    return float(np.mean(predictions(scores) == answers))


def ranks(scores: np.ndarray) -> np.ndarray:
    """Average ranks (1 = lowest score, ties share their mean rank) over the valid options; NaN stays NaN."""
    valid = ~np.isnan(scores)
    s = np.where(valid, scores, 0.0)
    both = valid[..., :, None] & valid[..., None, :]  # [N, O, O]
    below = ((s[..., None, :] < s[..., :, None]) & both).sum(-1)
    tied = ((s[..., None, :] == s[..., :, None]) & both).sum(-1)
    return np.where(valid, below + (tied + 1) / 2.0, np.nan)


def spearman_per_item(scores_a: np.ndarray, scores_b: np.ndarray) -> np.ndarray:
    """Spearman rho between the option rank vectors of each item, [N]; NaN when a vector is constant."""
    ra, rb = ranks(scores_a), ranks(scores_b)
    valid = ~np.isnan(ra) & ~np.isnan(rb)
    n = valid.sum(-1)
    mean = lambda r: np.where(valid, r, 0).sum(-1, keepdims=True) / np.maximum(n, 1)[..., None]  # noqa: E731
    da, db = np.where(valid, ra - mean(ra), 0), np.where(valid, rb - mean(rb), 0)
    num, den = (da * db).sum(-1), np.sqrt((da**2).sum(-1) * (db**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def consistency(scores_a: np.ndarray, scores_b: np.ndarray) -> float:
    """Mean over items of the Spearman rho of their option ranks (items where rho is defined)."""
    rho = spearman_per_item(scores_a, scores_b)
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan")


def transfer(pred_a, pred_b, answers) -> dict[str, float]:
    """Positive |F1 ∩ F2| / |F1| and negative |¬F1 ∩ ¬F2| / |¬F1| transfer from language a to b.

    F = items answered correctly. negative_same counts only items where b is wrong with the same
    option as a ("the same wrong answer"); negative_any counts any wrong answer in b.
    """
    pred_a, pred_b, answers = map(np.asarray, (pred_a, pred_b, answers))
    right_a, right_b = pred_a == answers, pred_b == answers
    ratio = lambda num, den: float(num.sum() / den.sum()) if den.sum() else float("nan")  # noqa: E731
    return {
        "positive": ratio(right_a & right_b, right_a),
        "negative_any": ratio(~right_a & ~right_b, ~right_a),
        "negative_same": ratio(~right_a & (pred_b == pred_a), ~right_a),
    }


PAIR_METRICS = ("consistency", "positive", "negative_any", "negative_same")


def evaluate(items: Sequence[Item], scores: Scores, english: str = "en") -> dict:
    """Accuracy per language and the pairwise metrics of every scoring method.

    Items are aligned across languages by id (pairs use the ids both languages have). For each
    method: `accuracy` {lang: acc}; `prediction_share` {lang: [fraction of items predicted as
    option 0, 1, ...]}; `pairs` {metric: matrix [l1][l2]} with l1 the row (transfer
    is measured from l1 to l2: F1 is l1's correct set); `mean_over_pairs` {metric: mean over
    ordered pairs of distinct languages}; `vs_english` {metric: {lang: value with l1 = English}}.
    """
    langs = list(dict.fromkeys(item.lang for item in items))
    index = {(item.id, item.lang): i for i, item in enumerate(items)}
    answers = np.array([item.answer for item in items])
    result = {"languages": langs, "n_items": {lang: sum(item.lang == lang for item in items) for lang in langs},
              "chance": float(np.mean([1 / len(item.options) for item in items])), "methods": {}}
    for method, s in scores.by_method().items():
        pred = predictions(s)
        acc = {lang: float(np.mean([pred[i] == answers[i] for (_, lg), i in index.items() if lg == lang])) for lang in langs}
        pairs = {m: [[float("nan")] * len(langs) for _ in langs] for m in PAIR_METRICS}
        for a, la in enumerate(langs):
            for b, lb in enumerate(langs):
                ids = [key for key, lg in index if lg == la and (key, lb) in index]
                ia = np.array([index[(k, la)] for k in ids], int)
                ib = np.array([index[(k, lb)] for k in ids], int)
                if not ids:
                    continue
                if np.any(answers[ia] != answers[ib]):
                    raise ValueError(f"items with the same id have different answers in {la} and {lb}")
                pairs["consistency"][a][b] = consistency(s[ia], s[ib])
                for name, value in transfer(pred[ia], pred[ib], answers[ia]).items():
                    pairs[name][a][b] = value
        off = ~np.eye(len(langs), dtype=bool)
        mean = {m: float(np.nanmean(np.asarray(pairs[m])[off])) if off.any() and np.isfinite(np.asarray(pairs[m])[off]).any() else float("nan")
                for m in PAIR_METRICS}
        # How often each option position is picked: a model that always answers "B" looks
        # consistent across languages without reading them (letter scoring in small models).
        share = {lang: np.bincount(pred[[i for (_, lg), i in index.items() if lg == lang]], minlength=s.shape[-1]).tolist()
                 for lang in langs}
        share = {lang: [c / result["n_items"][lang] for c in counts] for lang, counts in share.items()}
        entry = {"accuracy": acc, "prediction_share": share, "pairs": pairs, "mean_over_pairs": mean}
        if english in langs:
            e = langs.index(english)
            entry["vs_english"] = {m: {lang: pairs[m][e][b] for b, lang in enumerate(langs) if lang != english} for m in PAIR_METRICS}
        result["methods"][method] = entry
    if scores.letter_mass is not None:
        result["letter_mass"] = {lang: float(np.mean([scores.letter_mass[i] for (_, lg), i in index.items() if lg == lang])) for lang in langs}
    return result

