"""Language neurons (METHODS.md §3): corpora -> streaming statistics -> LAPE / finer classes -> deactivation.

    corpus = default_corpus()                       # {lang: Corpus}: XCOPA premises + choices
    batches = corpus_batches(model, corpus, seq_len=128, batch_size=8, budget=20_000)
    state = collect(model, batches, checkpoint_dir="out/ckpt")   # [L, K, F] counts, resumable
    probs = activation_probs(state)                 # [L, K, F] P(act > 0) per language
    sel = lape(probs)                               # sel.mask [K, L, F]: each language's neurons
    cls = classify(probs)                           # specific / related / general, lambda, stages
    ppl = perplexity(model, held_out_batches, ablate=sel.mask[k])   # {lang: ppl} with k's neurons off

Layout everywhere: L layers, K languages (groups), F neurons (d_ff). The statistics come out of the
forward pass through the in-scan reducer `jaxlens.kernels.neurons.NeuronStats`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# ------------------------------------------------------------------------------------------------
# Corpora


@dataclasses.dataclass(frozen=True)
class Corpus:
    """One language's documents: (prompt, text) pairs; only `text` tokens are counted."""

    docs: tuple[tuple[str, str], ...]
    files: tuple[str, ...] = ()  # source files (hashed into the metadata)


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_corpus(path) -> Corpus:
    """A text file (one document per non-empty line) or JSONL (.jsonl/.json lines).

    JSONL records: {"text": ...}, or {"prompt"|"instruction": ..., "response"|"output": ...}
    (then only response tokens are counted: the finer method's response-only statistics), or
    XCOPA items {"premise", "choice1", "choice2"}.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} not found")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix in (".jsonl", ".json"):
        docs = [_record_doc(json.loads(line), path, i + 1) for i, line in enumerate(lines)]
    else:
        docs = [("", line.strip()) for line in lines]
    if not docs:
        raise ValueError(f"corpus file {path} has no documents")
    return Corpus(tuple(docs), (str(path),))


def _record_doc(rec, path, lineno) -> tuple[str, str]:
    if isinstance(rec, dict):
        if "text" in rec:
            return ("", str(rec["text"]))
        prompt = rec.get("prompt", rec.get("instruction"))
        response = rec.get("response", rec.get("output"))
        if prompt is not None and response is not None:
            return (str(prompt), str(response))
        if {"premise", "choice1", "choice2"} <= rec.keys():
            return ("", f"{rec['premise']} {rec['choice1']} {rec['choice2']}")
    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise ValueError(
        f"{path}:{lineno}: a JSONL record needs 'text', or 'prompt'/'instruction' with 'response'/'output'; got {keys}"
    )


def parse_corpus_args(specs: Sequence[str]) -> dict[str, Corpus]:
    """['fr=path', 'de=a.txt,b.jsonl'] -> {lang: Corpus} (several files per language are joined)."""
    out = {}
    for spec in specs:
        lang, sep, paths = spec.partition("=")
        if not sep or not lang or not paths:
            raise ValueError(f"--corpus takes LANG=PATH[,PATH...]; got {spec!r}")
        if lang in out:
            raise ValueError(f"language {lang!r} given twice in --corpus")
        parts = [read_corpus(p) for p in paths.split(",")]
        out[lang] = Corpus(sum((c.docs for c in parts), ()), sum((c.files for c in parts), ()))
    return out


def default_corpus(split: str = "test", english: bool = True) -> dict[str, Corpus]:
    """XCOPA per language (premise + both choices as one document); `en`: the English translation
    (XCOPA's data-gmt) of the Italian items. split="test" for statistics, "val" held out."""
    from jaxlens.data.xcopa import XCOPA_LANGS, xcopa, xcopa_dir

    out = {}
    for lang in XCOPA_LANGS:
        file = xcopa_dir() / "data" / lang / f"{split}.{lang}.jsonl"
        out[lang] = Corpus(tuple(_record_doc(r, file, i) for i, r in enumerate(xcopa(lang, split))), (str(file),))
    if english:
        file = xcopa_dir() / "data-gmt" / "it" / f"{split}.it.jsonl"
        out["en"] = Corpus(tuple(_record_doc(r, file, i) for i, r in enumerate(xcopa("it", split, english=True))), (str(file),))
    return out


def corpus_meta(corpus: dict[str, Corpus]) -> dict:
    return {lang: {"documents": len(c.docs), "files": [{"path": f, "sha256": sha256(f)} for f in c.files]} for lang, c in corpus.items()}


# ------------------------------------------------------------------------------------------------
# Tokens: packing into fixed [B, T] batches


@dataclasses.dataclass
class Batches:
    """Fixed-shape batches over all languages. tokens/mask/weights [N, B, T], lang [N, B] (-1 = empty row)."""

    tokens: np.ndarray
    mask: np.ndarray
    weights: np.ndarray
    lang: np.ndarray
    languages: tuple[str, ...]
    counted: dict  # {lang: counted tokens}

    def __len__(self) -> int:
        return len(self.tokens)

    def groups(self, i: int) -> np.ndarray:
        """[B, K] one-hot language of each row of batch i (all zero for an empty row)."""
        return (self.lang[i][:, None] == np.arange(len(self.languages))[None]).astype(np.float32)


def pack_documents(tokenizer, docs, seq_len: int, budget: int | None = None, bos_id: int | None = None):
    """Documents -> rows (tokens, mask, weights) [R, T], greedily packed without splitting a
    document that fits in a row (longer ones are cut into rows). Each document starts with BOS
    (weight 0, like prompt tokens); the counted (weight 1) tokens stop at `budget`."""
    rows, row = [], []  # row: list of (token, weight)
    counted = 0
    for prompt, text in docs:
        if budget is not None and counted >= budget:
            break
        head = ([bos_id] if bos_id is not None else []) + (tokenizer.encode(prompt, add_special_tokens=False) if prompt else [])
        body = tokenizer.encode(text, add_special_tokens=False)
        if budget is not None:
            body = body[: budget - counted]
        if not body:
            continue
        counted += len(body)
        doc = [(t, 0) for t in head] + [(t, 1) for t in body]
        if len(row) + len(doc) > seq_len and row:
            rows.append(row)
            row = []
        while len(doc) > seq_len:
            rows.append(doc[:seq_len])
            doc = doc[seq_len:]
        row += doc
    if row:
        rows.append(row)
    tokens = np.zeros((len(rows), seq_len), np.int32)
    mask = np.zeros((len(rows), seq_len), np.int32)
    weights = np.zeros((len(rows), seq_len), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = [t for t, _ in r]
        weights[i, : len(r)] = [w for _, w in r]
        mask[i, : len(r)] = 1
    return tokens, mask, weights, counted


def corpus_batches(model, corpus: dict[str, Corpus], seq_len: int = 128, batch_size: int = 8, budget: int | None = None) -> Batches:
    """Pack each language, then deal rows round-robin over languages into [B, T] batches (the
    last batch is filled with empty rows: same shape, no recompilation, nothing counted)."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer; pass tokenizer= to jaxlens.load")
    if seq_len > model.config.max_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_positions {model.config.max_positions}")
    languages = tuple(corpus)
    if not languages:
        raise ValueError("empty corpus: name at least one language")
    packed, counted = [], {}
    for k, lang in enumerate(languages):
        t, m, w, n = pack_documents(model.tokenizer, corpus[lang].docs, seq_len, budget, model.config.bos_token_id)
        if n == 0:
            raise ValueError(f"corpus for {lang!r} gives no tokens")
        packed.append((t, m, w, np.full(len(t), k, np.int32)))
        counted[lang] = n
    order = sorted(((i, k) for k, p in enumerate(packed) for i in range(len(p[0]))))  # round-robin
    cat = [np.concatenate([p[j] for p in packed]) for j in range(4)]
    offsets = np.cumsum([0] + [len(p[0]) for p in packed])
    idx = np.array([offsets[k] + i for i, k in order])
    n_batches = -(-len(idx) // batch_size)
    pad = n_batches * batch_size - len(idx)
    fields = []
    for j, arr in enumerate(cat):
        rows = arr[idx]
        if pad:
            fill = np.full((pad, *rows.shape[1:]), -1 if j == 3 else 0, rows.dtype)
            rows = np.concatenate([rows, fill])
        fields.append(rows.reshape(n_batches, batch_size, *rows.shape[1:]))
    return Batches(*fields, languages=languages, counted=counted)


# ------------------------------------------------------------------------------------------------
# Statistics: the streaming collection, checkpointed with orbax


def collect(model, batches: Batches, checkpoint_dir=None, save_every: int = 50, with_max: bool = False,
            on_batch: Callable[[int], None] | None = None, run_meta: dict | None = None, progress: bool = True) -> dict:
    """Run every batch through the forward with the NeuronStats reducer; accumulate on device.

    With `checkpoint_dir`, the accumulators are saved (orbax) every `save_every` batches and at the
    end; a run started again with the same inputs resumes after the last save and ends with
    bit-identical statistics. `on_batch(i)` is called after batch i is dispatched. Returns numpy
    {active, tokens, sum, m2[, max]} ([L, K, F], tokens [L, K]).
    """
    from jaxlens.kernels.neurons import empty_state
    from jaxlens.runtime.loop import Checkpoint, accumulate

    cfg, K = model.config, len(batches.languages)
    step = _stats_step(cfg, with_max, model.mesh)
    checkpoint = None
    if checkpoint_dir is not None:
        run = {"run": run_meta or {}, "languages": batches.languages, "shape": list(batches.tokens.shape), "with_max": with_max,
               "tokens": hashlib.sha256(batches.tokens.tobytes() + batches.weights.tobytes()).hexdigest()}
        checkpoint = Checkpoint(Path(checkpoint_dir), run, every=save_every)
    views = [_BatchView(batches, i) for i in range(len(batches))]
    return accumulate(views, lambda v, state, *inputs: step(model.params, state, *inputs),
                      empty_state(cfg.n_layers, K, cfg.d_ff, with_max), mesh=model.mesh,
                      inputs=lambda v: (v.tokens, v.mask, v.weights, v.groups), checkpoint=checkpoint,
                      on_batch=on_batch, desc="neuron stats", progress=progress, size=lambda v: int(v.weights.sum()))


@dataclasses.dataclass
class _BatchView:
    """Batch i of `Batches` as the runtime loop reads it."""

    batches: Batches
    i: int

    @property
    def tokens(self):
        return self.batches.tokens[self.i]

    @property
    def mask(self):
        return self.batches.mask[self.i]

    @property
    def weights(self):
        return self.batches.weights[self.i]

    @property
    def groups(self):
        return self.batches.groups(self.i)


_STEPS: dict = {}


def _stats_step(cfg, with_max: bool, mesh=None):
    """One jitted program: forward with the reducer, then add into the accumulators."""
    import jax

    from jaxlens.kernels.neurons import NeuronStats, update
    from jaxlens.core.forward import forward
    from jaxlens.core.sharding import weights_mesh

    key = (cfg, with_max, mesh)
    if key not in _STEPS:
        def step(params, state, tokens, mask, weights, groups):
            reducer = NeuronStats(groups=groups, weights=weights, with_max=with_max)
            with weights_mesh(mesh):  # traced params: each layer gathered over fsdp as the scan reaches it
                _, sites = forward(params, tokens, mask, config=cfg, reducers={"neurons": reducer})
            return update(state, sites["neurons"])

        _STEPS[key] = jax.jit(step)
    return _STEPS[key]


def save_stats(path, state: dict, meta: dict) -> Path:
    """One .npz: the accumulators plus `meta` (JSON text: model, languages, corpus hashes, counts)."""
    from jaxlens.report.io import write_arrays

    return write_arrays(path, **state, meta=np.array(json.dumps(meta, ensure_ascii=False)))


def load_stats(path) -> tuple[dict, dict]:
    from jaxlens.report.io import read_arrays

    path = Path(path)
    if path.is_dir():
        path = path / "stats.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; give the output of `jaxlens neurons stats` (a directory or stats.npz)")
    arrays = read_arrays(path)
    meta = json.loads(str(arrays.pop("meta")))
    return arrays, meta


def activation_probs(state: dict) -> np.ndarray:
    """p[l, k, f] = #counted tokens of language k with neuron (l, f) active / #counted tokens."""
    from jaxlens.kernels.neurons import counts

    tokens = counts(state, "tokens").astype(np.float64)
    if (tokens == 0).any():
        raise ValueError("a language has no counted tokens; its activation probabilities are undefined")
    return counts(state, "active").astype(np.float64) / tokens[..., None]


# ------------------------------------------------------------------------------------------------
# LAPE (Tang et al. 2402.16438)


def kth_value(values: np.ndarray, rate: float) -> float:
    """torch.kthvalue(flat, round(n * rate)): the k-th smallest value, k counted from 1."""
    flat = np.sort(values, axis=None)
    k = round(flat.size * rate)
    if not 1 <= k <= flat.size:
        raise ValueError(f"rate {rate} selects no element of {flat.size}")
    return float(flat[k - 1])


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """probs [L, K, F] -> entropy over languages of p / sum_k p ([L, F]).

    A neuron that never fires (sum 0) counts as uniform (entropy log K), as in the finer method's
    code (Language-Neurons-Alignment `Neuron_Prob.wrap_neuron`): otherwise its score would be 0 at
    every lambda and it would rank ahead of almost every real neuron. LAPE filters such neurons out
    before ranking (no p above the filter value), so its selection does not depend on this."""
    K = probs.shape[1]
    total = probs.sum(axis=1, keepdims=True)
    normed = np.divide(probs, total, out=np.full_like(probs, 1.0 / K), where=total > 0)
    logs = np.log(np.where(normed > 0, normed, 1.0))
    return -(normed * logs).sum(axis=1)


@dataclasses.dataclass
class LapeResult:
    mask: np.ndarray  # [K, L, F] bool: neuron (l, f) belongs to language k
    selected: np.ndarray  # [L, F] bool: among the lowest-entropy top_rate
    entropy: np.ndarray  # [L, F] (inf where filtered out)
    filter_value: float  # q(filter_rate) of all probabilities
    bar_value: float  # q(bar_ratio): assignment threshold


def lape(probs: np.ndarray, filter_rate: float = 0.95, top_rate: float = 0.01, bar_ratio: float = 0.95) -> LapeResult:
    """Language activation probability entropy, as in the paper's code (defaults: the paper's).

    Keep neurons where some language has p > q(filter_rate) of all probabilities; select the
    lowest `top_rate` of entropy over all L x F neurons; assign each selected neuron to every
    language with p > q(bar_ratio).
    """
    L, K, F = probs.shape
    entropy = normalized_entropy(probs)
    filter_value = kth_value(probs, filter_rate)
    entropy[(probs > filter_value).sum(axis=1) == 0] = np.inf
    n_select = round(L * F * top_rate)
    selected = np.zeros(L * F, bool)
    selected[np.argsort(entropy, axis=None, kind="stable")[:n_select]] = True
    selected = selected.reshape(L, F)
    bar_value = kth_value(probs, bar_ratio)
    mask = (selected[:, None, :] & (probs > bar_value)).transpose(1, 0, 2)  # [K, L, F]
    return LapeResult(mask, selected, entropy, filter_value, bar_value)


# ------------------------------------------------------------------------------------------------
# Finer classes (Zhang et al. 2505.21505)

CLASSES = ("none", "specific", "related", "general")  # codes 0..3


def finer_score(probs: np.ndarray, lam: float) -> np.ndarray:
    """H(p')/log K - lam * max_k p / c_K, c_K = (sum_{k=1..K} 1/k) / K; [L, K, F] -> [L, F]."""
    K = probs.shape[1]
    c = sum(1.0 / k for k in range(1, K + 1)) / K
    return normalized_entropy(probs) / math.log(K) - lam * probs.max(axis=1) / c


def lowest(score: np.ndarray, rate: float) -> np.ndarray:
    """[L, F] bool: the round(size * rate) lowest scores (stable order on ties)."""
    out = np.zeros(score.size, bool)
    out[np.argsort(score, axis=None, kind="stable")[: round(score.size * rate)]] = True
    return out.reshape(score.shape)


@dataclasses.dataclass
class Classes:
    classes: np.ndarray  # [L, F] int: 0 none, 1 specific (N=1), 2 related (1<N<K), 3 general (N=K)
    n_langs: np.ndarray  # [L, F] N = #{k : p > tau}
    selected: np.ndarray  # [L, F] bool: lowest top_rate of the score at `lam`
    lam: float
    tau: float
    per_layer: np.ndarray  # [L, 4] class counts over all neurons
    per_layer_selected: np.ndarray  # [L, 4] class counts among the selected
    stages: tuple[int, int, int]  # first layer of stages 2, 3 and 4
    lam_found: bool | None = None  # searched: whether some lambda met the rule (False: `lam` is 0 and fails it)

    def lang_mask(self, probs: np.ndarray, classes=(1, 2)) -> np.ndarray:
        """[K, L, F]: selected neurons of the given classes that are active above tau for language k."""
        keep = self.selected & np.isin(self.classes, classes)
        return (keep[:, None, :] & (probs > self.tau)).transpose(1, 0, 2)


def classify(probs: np.ndarray, top_rate: float = 0.01, tau_rate: float = 0.95, lam: float | None = None,
             lam_max: float = 0.2, eps: float = 1e-3) -> Classes:
    """N-count classes over all neurons, selection by the score, lambda by bisection, four stages.

    lam=None searches the largest lambda in [0, lam_max] (bisection to eps) at which no selected
    neuron is general (N = K). When none does (lambda = 0 already selects a general neuron), the
    selection is lambda = 0's and `lam_found` is False: report it, the general neurons are in it.
    """
    L, K, F = probs.shape
    if K < 2:
        raise ValueError("the finer classes need at least two languages")
    tau = kth_value(probs, tau_rate)
    n_langs = (probs > tau).sum(axis=1)  # [L, F]
    classes = np.where(n_langs == 0, 0, np.where(n_langs == 1, 1, np.where(n_langs == K, 3, 2)))
    ok = lambda x: not (lowest(finer_score(probs, x), top_rate) & (n_langs == K)).any()  # noqa: E731
    found = None
    if lam is None:
        lam = search_lambda(ok, 0.0, lam_max, eps)
        found = lam is not None
        lam = 0.0 if lam is None else lam
    selected = lowest(finer_score(probs, lam), top_rate)
    count = lambda m: np.stack([(m & (classes == c)).sum(axis=1) for c in range(4)], axis=1)  # noqa: E731
    per_layer = count(np.ones_like(selected))
    stages = four_stages(language_share(per_layer)) if L >= 4 else (L, L, L)
    return Classes(classes, n_langs, selected, float(lam), tau, per_layer, count(selected), stages, found)


def search_lambda(ok: Callable[[float], bool], lo: float, hi: float, eps: float) -> float | None:
    """The largest x in [lo, hi] with ok(x), assuming ok is true below a threshold; None if neither
    lo, hi nor any midpoint is ok.

    As the finer method's `autosweep_lambda`: lo and hi are tried, then the bisection runs in any
    case and the last ok midpoint wins, so an ok `hi` gives a value just below it (within eps)."""
    best = None
    if ok(lo):
        best = lo
    if ok(hi):
        best = hi
    while hi - lo > eps:
        mid = (lo + hi) / 2
        if ok(mid):
            best, lo = mid, mid
        else:
            hi = mid
    return best


def language_share(per_layer: np.ndarray) -> np.ndarray:
    """[L, 4] class counts -> (specific + related) / (specific + related + general) per layer."""
    lang = per_layer[:, 1] + per_layer[:, 2]
    total = lang + per_layer[:, 3]
    return np.divide(lang, total, out=np.zeros(len(total)), where=total > 0)


def four_stages(share: np.ndarray) -> tuple[int, int, int]:
    """First layers of stages 2, 3, 4 from the language-specific share curve r(l).

    Rule (ours; the paper describes the stages, not a rule): stage 4 is the last layer. Over the
    others, the valley v is the minimum of r in layers 1..L-3, the early peak e the maximum before
    v, the late peak p the maximum in v+1..L-2. Stage 2 (shared reasoning) starts at the first layer
    after e where r falls to half-way between r(e) and r(v); stage 3 (output transformation) at the
    first layer after v where r climbs to half-way between r(v) and r(p).
    """
    L = len(share)
    if L < 4:
        raise ValueError(f"four stages need at least 4 layers, got {L}")
    r = np.asarray(share, np.float64)
    v = 1 + int(np.argmin(r[1 : L - 2]))
    e = int(np.argmax(r[:v]))
    p = v + 1 + int(np.argmax(r[v + 1 : L - 1]))
    down = (r[e] + r[v]) / 2
    up = (r[v] + r[p]) / 2
    b1 = next(l for l in range(e + 1, v + 1) if r[l] <= down)
    b2 = next(l for l in range(v + 1, p + 1) if r[l] >= up)
    return b1, b2, L - 1


# ------------------------------------------------------------------------------------------------
# Comparing two neuron sets


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[dict]:
    """Two runs' neuron sets ({name: [L, F] bool}, names = languages or classes) -> per name and
    layer: sizes, overlap and Jaccard index."""
    if set(a) != set(b):
        raise ValueError(f"the two neuron sets name different groups: {sorted(a)} vs {sorted(b)}")
    rows = []
    for name in a:
        x, y = np.asarray(a[name], bool), np.asarray(b[name], bool)
        if x.shape != y.shape:
            raise ValueError(f"{name}: shapes differ {x.shape} vs {y.shape} (same model?)")
        for layer in range(x.shape[0]):
            both, either = int((x[layer] & y[layer]).sum()), int((x[layer] | y[layer]).sum())
            rows.append({"name": name, "layer": layer, "a": int(x[layer].sum()), "b": int(y[layer].sum()),
                         "both": both, "jaccard": both / either if either else 1.0})
    return rows


# ------------------------------------------------------------------------------------------------
# Deactivation: perplexity per language with one language's neurons zeroed


def perplexity(model, batches: Batches, ablate: np.ndarray | None = None, progress: bool = False) -> dict[str, float]:
    """exp(mean next-token NLL) per language over counted target tokens; `ablate` [L, F] bool
    zeroes those neurons (mlp_act) in every layer."""
    cfg = model.config
    ablate = np.zeros((cfg.n_layers, cfg.d_ff), bool) if ablate is None else np.asarray(ablate, bool)
    if ablate.shape != (cfg.n_layers, cfg.d_ff):
        raise ValueError(f"neuron mask shape {ablate.shape} != (n_layers, d_ff) = {(cfg.n_layers, cfg.d_ff)}")
    ppl = perplexity_matrix(model, batches, ablate[None], progress=progress)[0]
    return {lang: float(ppl[k]) for k, lang in enumerate(batches.languages)}


def perplexity_matrix(model, batches: Batches, masks: np.ndarray, progress: bool = False,
                      chunk: int | None = None) -> np.ndarray:
    """Perplexity [P, K] of each language k with the neurons of masks[p] ([P, L, F] bool) zeroed, as
    one program per batch: the P ablations are a stacked intervention, vmapped in chunks
    (`sweep.map_stack`), so the deactivation matrix (P = K + 1 with the baseline) is not P runs."""
    from jaxlens.methods.sweep import auto_chunk
    from jaxlens.runtime.loop import stream
    from jaxlens.runtime.placement import put_replicated

    cfg = model.config
    masks = np.asarray(masks, bool)
    if masks.ndim != 3 or masks.shape[1:] != (cfg.n_layers, cfg.d_ff):
        raise ValueError(f"neuron masks must be [P, n_layers, d_ff] = [P, {cfg.n_layers}, {cfg.d_ff}]; got {masks.shape}")
    B, T = batches.tokens.shape[1:]
    step = _nll_step(cfg, chunk or auto_chunk(B, T, cfg.vocab_size, tail_only=False))
    placed = put_replicated(model.mesh, masks)
    K = len(batches.languages)
    nll, count = np.zeros((len(masks), K)), np.zeros(K)
    views = [_BatchView(batches, i) for i in range(len(batches))]
    for view, (row_nll, row_count) in stream(views, lambda v, *inputs: step(model.params, *inputs, placed), mesh=model.mesh,
                                             inputs=lambda v: (v.tokens, v.mask, v.weights), desc="perplexity",
                                             progress=progress, size=lambda v: int(v.weights.sum())):
        g = view.groups  # [B, K]
        nll += np.asarray(row_nll, np.float64) @ g
        count += np.asarray(row_count, np.float64) @ g
    return np.exp(nll / count[None])


def _nll_step(cfg, chunk: int):
    import jax
    import jax.numpy as jnp

    from jaxlens.core import interventions as iv
    from jaxlens.core.forward import forward
    from jaxlens.core.modules import token_nll
    from jaxlens.methods.sweep import map_stack

    key = ("nll", cfg, chunk)
    if key not in _STEPS:
        def step(params, tokens, mask, weights, masks):
            target = tokens[:, 1:]
            w = (weights[:, 1:] > 0) & (mask[:, :-1] > 0)

            def one(ablation):
                # The NLL from the final-normed states, the vocabulary in chunks: never [B, T, V]
                # float32 logits (XLA drops the forward's own, unused).
                _, sites = forward(params, tokens, mask, config=cfg, interventions=ablation, capture=("final_norm",))
                nll = token_nll(params, sites["final_norm"][:, :-1], target, cfg)  # [B, T-1]
                return jnp.where(w, nll, 0.0).sum(axis=1)  # [B]

            stack = jax.vmap(lambda m: iv.ablate("mlp_act", neurons=m))(masks)
            return map_stack(one, stack, chunk), w.sum(axis=1)  # [P, B], [B]

        _STEPS[key] = jax.jit(step)
    return _STEPS[key]


def diagonal_dominance(matrix: np.ndarray, baseline: np.ndarray) -> dict:
    """matrix[d, e]: PPL on e with d's neurons off; baseline[e]: PPL with nothing off.

    On the log-ratio change D = log(matrix / baseline):
    `rows` = fraction of deactivated languages d that hurt their own language more than any other
    (D[d, d] > max_{e!=d} D[d, e]); `cols` = fraction of evaluated languages e hurt most by their
    own neurons (D[e, e] > max_{d!=e} D[d, e]; robust to one language being fragile to everything);
    `margin` = mean diagonal minus mean off-diagonal of D (nats of log-PPL).
    """
    delta = np.log(matrix / baseline[None, :])
    K = len(delta)
    if K < 2:
        return {"rows": float("nan"), "cols": float("nan"), "margin": float("nan")}
    off = ~np.eye(K, dtype=bool)
    return {
        "rows": float(np.mean([delta[d, d] > delta[d, off[d]].max() for d in range(K)])),
        "cols": float(np.mean([delta[e, e] > delta[off[:, e], e].max() for e in range(K)])),
        "margin": float(np.diag(delta).mean() - delta[off].mean()),
    }
