"""In which language the answer forms (Lim et al. 2505.13141, METHODS.md §1: latent answer probability).

    logp, n_tok = phrase_logprob(model, prefixes, phrases)      # [N, L] log p^l(phrase | prefix), [N]
    reading = answer_language(model, items, english_items, XCOPA_TEMPLATE)

`phrase_logprob` teacher-forces each phrase after its prefix and reads, at every layer, the
lens log-probability of each phrase token from the state that predicts it (the fused kernel
`jaxlens.kernels.lens.phrase_logprobs`: no [L, B, T, V] array exists). At the last layer it is
the model's own log-likelihood of the phrase. Letters are phrases too: the lettered prompt as
prefix, " A" as phrase.

`answer_language` asks, for each query-language item with a parallel English item: at each layer,
how probable is the correct option's text in the query language and in English (the parallel
item's option), and the wrong option's in both, all after the QUERY-language prompt. Phrases of
the two languages have different token counts, so the comparison is per token: the geometric
mean probability per token, exp(log p^l(phrase) / n_tokens). English "leads" at a layer when the
paired per-item difference P(en) - P(query) has a bootstrap band above 0; the query language
"takes over" at the first layer from which that difference stays below 0 (mean) to the last
layer [inferred: the paper names the crossing, not a criterion].
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxlens.methods.bootstrap import bootstrap_mean
from jaxlens.data.items import Item
from jaxlens.data.templates import Template


def phrase_logprob(model, prefixes: Sequence[str], phrases: Sequence[str], *, batch_rows: int = 8, chunk: int = 4096,
                   progress: bool = True, desc: str = "phrases") -> tuple[np.ndarray, np.ndarray]:
    """Per (prefix, phrase) pair: log p^l(phrase | prefix) at every layer [N, L] float64, and the
    phrase's token count [N]. The prefix is encoded with the tokenizer's special tokens (BOS), the
    phrase alone without them, and the two are concatenated (as option scoring does), so every
    phrase is read on the same prefix ids whatever the tokenizer would merge across the boundary."""
    from jaxlens.kernels.lens import phrase_logprobs
    from jaxlens.runtime.batching import Row, encode_texts, make_batches
    from jaxlens.runtime.loop import stream
    from jaxlens.runtime.placement import batch_rows as rows_for

    if len(prefixes) != len(phrases) or not prefixes:
        raise ValueError(f"need one phrase per prefix and at least one pair; got {len(prefixes)} prefixes, {len(phrases)} phrases")
    config = model.config
    context = encode_texts(model.tokenizer, prefixes, config.max_positions)
    tail = encode_texts(model.tokenizer, phrases, config.max_positions, add_special_tokens=False)
    rows = [Row(tuple(c), tuple(t), i, -1) for i, (c, t) in enumerate(zip(context, tail))]
    batches = make_batches(rows, rows_for(model.mesh, batch_rows), config.pad_token_id or 0, config.max_positions)

    def step(b, tokens, mask, target):
        # Read only the last `width` positions; rounded up to 4 so a run compiles few programs.
        T = b.tokens.shape[1]
        width = min(-(-int(b.target.sum(-1).max()) // 4) * 4, T - 1)
        return phrase_logprobs(model.params, tokens, mask, target, config=config, width=width, chunk=chunk, mesh=model.mesh)

    out = np.full((len(rows), config.n_layers), np.nan)
    for b, lp in stream(batches, step, mesh=model.mesh, inputs=lambda b: (b.tokens, b.mask, b.target), desc=desc,
                        progress=progress):
        real = b.item >= 0
        out[b.item[real]] = np.asarray(lp, np.float64).T[real]  # [L, R] -> rows
    return out, np.array([len(t) for t in tail])


# ---------------------------------------------------------------------------------------------
# Which language the answer forms in

KINDS = ("correct_query", "correct_en", "wrong_query", "wrong_en")


@dataclasses.dataclass
class AnswerReading:
    """One query language read against English. Per item and layer, float64:
    logp {kind: [N, L]} the summed log-probability of the phrase after the query prompt, with
    n_tokens {kind: [N]}; for items with more than two options "wrong" is the wrong option with
    the highest log-probability per token at that layer (the strongest competitor), so its
    n_tokens is [N, L]."""

    lang: str
    items: list[Item]
    logp: dict[str, np.ndarray]
    n_tokens: dict[str, np.ndarray]

    def per_token(self, kind: str) -> np.ndarray:
        """[N, L] geometric mean probability per token of the phrase: exp(log p / n_tokens)."""
        n = self.n_tokens[kind]
        return np.exp(self.logp[kind] / (n if n.ndim == 2 else n[:, None]))


def answer_language(model, items: Sequence[Item], english: Sequence[Item], template: Template, *, batch_rows: int = 8,
                    chunk: int = 4096, progress: bool = True) -> AnswerReading:
    """items: one query language's items; english: their parallel English items (same ids and
    answers). Items without an English partner are dropped; a different answer is refused."""
    en_by_id = {it.id: it for it in english}
    pairs = [(it, en_by_id[it.id]) for it in items if it.id in en_by_id]
    if not pairs:
        raise ValueError(f"no {items[0].lang if items else ''!r} item has a parallel English item (same id)")
    for it, en in pairs:
        if it.answer != en.answer or len(it.options) != len(en.options):
            raise ValueError(f"item {it.id}: {it.lang} and English differ in their answer or number of options")
    lang = pairs[0][0].lang
    prefixes, phrases, where = [], [], []  # where: (item, side, option)
    for n, (it, en) in enumerate(pairs):
        context = template.context_text(it)
        for side, src in (("query", it), ("en", en)):
            for k, option in enumerate(src.options):
                prefixes.append(context)
                phrases.append(template.option_text(option))
                where.append((n, side, k))
    lp, n_tok = phrase_logprob(model, prefixes, phrases, batch_rows=batch_rows, chunk=chunk, progress=progress, desc=lang)
    N, L, K = len(pairs), model.config.n_layers, max(len(it.options) for it, _ in pairs)
    grid = {side: np.full((N, L, K), np.nan) for side in ("query", "en")}
    count = {side: np.ones((N, K)) for side in ("query", "en")}
    for (n, side, k), row, c in zip(where, lp, n_tok):
        grid[side][n, :, k], count[side][n, k] = row, c
    answer = np.array([it.answer for it, _ in pairs])
    logp, n_tokens = {}, {}
    for side in ("query", "en"):
        logp[f"correct_{side}"] = grid[side][np.arange(N), :, answer]
        n_tokens[f"correct_{side}"] = count[side][np.arange(N), answer]
        per_tok = grid[side] / count[side][:, None, :]
        per_tok[np.arange(N), :, answer] = -np.inf
        per_tok = np.where(np.isnan(per_tok), -np.inf, per_tok)  # items with fewer options
        best = per_tok.argmax(-1)  # [N, L]
        logp[f"wrong_{side}"] = np.take_along_axis(grid[side], best[..., None], -1)[..., 0]
        n_tokens[f"wrong_{side}"] = np.take_along_axis(count[side][:, None, :].repeat(L, 1), best[..., None], -1)[..., 0]
    return AnswerReading(lang, [it for it, _ in pairs], logp, n_tokens)


def summarize(reading: AnswerReading, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per layer: mean and 95% band of each kind's per-token probability, the paired difference
    P(correct, en) - P(correct, query), latent accuracy (correct above wrong) in both languages;
    and the layers where English leads (band of the difference above 0) and where the query
    language takes over (the difference below 0 from there to the last layer)."""
    bands = {kind: bootstrap_mean(reading.per_token(kind), n_boot=n_boot, seed=seed) for kind in KINDS}
    diff = bootstrap_mean(reading.per_token("correct_en") - reading.per_token("correct_query"), n_boot=n_boot, seed=seed)
    latent_acc = {side: (reading.per_token(f"correct_{side}") > reading.per_token(f"wrong_{side}")).mean(0)
                  for side in ("query", "en")}
    en_leads = [int(layer) for layer in np.flatnonzero(diff[1] > 0)]
    below = diff[0] < 0
    takeover = None
    if below[-1]:
        start = len(below) - 1
        while start > 0 and below[start - 1]:
            start -= 1
        takeover = start
    return {"lang": reading.lang, "n": len(reading.items), "bands": bands, "diff_en_minus_query": diff,
            "latent_accuracy": latent_acc, "en_leads_layers": en_leads,
            "first_en_lead": en_leads[0] if en_leads else None, "query_takes_over": takeover}
