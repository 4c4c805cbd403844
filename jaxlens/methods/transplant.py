"""XTransplant (METHODS.md §4): the MLP output of source layer i at the source prompt's last token,
put in place of the target pass's MLP output at layer j at its last prompt token, for every (i, j).

The sweep is one program per batch, and it costs far less than N² passes. The transplant changes
one position, and attention is causal: every earlier position is the same as in the clean pass.
So the clean pass runs once over the earlier tokens (`forward_cached`), and each (i, j) pair
re-runs only the last K positions (the last prompt token and what is scored after it) on top of
that cache, as a `jax.vmap` over pairs, `lax.map`ped over chunks of pairs to bound memory
(`jaxlens.methods.sweep.run_stack`). Each pair's logits are reduced to scores inside the program, so
[pairs, rows, K, vocab] never exists.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.core import interventions as iv
from jaxlens.core.config import ModelConfig
from jaxlens.data.items import Item
from jaxlens.data.templates import Template
from jaxlens.methods.scoring import Scores
from jaxlens.methods.states import last_token_states
from jaxlens.methods.sweep import Points, auto_chunk, map_stack, prefix_cache, run_stack, sweep_scores

SITE = "mlp_out"  # the MLP's output before the residual add


def all_pairs(n_layers: int) -> np.ndarray:
    """[(i, j)] for every source layer i and target layer j: [N*N, 2] int32, i major."""
    i, j = np.meshgrid(np.arange(n_layers), np.arange(n_layers), indexing="ij")
    return np.stack([i.ravel(), j.ravel()], axis=-1).astype(np.int32)


def pair_stack(source, pairs, at, site: str = SITE) -> Points:
    """The transplant of every pair as one stack of P points: source [R, L, D] (each row's source
    states), pairs [P, 2] (i, j), at [R, K] bool (where each row's value lands). The sources and
    landing positions are shared (`sweep.Points`); a pair carries (i, j) and takes source layer i's
    [R, D] inside its program."""
    source = jnp.asarray(source)
    shared = iv.transplant(site, source[:, 0], 0, at)  # its value and layer: each pair's own
    return Points(_pair_point, (shared, source), jnp.asarray(pairs, jnp.int32))


def _pair_point(shared, pair):
    base, source = shared
    return base.replace(value=source[:, pair[0]][:, None, :], layers=pair[1][None])


def landing(prompt_last, T: int, tail: int):
    """[R, tail] bool: each row's last prompt token among the last `tail` columns."""
    return jnp.arange(T - tail, T)[None, :] == jnp.asarray(prompt_last)[:, None]


def pair_sweep(params, tokens, mask, source, prompt_last, pairs, score_args=None, *, config: ModelConfig, tail: int,
          score: Callable, chunk: int | None = None, site: str = SITE):
    """Scores of target rows under every transplant pair, as one program (`sweep.run_stack` with
    the KV-cache tail: only the last `tail` positions are re-run per pair).

    tokens, mask [R, T]: target rows, right-aligned; prompt_last [R] (>= T - tail); source
    [R, L, D]; pairs [P, 2]; score(logits [R, tail, V], score_args) -> arrays. Returns them [P, ...].
    """
    stack = pair_stack(source, pairs, landing(prompt_last, tokens.shape[1], tail), site)
    return run_stack(params, tokens, mask, stack, score_args, config=config, tail=tail, score=score, tail_only=True,
                     chunk=chunk)


def pair_sweep_loop(params, tokens, mask, source, prompt_last, pairs, score_args=None, *, config: ModelConfig, tail: int,
               score: Callable, site: str = SITE):
    """`pair_sweep` one pair at a time from Python, on the same shared prefix cache: the same passes,
    looped (the baseline that isolates what running them as one program gains)."""
    at = landing(prompt_last, tokens.shape[1], tail)
    cache = prefix_cache(params, tokens, mask, config=config, tail=tail)
    out = [run_stack(params, tokens, mask, pair_stack(source, pair[None], at, site), score_args, cache, config=config,
                     tail=tail, score=score, tail_only=True, chunk=1) for pair in np.asarray(pairs)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *out)


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "chunk", "site"))
def generate_sweep(params, tokens, mask, source, pairs, eos, *, config: ModelConfig, max_new_tokens: int,
                   chunk: int | None = None, site: str = SITE):
    """Greedy continuations of target rows under every transplant pair, as one program: (tokens
    [P, R, N], lengths [P, R]). tokens, mask [R, T]: prompts right-aligned (left padding), so the
    last column is each row's last prompt token; source [R, L, D]; eos [E] int32 (-1: none).

    The clean pass runs once over all but the last column; each pair re-runs the last prompt token
    with its transplant on that cache (the prefill) and decodes from there (`generate.decode`)."""
    from jaxlens.methods.generate import decode
    from jaxlens.methods.sweep import activation_itemsize, point_bytes

    cache = prefix_cache(params, tokens, mask, config=config, tail=1)
    stack = pair_stack(source, pairs, jnp.ones((tokens.shape[0], 1), bool), site)

    def one(point):
        return decode(params, tokens[:, -1:], mask[:, -1:], point, eos, cache, config=config, max_new_tokens=max_new_tokens)

    # Each pair reads the shared prefix in place and carries only its own tail (its last prompt
    # token and the new tokens' keys/values): the chunk is sized to that.
    R, S = tokens.shape[0], tokens.shape[1] + max_new_tokens
    live = point_bytes(config, R, 1, S, cache=1 + max_new_tokens, stack=stack, itemsize=activation_itemsize(params, config))
    return map_stack(one, stack, chunk or auto_chunk(R, 1, config.vocab_size, True, live=live))


# ---- items: sources from the parallel English prompts, scores per pair, the paper's analyses ----


@dataclasses.dataclass
class Transplants:
    """A transplant sweep over items: the target items (lang != source), the pairs [P, 2] (source
    layer i, target layer j), and per pair the scores (`transplant_scores`: Scores [P, N, O]) or
    the greedy continuations (`transplant_generations`: texts[p][n])."""

    targets: list[Item]
    pairs: np.ndarray
    scores: Scores | None = None
    texts: list[list[str]] | None = None


def source_table(model, items: Sequence[Item], text: Callable[[Item], str], *, source_lang: str = "en",
                 batch_rows: int = 8, site: str = SITE):
    """(targets, table [S, L, D], row_of [N]): the items not in `source_lang`, and the site's value at
    the last prompt token of their parallel source-language items (same id): targets[n]'s source
    states are table[row_of[n]]."""
    sources = {item.id: item for item in items if item.lang == source_lang}
    targets = [item for item in items if item.lang != source_lang]
    missing = sorted({t.id for t in targets if t.id not in sources})
    if missing:
        raise ValueError(f"{len(missing)} target item(s) have no parallel {source_lang!r} item (same id), e.g. {missing[:3]}")
    if not targets:
        raise ValueError(f"no target items: every item is in the source language {source_lang!r}")
    order = sorted(sources)
    states = last_token_states(model, [text(sources[i]) for i in order], site=site, batch_rows=batch_rows)  # [L, S, D]
    table = np.swapaxes(states, 0, 1)  # [S, L, D]: rows first, since each batch gathers its rows' sources
    return targets, table, np.array([order.index(t.id) for t in targets])


def prompt_text(template: Template, method: str) -> Callable[[Item], str]:
    return template.lettered_text if method == "letters" else template.context_text


def transplant_scores(model, items: Sequence[Item], template: Template, pairs=None, *, source_lang: str = "en",
                      method: str = "letters", batch_rows: int = 8, chunk: int | None = None, progress: bool = True,
                      site: str = SITE):
    """Transplants with scores [P, N, O]: every target item (lang != source_lang) scored under each
    pair, the source being its parallel source-language item (same id) at its last prompt token."""
    targets, table, row_of = source_table(model, items, prompt_text(template, method), source_lang=source_lang,
                                          batch_rows=batch_rows, site=site)
    pairs = all_pairs(model.config.n_layers) if pairs is None else np.asarray(pairs, np.int32)

    def build(batch, tail):
        source = jnp.asarray(table[row_of[np.maximum(batch.item, 0)]])  # padding rows: any source, unscored
        return pair_stack(source, pairs, landing(batch.prompt_last, batch.tokens.shape[1], tail), site)

    scores = sweep_scores(model, targets, template, build, methods=(method,), tail_only=True, batch_rows=batch_rows,
                          chunk=chunk, progress=progress)
    return Transplants(targets, pairs, scores=scores)


def transplant_generations(model, items: Sequence[Item], template: Template, pairs=None, *, source_lang: str = "en",
                           method: str = "letters", max_new_tokens: int = 8, batch_rows: int = 8,
                           chunk: int | None = None, progress: bool = True, site: str = SITE):
    """Transplants with texts: texts[p][n] is the greedy continuation of target n's prompt with the
    parallel source item's MLP output of layer i (at its last prompt token) in place of layer j's at
    the target's last prompt token, in the prefill only (METHODS.md §4); every pair (default: all
    N x N) in one program per batch (`generate_sweep`)."""
    from jaxlens.methods.generate import check_lengths, eos_ids
    from jaxlens.runtime.batching import text_batches
    from jaxlens.runtime.loop import stream
    from jaxlens.runtime.placement import batch_rows as rows_for, put_replicated

    text = prompt_text(template, method)
    targets, table, row_of = source_table(model, items, text, source_lang=source_lang, batch_rows=batch_rows, site=site)
    pairs = all_pairs(model.config.n_layers) if pairs is None else np.asarray(pairs, np.int32).reshape(-1, 2)
    eos = put_replicated(model.mesh, np.asarray(eos_ids(model.tokenizer) or [-1], np.int32))
    placed_pairs = put_replicated(model.mesh, pairs)
    texts = [[""] * len(targets) for _ in pairs]
    batches = text_batches(model, [text(t) for t in targets], rows_for(model.mesh, batch_rows), room=max_new_tokens)
    for b in batches:
        check_lengths(model.config, b.tokens.shape[1], max_new_tokens)

    def sources(b):
        source = np.zeros((len(b.index), *table.shape[1:]), table.dtype)
        source[: b.n_real] = table[row_of[b.index[: b.n_real]]]
        return source

    step = lambda b, tokens, mask, source: generate_sweep(  # noqa: E731
        model.params, tokens, mask, source, placed_pairs, eos, config=model.config, max_new_tokens=max_new_tokens,
        chunk=chunk, site=site)
    for b, (new, lengths) in stream(batches, step, mesh=model.mesh, inputs=lambda b: (b.tokens, b.mask, sources(b)),
                                    desc="generate (pairs)", progress=progress):
        for p in range(len(pairs)):
            for k, r in enumerate(b.index[: b.n_real]):
                texts[p][r] = model.tokenizer.decode(new[p, k, : lengths[p, k]], skip_special_tokens=True)
    return Transplants(targets, pairs, texts=texts)


def generated_correct(items: Sequence[Item], texts: Sequence[str], method: str = "letters") -> np.ndarray:
    """[N] bool: whether each generation answers its item. letters: its first non-space character is
    the answer's letter; options: of the options, it begins most like the answer's (longest common
    prefix, ignoring case and surrounding space, and longer than that of every other option)."""
    from jaxlens.data.items import LETTERS

    def common(a: str, b: str) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    out = []
    for item, text in zip(items, texts):
        said = text.strip().casefold()
        if method == "letters":
            out.append(said[:1] == LETTERS[item.answer].casefold())
        else:
            shared = [common(said, o.strip().casefold()) for o in item.options]
            best = shared[item.answer]
            out.append(best > 0 and all(best > n for k, n in enumerate(shared) if k != item.answer))
    return np.array(out, bool)


def best_pair(accuracy, pairs, target_layer: int | None = None) -> tuple[int, int]:
    """The pair with the highest accuracy [P] (METHODS.md §4 offline strategy): optionally only pairs
    into `target_layer`; ties go to the smallest target layer j, then the largest source layer i."""
    accuracy, pairs = np.asarray(accuracy), np.asarray(pairs)
    allowed = np.ones(len(pairs), bool) if target_layer is None else pairs[:, 1] == target_layer
    if not allowed.any():
        raise ValueError(f"no pair has target layer {target_layer}")
    order = np.lexsort((-pairs[:, 0], pairs[:, 1], -np.where(allowed, accuracy, -np.inf)))
    i, j = pairs[order[0]]
    return int(i), int(j)


def analyse(targets: Sequence[Item], scores: np.ndarray, pairs, n_layers: int, clean: np.ndarray | None = None,
            pilot: int = 50, test: int | None = None, null_permutations: int = 200, seed: int = 0) -> dict:
    """The paper's readings of a transplant sweep, per target language.

    scores [P, N, O] (one method), clean [N, O] (no transplant). Per language: accuracy of every
    pair as an [i][j] grid (source layer i, target layer j); the upper bound (an item counts if any
    pair solves it), beside it its value under a null model (`null_upper_bound`), and the unions
    per source and per target layer; the offline strategy: the best pair on the pilot split (the
    first `pilot` items; over all pairs, and into target layer 0) applied to the test split (the
    next `test` items, default all the others). See `check_splits`; pilot=0: no offline strategy.
    """
    from jaxlens.methods.evaluation import predictions

    answers = np.array([t.answer for t in targets])
    return analyse_correct(targets, predictions(scores) == answers, pairs, n_layers,
                           None if clean is None else predictions(clean) == answers, pilot, test, null_permutations, seed)


def check_splits(counts: dict, pilot: int, test: int | None = None) -> None:
    """Raise if a language's items ({lang: n}) cannot hold a pilot split of `pilot` items and a
    disjoint test split of `test` (None: at least one) items. The paper picks the pair on a pilot
    and applies it to unseen items, so neither split is shrunk to fit."""
    if pilot < 0 or (test is not None and test < 1):
        raise ValueError(f"pilot must be >= 0 and test >= 1 items per language; got pilot={pilot}, test={test}")
    if not pilot:
        return
    need = pilot + (test or 1)
    short = {lang: n for lang, n in counts.items() if n < need}
    if short:
        asked = f"{test} test" if test else "at least 1 test"
        raise ValueError(f"a pilot of {pilot} items plus {asked} item(s) needs {need} items per language; "
                         f"{', '.join(f'{lang} has {n}' for lang, n in short.items())}: give more items per language "
                         f"or a smaller pilot/test split (pilot 0: no offline pair)")


def null_upper_bound(correct: np.ndarray, permutations: int = 200, seed: int = 0) -> dict:
    """The upper bound ("some pair solves the item") under a null model: each pair keeps its
    accuracy but its right/wrong outcomes are permuted across the items, independently per pair,
    so which items a pair solves is chance. correct [P, n] -> {"mean", "p95", "permutations", "seed"}.
    On two-option tasks with many pairs the bound is near 1 by chance alone."""
    c = np.asarray(correct, bool)
    if permutations < 1:
        raise ValueError(f"null permutations must be >= 1, got {permutations}")
    rng = np.random.default_rng(seed)
    values = np.array([rng.permuted(c, axis=1).any(0).mean() for _ in range(permutations)])
    return {"mean": float(values.mean()), "p95": float(np.quantile(values, 0.95)), "permutations": int(permutations),
            "seed": int(seed)}


def analyse_correct(targets: Sequence[Item], correct: np.ndarray, pairs, n_layers: int,
                    clean_correct: np.ndarray | None = None, pilot: int = 50, test: int | None = None,
                    null_permutations: int = 200, seed: int = 0) -> dict:
    """`analyse` from which items each pair got right: correct [P, N] bool, clean_correct [N] bool
    (scored, or read off generations with `generated_correct`)."""
    pairs, correct = np.asarray(pairs), np.asarray(correct, bool)
    langs = list(dict.fromkeys(t.lang for t in targets))
    check_splits({lang: sum(t.lang == lang for t in targets) for lang in langs}, pilot, test)
    out = {}
    for lang in langs:
        idx = np.array([n for n, t in enumerate(targets) if t.lang == lang])
        c = correct[:, idx]  # [P, n]
        grid = np.full((n_layers, n_layers), np.nan)
        grid[pairs[:, 0], pairs[:, 1]] = c.mean(1)
        by = lambda axis: [float(c[pairs[:, axis] == layer].any(0).mean()) if (pairs[:, axis] == layer).any() else None  # noqa: E731
                           for layer in range(n_layers)]
        entry = {
            "n_items": int(len(idx)),
            "clean": None if clean_correct is None else float(clean_correct[idx].mean()),
            "pair_accuracy": [[None if np.isnan(v) else v for v in row] for row in grid.tolist()],  # None: not run
            "upper_bound": float(c.any(0).mean()),
            "upper_bound_null": null_upper_bound(c, null_permutations, seed),
            "per_source_union": by(0),
            "per_target_union": by(1),
        }
        pilot_idx, test_idx = np.arange(pilot), np.arange(pilot, len(idx) if test is None else pilot + test)
        if pilot:
            strategies = {}
            for name, target_layer in (("best_pair", None), ("best_pair_into_layer_0", 0)):
                i, j = best_pair(c[:, pilot_idx].mean(1), pairs, target_layer)
                p = int(np.flatnonzero((pairs[:, 0] == i) & (pairs[:, 1] == j))[0])
                strategies[name] = {"pair": [i, j], "pilot_accuracy": float(c[p, pilot_idx].mean()),
                                    "test_accuracy": float(c[p, test_idx].mean())}
            entry["offline"] = {"pilot_items": int(len(pilot_idx)), "test_items": int(len(test_idx)),
                                "splits": {"pilot": [targets[idx[n]].id for n in pilot_idx],
                                           "test": [targets[idx[n]].id for n in test_idx]},
                                "clean_test_accuracy": None if clean_correct is None else float(clean_correct[idx][test_idx].mean()),
                                **strategies}
        out[lang] = entry
    return out
