"""Scoring multiple-choice items with a model: batched, on the mesh, logits only where read.

    items = load_xcopa(["et", "zh"], english=True)              # jaxlens.data.items
    scores = score_items(items, model.tokenizer, template=XCOPA_TEMPLATE, model=model)
    result = evaluation.evaluate(items, scores)                 # accuracy, consistency, transfer

Two scorings of every item (METHODS.md §1, §2):
  - option log-likelihood: the summed log-probability of each option's tokens given the context
    (`ll`), and that sum per option token (`ll_token`) and per option character (`ll_char`);
  - letter probability: the next-token distribution after a prompt that lists the options as
    A., B., ..., restricted to the option letters (`letter`).

Scoring reuses any forward: `forward_fn(tokens [R, T], mask [R, T]) -> logits [..., R, K, V]`
for the LAST K positions (K <= T; rows are right-aligned, so every scored position is near the
end); a forward_fn with a `batch` parameter also receives the `Batch` (row -> item, option,
prompt_last). Steering or transplant pass their own (a modified forward, or a vmapped sweep with
leading axes: the scores then carry the same leading axes; `Scores.at(...)` picks one point).
"""

from __future__ import annotations

import dataclasses
import inspect
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.data.items import LETTERS, Item
from jaxlens.data.templates import JSONL_TEMPLATE, Template
from jaxlens.runtime.batching import Batch, Row, make_batches

# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# Tokenized rows and fixed-shape batches


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def option_rows(items: Sequence[Item], tokenizer, template: Template) -> list[Row]:
    """One row per (item, option). Context (with the tokenizer's BOS) and option are tokenized
    separately and concatenated, so every option is scored on the same context ids whatever
    the tokenizer would merge across the boundary."""
    rows = []
    for i, item in enumerate(items):
        context = tuple(_encode(tokenizer, template.context_text(item), True))
        for k, option in enumerate(item.options):
            continuation = tuple(_encode(tokenizer, template.option_text(option), False))
            if not continuation:
                raise ValueError(f"option {k} of item {item.id} ({item.lang}) encodes to no tokens: {option!r}")
            rows.append(Row(context, continuation, i, k))
    return rows


def letter_rows(items: Sequence[Item], tokenizer, template: Template) -> list[Row]:
    """One row per item: the lettered prompt; the answer is read at its last position."""
    return [Row(tuple(_encode(tokenizer, template.lettered_text(item), True)), (), i, -1) for i, item in enumerate(items)]


def letter_token_ids(tokenizer, template: Template, n_letters: int) -> list[list[int]]:
    """The token ids that spell each letter as the next token after the lettered prompt.

    Both spellings count: "A" and " A" (SentencePiece "▁A", byte-level "ĠA"). Each is tokenized
    twice: after the prompt's own ending (e.g. "Answer:"), kept when it adds exactly one token
    (the id the model would emit there), and alone, kept when it is one token. A letter's ids are
    the union; its probability is the sum over them. Letters must not share ids.
    """
    anchor = template.lettered.rsplit("}", 1)[-1] or ":"
    base = _encode(tokenizer, anchor, False)
    ids = []
    for letter in LETTERS[:n_letters]:
        found = []
        for variant in (letter, " " + letter):
            after = _encode(tokenizer, anchor + variant, False)
            alone = _encode(tokenizer, variant, False)
            if after[: len(base)] == base and len(after) == len(base) + 1:
                found.append(after[-1])
            if len(alone) == 1:
                found.append(alone[0])
        found = sorted(set(found))
        if not found:
            raise ValueError(f"the tokenizer has no single token for letter {letter!r} (with or without a leading space)")
        ids.append(found)
    flat = [t for group in ids for t in group]
    if len(flat) != len(set(flat)):
        raise ValueError(f"letter token ids overlap between letters: {ids}")
    return ids


# ---------------------------------------------------------------------------------------------
# Scoring kernels (jitted; leading axes of `logits` are carried through, e.g. a vmapped sweep)


@jax.jit
def continuation_logprob(logits, tokens, target):
    """Summed log-probability of the target tokens of each row.

    logits [..., R, K, V] for the last K positions of the rows; tokens, target [R, T] (T >= K).
    Position t predicts token t+1, so the last K logits score the last K-1 tokens; every target
    token must lie among them. Returns [..., R] float32.
    """
    K = logits.shape[-2]
    predicting = logits[..., :-1, :].astype(jnp.float32)  # [..., R, K-1, V]
    scored = slice(tokens.shape[-1] - (K - 1), None)  # the last K-1 token positions
    nxt = jnp.broadcast_to(tokens[:, scored][..., None], predicting.shape[:-1] + (1,))  # [..., R, K-1, 1]
    picked = jnp.take_along_axis(predicting, nxt, axis=-1)[..., 0] - jax.nn.logsumexp(predicting, axis=-1)
    return jnp.where(target[:, scored], picked, 0.0).sum(-1)  # [..., R]


@jax.jit
def letter_logprobs(logits_last, letter_ids, n_options):
    """Log-probabilities of the option letters at the answer position.

    logits_last [..., R, V]; letter_ids [n_letters, n_variants] (-1 pads); n_options [R].
    A letter's probability is the sum over its token ids. Returns (restricted [..., R, n_letters]:
    log-softmax over the row's first n_options letters only, -inf beyond; mass [..., R]: the
    probability the full softmax puts on those letters together).
    """
    logp = jax.nn.log_softmax(logits_last.astype(jnp.float32), axis=-1)  # [..., R, V]
    per_variant = jnp.where(letter_ids >= 0, logp[..., jnp.maximum(letter_ids, 0)], -jnp.inf)  # [..., R, n, m]
    per_letter = jax.nn.logsumexp(per_variant, axis=-1)  # [..., R, n]
    allowed = jnp.arange(letter_ids.shape[0]) < n_options[:, None]  # [R, n]
    per_letter = jnp.where(allowed, per_letter, -jnp.inf)
    mass = jax.nn.logsumexp(per_letter, axis=-1)  # [..., R]
    return per_letter - mass[..., None], jnp.exp(mass)


# ---------------------------------------------------------------------------------------------
# The model's forward, logits only where scoring reads them


def model_forward(model, *, tail: int | None = None, interventions: Any = None) -> Callable:
    """`forward_fn(tokens, mask, batch=None) -> logits [R, K, V]` for a `jaxlens.Model`.

    Only the last K positions are unembedded: K = `tail` if given, else the batch's own need
    (`batch.tail`) when the scorer passes the batch, else all T. The full [R, T, V] logits are
    then never formed (with Gemma's 262k vocabulary the unembedding is most of the cost).
    `interventions` is passed through to `jaxlens.core.forward.forward` when given. The batch goes over
    the mesh's `data` axis.
    """
    extra = {} if interventions is None else {"interventions": interventions}

    def forward_fn(tokens, mask, batch: Batch | None = None):
        keep = tail if tail is not None else (batch.tail if batch is not None else None)
        return tail_logits(model.params, tokens, mask, extra, config=model.config, tail=keep)

    return forward_fn


@partial(jax.jit, static_argnames=("config", "tail"))
def tail_logits(params, tokens, mask, extra, config, tail):
    from jaxlens.core.forward import forward, unembed

    logits, sites = forward(params, tokens, mask, config=config, capture=("final_norm",), **extra)
    if tail is None:
        return logits
    # [R, tail, V]; the full logits above are unused, so XLA drops them.
    return unembed(params, sites["final_norm"][:, -tail:], config)


# ---------------------------------------------------------------------------------------------
# Scoring items

METHODS = ("ll", "ll_token", "ll_char", "letter")
METHOD_NAMES = {
    "ll": "option log-likelihood (sum)",
    "ll_token": "option log-likelihood per token",
    "ll_char": "option log-likelihood per character",
    "letter": "letter probability",
}


@dataclasses.dataclass
class Scores:
    """Per-item option scores, [..., N, O] (O = most options of any item; missing options NaN).

    Higher is better for every method; `by_method()` gives {method: [..., N, O]}.
    """

    ll: np.ndarray | None = None  # summed log-prob of each option's tokens
    n_tokens: np.ndarray | None = None  # [N, O] option token counts
    n_chars: np.ndarray | None = None  # [N, O] option character counts
    letter: np.ndarray | None = None  # log-prob of each letter, restricted to the item's letters
    letter_mass: np.ndarray | None = None  # [..., N] full-softmax probability on those letters

    def at(self, *index) -> "Scores":
        """One point of a sweep: index the leading axes of the score arrays (e.g. `scores.at(layer, alpha)`)."""
        pick = lambda a, full: None if a is None else (a[index] if a.ndim > full else a)  # noqa: E731
        return Scores(pick(self.ll, 2), self.n_tokens, self.n_chars, pick(self.letter, 2), pick(self.letter_mass, 1))

    def by_method(self) -> dict[str, np.ndarray]:
        out = {}
        if self.ll is not None:
            out.update(ll=self.ll, ll_token=self.ll / self.n_tokens, ll_char=self.ll / self.n_chars)
        if self.letter is not None:
            out["letter"] = self.letter
        return out


def score_items(items: Sequence[Item], tokenizer, forward_fn: Callable | None = None, template: Template = JSONL_TEMPLATE,
                *, model=None, methods: Iterable[str] = ("options", "letters"), batch_rows: int = 8,
                progress: bool = True) -> Scores:
    """Score every item both ways (methods "options" and/or "letters").

    forward_fn(tokens [R, T], mask [R, T]) -> logits [..., R, K, V] for the last K positions
    (K >= batch.tail). A forward_fn with a `batch` parameter also gets the `Batch` (row -> item,
    option, prompt_last: what a transplant needs). Default: `model_forward(model)`. Give `model`
    with a custom forward_fn too, so padding uses its pad id and lengths are checked against it.
    """
    methods = set(methods)
    if not methods <= {"options", "letters"}:
        raise ValueError(f"unknown scoring method(s) {sorted(methods - {'options', 'letters'})}; use options, letters")
    if forward_fn is None and model is None:
        raise ValueError("give forward_fn or model")
    if not items:
        raise ValueError("no items to score")
    from jaxlens.core.sharding import default_mesh
    from jaxlens.runtime.placement import batch_rows as rows_for

    n_opts = max(len(item.options) for item in items)
    config = getattr(model, "config", None)
    pad_id = getattr(config, "pad_token_id", None) or 0
    max_length = getattr(config, "max_positions", None)
    mesh = getattr(model, "mesh", None) or default_mesh()
    batch_rows = rows_for(mesh, batch_rows)
    scores = Scores()
    if "options" in methods:
        rows = option_rows(items, tokenizer, template)
        fn = forward_fn or model_forward(model)
        values = _run(make_batches(rows, batch_rows, pad_id, max_length), fn, _score_options, "option log-likelihood", progress, mesh)
        set_option_scores(scores, values, items)
    if "letters" in methods:
        table = letter_table(tokenizer, template, n_opts)
        fn = forward_fn or model_forward(model)
        n_options = np.array([len(item.options) for item in items])
        values = _run(make_batches(letter_rows(items, tokenizer, template), batch_rows, pad_id, max_length), fn,
                      partial(_score_letters, table=table, n_options=n_options), "letter probability", progress, mesh)
        set_letter_scores(scores, values, items)
    return scores


def letter_table(tokenizer, template: Template, n_letters: int) -> np.ndarray:
    """`letter_token_ids` as an array [n_letters, most spellings] int32, -1 padded (what
    `letter_logprobs` takes)."""
    ids = letter_token_ids(tokenizer, template, n_letters)
    table = np.full((n_letters, max(map(len, ids))), -1, np.int32)
    for k, group in enumerate(ids):
        table[k, : len(group)] = group
    return table


def set_option_scores(scores: Scores, values, items: Sequence[Item]) -> None:
    """Fill ll / n_tokens / n_chars from per-batch option-row values [(batch, [..., R])]."""
    N, n_opts = len(items), max(len(item.options) for item in items)
    scores.ll = scatter_rows(values, N, n_opts)
    scores.n_tokens = scatter_rows([(b, np.asarray(b.target.sum(-1), np.float64)) for b, _ in values], N, n_opts)
    scores.n_chars = np.full((N, n_opts), np.nan)
    for i, item in enumerate(items):
        scores.n_chars[i, : len(item.options)] = [len(o) for o in item.options]


def set_letter_scores(scores: Scores, values, items: Sequence[Item]) -> None:
    """Fill letter / letter_mass from per-batch letter-row values [(batch, ([..., R, n], [..., R]))]."""
    N, n_opts = len(items), max(len(item.options) for item in items)
    letter = scatter_rows([(b, v[0]) for b, v in values], N, n_opts, per_option=True)
    scores.letter = np.where(np.isfinite(letter), letter, np.nan)  # letters past an item's options
    scores.letter_mass = scatter_rows([(b, v[1]) for b, v in values], N, None)


def _score_options(batch: Batch, logits):
    K = min(logits.shape[-2], batch.tokens.shape[1])
    if batch.target[:, : batch.tokens.shape[1] - (K - 1)].any():
        raise ValueError(f"forward_fn returned logits for the last {logits.shape[-2]} positions; "
                         f"scoring needs the last {int(batch.target.sum(-1).max()) + 1}")
    return continuation_logprob(logits[..., -K:, :], batch.tokens, batch.target)


def _score_letters(batch: Batch, logits, table, n_options):
    rows_n = np.where(batch.item >= 0, n_options[np.maximum(batch.item, 0)], 1)
    return letter_logprobs(logits[..., -1, :], table, rows_n)


def _run(batches: list[Batch], forward_fn, score_fn, label: str, progress: bool, mesh):
    """forward_fn then score_fn on each batch (placed over the mesh, read back one batch behind)."""
    from jaxlens.runtime.loop import run

    try:
        wants_batch = "batch" in inspect.signature(forward_fn).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        wants_batch = False

    def step(b, tokens, mask):
        return score_fn(b, forward_fn(tokens, mask, batch=b) if wants_batch else forward_fn(tokens, mask))

    return [(b, jax.tree.map(lambda x: np.asarray(x, np.float64), out))
            for b, out in run(batches, step, mesh=mesh, inputs=lambda b: (b.tokens, b.mask), desc=label, progress=progress)]


def scatter_rows(values, N: int, n_opts: int | None, per_option: bool = False):
    """Row values [..., R] (or [..., R, n_letters] when per_option) back to [..., N, O] (or [..., N])."""
    lead = np.shape(values[0][1])[: -2 if per_option else -1]
    out = np.full(lead + ((N,) if n_opts is None else (N, n_opts)), np.nan)
    for b, v in values:
        real = b.item >= 0
        v = np.asarray(v)
        if per_option:
            out[..., b.item[real], :] = v[..., real, :]
        elif n_opts is None:
            out[..., b.item[real]] = v[..., real]
        else:
            out[..., b.item[real], b.option[real]] = v[..., real]
    return out
