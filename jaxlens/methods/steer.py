"""Steering toward the shared (English) space (METHODS.md §1, [inferred] where the paper is silent).

Language vector of language xx at layer l: v_l = mean h_l(en) - mean h_l(xx), the hidden state
(`resid_post`) at the last prompt token, averaged over parallel prompts. Steering adds α·v_l to
layer l's output, at every position of the prompt (`positions="all"`) or only at its last token
(`"last"`: then each grid point re-runs only the scored positions on a shared KV cache). A grid
of (layer, α) points runs as one program per batch (`jaxlens.methods.sweep`): each row gets its own
language's vector, English rows a zero one; the vectors are shared by the points, not copied.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxlens.core import interventions as iv
from jaxlens.data.items import Item
from jaxlens.data.templates import Template
from jaxlens.methods.evaluation import evaluate
from jaxlens.methods.scoring import Scores
from jaxlens.methods.states import last_token_states
from jaxlens.methods.sweep import Points, layer_alpha_points, sweep_scores

SITE = "resid_post"


def language_vectors(model, items: Sequence[Item], template: Template, *, english: str = "en",
                     method: str = "letters", site: str = SITE, batch_rows: int = 8) -> dict[str, np.ndarray]:
    """{lang: v [L, D]} = mean English state - mean language state at the last prompt token, over
    the items both languages have (by id). The prompt is the one the method scores."""
    text = template.lettered_text if method == "letters" else template.context_text
    by_lang: dict[str, dict[str, Item]] = {}
    for item in items:
        by_lang.setdefault(item.lang, {})[item.id] = item
    if english not in by_lang:
        raise ValueError(f"no {english!r} items: steering vectors need the parallel English prompts")
    ids = sorted(by_lang[english])
    states = last_token_states(model, [text(by_lang[english][i]) for i in ids], site=site, batch_rows=batch_rows)  # [L, N, D]
    column = {i: k for k, i in enumerate(ids)}
    vectors = {}
    for lang, group in by_lang.items():
        if lang == english:
            continue
        shared = [i for i in sorted(group) if i in column]
        if not shared:
            raise ValueError(f"no {lang!r} item has a parallel {english!r} item (same id)")
        own = last_token_states(model, [text(group[i]) for i in shared], site=site, batch_rows=batch_rows)
        vectors[lang] = states[:, [column[i] for i in shared]].mean(1) - own.mean(1)
    return vectors


def grid(layers: Sequence[int], alphas: Sequence[float]) -> np.ndarray:
    """[(layer, alpha)] points, layer major: [G, 2] float."""
    return np.array([(layer, alpha) for layer in layers for alpha in alphas], np.float64)


def steering_stack(vectors, points, positions=None, site: str = SITE) -> Points:
    """One `add` per grid point: vectors [R, L, D] (each row's language vector), points [G, 2]
    (layer, alpha), positions [R, K] bool or None (all). Layer l adds alpha * v_l. The vectors and
    positions are shared by all points (`sweep.Points`); a point carries its layer and alpha only,
    and makes its [R, 1, D] delta inside its program at the layer it steers."""
    per_layer = jnp.swapaxes(jnp.asarray(vectors), 0, 1)  # [L, R, D]
    return layer_alpha_points(iv.add(site, per_layer, 0.0, layers=0, positions=positions, per_layer=True), points)


def steer_scores(model, items: Sequence[Item], template: Template, vectors: dict[str, np.ndarray], points, *,
                 positions: str = "all", method: str = "letters", batch_rows: int = 8, chunk: int | None = None,
                 progress: bool = True) -> Scores:
    """Scores [G, N, O] of every item at every (layer, alpha) grid point."""
    if positions not in ("all", "last"):
        raise ValueError(f"positions must be 'all' or 'last', got {positions!r}")
    L, D = model.config.n_layers, model.config.d_model
    langs = sorted(vectors)
    table = np.concatenate([np.zeros((1, L, D), np.float32), np.stack([vectors[lang] for lang in langs])])
    row_of = np.array([langs.index(item.lang) + 1 if item.lang in vectors else 0 for item in items])  # 0: no vector
    points = np.asarray(points)
    bad = points[(points[:, 0] < 0) | (points[:, 0] >= L), 0]
    if bad.size:
        raise ValueError(f"layer(s) {sorted(set(bad.astype(int)))} out of range 0..{L - 1}")

    def build(batch, tail):
        rows = table[row_of[np.maximum(batch.item, 0)]]  # padding rows: some vector, unscored
        if positions == "last":  # only the last prompt token, among the re-run last `tail` columns
            T = batch.tokens.shape[1]
            at = jnp.arange(T - tail, T)[None, :] == jnp.asarray(batch.prompt_last)[:, None]
            return steering_stack(rows, points, at)
        return steering_stack(rows, points, jnp.asarray(batch.mask, bool))

    return sweep_scores(model, items, template, build, methods=(method,), tail_only=positions == "last",
                        batch_rows=batch_rows, chunk=chunk, progress=progress)


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar test of paired right/wrong outcomes: under no effect each of the
    gained + lost discordant items flips either way with probability 1/2."""
    from math import comb

    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)


def summarize(items: Sequence[Item], scores: Scores, clean: Scores, points, english: str = "en",
              n_boot: int = 1000, seed: int = 0) -> dict:
    """Per grid point and language: accuracy, consistency and transfer with English, and their
    change from the unsteered run; the change's paired test (items gained and lost, the exact
    McNemar p-value, a paired bootstrap 95% band of the change); and each language's best point
    by accuracy."""
    from jaxlens.methods.bootstrap import bootstrap_mean
    from jaxlens.methods.evaluation import predictions

    base = evaluate(items, clean, english)
    method = next(iter(base["methods"]))
    key = "letter" if method == "letter" else "ll"
    b = base["methods"][method]
    answers = np.array([item.answer for item in items])
    right_clean = predictions(getattr(clean, key)) == answers
    lang_of = np.array([item.lang for item in items])
    rows = []
    for g, (layer, alpha) in enumerate(np.asarray(points)):
        point = Scores(**{key: getattr(scores, key)[g]}, n_tokens=scores.n_tokens, n_chars=scores.n_chars)
        m = evaluate(items, point, english)["methods"][method]
        right = predictions(getattr(scores, key)[g]) == answers
        for lang in base["languages"]:
            if lang == english:
                continue
            mine = lang_of == lang
            gained, lost = int((right & ~right_clean)[mine].sum()), int((~right & right_clean)[mine].sum())
            _, lo, hi = bootstrap_mean(right[mine].astype(float) - right_clean[mine], n_boot=n_boot, seed=seed)
            entry = {"layer": int(layer), "alpha": float(alpha), "lang": lang, "accuracy": m["accuracy"][lang],
                     "accuracy_change": m["accuracy"][lang] - b["accuracy"][lang], "accuracy_change_lo": float(lo),
                     "accuracy_change_hi": float(hi), "gained": gained, "lost": lost, "p_mcnemar": mcnemar_p(gained, lost)}
            for metric in ("consistency", "positive", "negative_any"):
                if "vs_english" in m:
                    entry[metric] = m["vs_english"][metric][lang]
                    entry[metric + "_change"] = m["vs_english"][metric][lang] - b["vs_english"][metric][lang]
            rows.append(entry)
    best = {}
    for lang in base["languages"]:
        own = [r for r in rows if r["lang"] == lang]
        if own:
            top = max(own, key=lambda r: (r["accuracy"], -abs(r["alpha"])))
            best[lang] = {k: top[k] for k in ("layer", "alpha", "accuracy", "accuracy_change")}
    return {"method": method, "unsteered": b, "points": rows, "best": best}
