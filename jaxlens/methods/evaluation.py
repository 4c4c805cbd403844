"""Multilingual multiple-choice evaluation: items, prompt templates, batched scoring, metrics.

    items = load_xcopa(["et", "zh"], english=True)              # or load_jsonl("mmlu.jsonl")
    scores = score_items(items, model.tokenizer, template=XCOPA_TEMPLATE, model=model)
    result = evaluate(items, scores)                            # accuracy, consistency, transfer

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
import json
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.data.xcopa import XCOPA_LANGS, xcopa
from jaxlens.runtime.batching import Batch, Row, make_batches

# ---------------------------------------------------------------------------------------------
# Items


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


# ---------------------------------------------------------------------------------------------
# Prompt templates: every prompt text jaxlens builds for evaluation comes from here.

LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass(frozen=True)
class Template:
    """How an item becomes text (str.format patterns).

    stem      the question as shown: {prompt}, {cue} (the cue of the item's kind, from `cues`)
    context   option log-likelihood: the text each option continues ({stem})
    option    an option as a continuation of `context` ({option}); tokenized on its own
    lettered  letter scoring: the prompt whose next token is the answer letter ({stem}, {choices})
    choice    one line of {choices} ({letter}, {option})
    """

    stem: str = "{prompt}"
    cues: tuple[tuple[str, str], ...] = ()
    context: str = "{stem}\nAnswer:"
    option: str = " {option}"
    lettered: str = "{stem}\n{choices}\nAnswer:"
    choice: str = "{letter}. {option}"

    def stem_text(self, item: Item) -> str:
        cues = dict(self.cues)
        if "{cue}" in self.stem and item.kind not in cues:
            raise ValueError(f"template has no cue for question kind {item.kind!r} (item {item.id}, {item.lang}); "
                             f"it knows {sorted(cues)}")
        return self.stem.format(prompt=item.prompt, cue=cues.get(item.kind, ""))

    def context_text(self, item: Item) -> str:
        return self.context.format(stem=self.stem_text(item))

    def option_text(self, option: str) -> str:
        return self.option.format(option=option)

    def lettered_text(self, item: Item) -> str:
        choices = "\n".join(self.choice.format(letter=LETTERS[k], option=o) for k, o in enumerate(item.options))
        return self.lettered.format(stem=self.stem_text(item), choices=choices)

    def override(self, path) -> "Template":
        """This template with the fields a JSON file sets, e.g. {"context": "{stem}\nAnswer:", "cues": {"cause": "Why?"}}."""
        try:
            fields = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read template {path}: {e}") from None
        known = {f.name for f in dataclasses.fields(self)}
        if not isinstance(fields, dict) or set(fields) - known or not all(isinstance(v, (str, dict)) for v in fields.values()):
            raise ValueError(f"template {path}: expected a JSON object of strings with fields from {sorted(known)} "
                             "(cues: an object {kind: text})")
        if "cues" in fields:
            if not isinstance(fields["cues"], dict):
                raise ValueError(f"template {path}: cues must be an object {{kind: text}}")
            fields["cues"] = tuple(sorted(fields["cues"].items()))
        return dataclasses.replace(self, **fields)


# The instructions stay in English for every language (the item text is in its own language), so
# a language's score moves with its content, not with how well the model reads translated cues.
XCOPA_TEMPLATE = Template(
    stem="{prompt}\nQuestion: {cue}",
    cues=(("cause", "What was the cause?"), ("effect", "What happened as a result?")),
)
JSONL_TEMPLATE = Template()
TEMPLATES = {"xcopa": XCOPA_TEMPLATE, "jsonl": JSONL_TEMPLATE}


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
        return _tail_logits(model.params, tokens, mask, extra, config=model.config, tail=keep)

    return forward_fn


@partial(jax.jit, static_argnames=("config", "tail"))
def _tail_logits(params, tokens, mask, extra, config, tail):
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
