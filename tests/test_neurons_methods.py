"""Neuron statistics kernel and the language-neuron methods, on synthetic arrays.

The kernel is checked against a float64 numpy loop; LAPE against a plain transcription of the
paper's formulas; the finer classes, the lambda search, the four stages and the dominance score
on data built so the answer is known.
"""

from __future__ import annotations

import math
import types

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens.methods import neurons as N
from jaxlens.kernels.neurons import NeuronStats, batch_stats, empty_state, update


def random_batch(seed, B, T, F, K):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, F)).astype(np.float32)
    lang = rng.integers(-1, K, size=B)  # -1: an empty row (no group)
    groups = (lang[:, None] == np.arange(K)[None]).astype(np.float32)
    weights = (rng.random((B, T)) < 0.7).astype(np.int32)
    return x, groups, weights


def numpy_stats(x, groups, weights):
    """float64 loops over tokens: the definition."""
    B, T, F = x.shape
    K = groups.shape[1]
    out = {k: np.zeros((K, F)) for k in ("active", "sum", "m2")}
    out["tokens"] = np.zeros(K)
    out["max"] = np.full((K, F), -np.inf)
    for b in range(B):
        for t in range(T):
            for k in range(K):
                if groups[b, k] > 0 and weights[b, t] > 0:
                    v = x[b, t].astype(np.float64)
                    out["active"][k] += v > 0
                    out["tokens"][k] += 1
                    out["sum"][k] += v
                    out["max"][k] = np.maximum(out["max"][k], v)
    mean = out["sum"] / np.maximum(out["tokens"], 1)[:, None]
    for b in range(B):  # second pass: squared deviations from the group's mean
        for t in range(T):
            for k in range(K):
                if groups[b, k] > 0 and weights[b, t] > 0:
                    out["m2"][k] += (x[b, t].astype(np.float64) - mean[k]) ** 2
    return out


@pytest.mark.parametrize("shape", [(1, 1, 3, 1), (3, 5, 7, 2), (6, 9, 16, 4)])
def test_batch_stats_match_numpy(shape):
    B, T, F, K = shape
    x, groups, weights = random_batch(sum(shape), B, T, F, K)
    got = batch_stats(jnp.asarray(x), jnp.asarray(groups), jnp.asarray(weights), with_max=True)
    want = numpy_stats(x, groups, weights)
    assert got["active"].dtype == jnp.int32 and got["tokens"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got["active"]), want["active"])
    np.testing.assert_array_equal(np.asarray(got["tokens"]), want["tokens"])
    np.testing.assert_allclose(np.asarray(got["sum"]), want["sum"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["m2"]), want["m2"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got["max"]), want["max"].astype(np.float32))


def test_reducer_counts_only_unmasked_weighted_tokens_and_accumulates():
    B, T, F, K, L = 4, 6, 5, 3, 2
    x, groups, weights = random_batch(0, B, T, F, K)
    mask = np.ones((B, T), np.int32)
    mask[:, :2] = 0  # left padding: never counted, whatever the weight says
    reducer = NeuronStats(groups=jnp.asarray(groups), weights=jnp.asarray(weights))
    got = reducer(jnp.asarray(x), types.SimpleNamespace(mask=jnp.asarray(mask), layer=0))
    want = numpy_stats(x, groups, weights * mask)
    np.testing.assert_array_equal(np.asarray(got["active"]), want["active"])
    assert "max" not in got
    # Two batches stacked over layers add up; integers stay integers.
    stacked = {k: jnp.stack([v] * L) for k, v in got.items()}
    state = update(update(empty_state(L, K, F), stacked), stacked)
    np.testing.assert_array_equal(np.asarray(state["active"]), 2 * np.stack([want["active"]] * L))
    np.testing.assert_array_equal(np.asarray(state["tokens"]), 2 * np.stack([want["tokens"]] * L))
    assert state["active"].dtype == jnp.int32


def test_moments_and_probs():
    from jaxlens.kernels.neurons import moments

    state = {"active": np.array([[[1, 2]]]), "tokens": np.array([[4]]), "sum": np.array([[[2.0, 4.0]]]),
             "m2": np.array([[[1.0, 4.0]]])}
    p, mean, var = moments(state)
    np.testing.assert_allclose(p, [[[0.25, 0.5]]])
    np.testing.assert_allclose(mean, [[[0.5, 1.0]]])
    np.testing.assert_allclose(var, [[[0.25, 1.0]]])
    legacy = {**state, "sumsq": np.array([[[2.0, 8.0]]])}  # files saved before m2: sums of squares
    del legacy["m2"]
    np.testing.assert_allclose(moments(legacy)[2], var)
    np.testing.assert_array_equal(N.activation_probs(state), p)
    with pytest.raises(ValueError, match="no counted tokens"):
        N.activation_probs({**state, "tokens": np.array([[0]])})


def test_variance_is_stable_for_a_large_mean_over_many_batches():
    """A neuron at 1000 +- 0.01 over 50 batches: float32 E[x^2] - E[x]^2 would be pure rounding
    noise (x^2 ~ 1e6 has ulp ~0.06); the merged m2 keeps the variance to a few percent."""
    from jaxlens.kernels.neurons import moments

    rng = np.random.default_rng(0)
    B, T, F, K, L = 4, 32, 3, 2, 1
    groups = np.eye(K, dtype=np.float32)[np.arange(B) % K]
    state = empty_state(L, K, F)
    xs = []
    for _ in range(50):
        x = (1000.0 + 0.01 * rng.standard_normal((B, T, F))).astype(np.float32)
        xs.append(x)
        stats = batch_stats(jnp.asarray(x), jnp.asarray(groups), jnp.ones((B, T), jnp.int32))
        state = update(state, {k: v[None] for k, v in stats.items()})
    allx = np.concatenate(xs).astype(np.float64)  # [50 B, T, F]
    lang = np.tile(np.arange(B) % K, 50)
    for k in range(K):
        want = allx[lang == k].reshape(-1, F).var(axis=0)
        got = moments({name: np.asarray(v) for name, v in state.items()})[2][0, k]
        np.testing.assert_allclose(got, want, rtol=0.05)


# ---- LAPE ---------------------------------------------------------------------------------------


def lape_reference(probs, filter_rate=0.95, top_rate=0.01, bar_ratio=0.95):
    """Plain transcription of METHODS.md §3 / the paper's identify.py, one neuron at a time."""
    L, K, F = probs.shape
    flat = sorted(probs.ravel().tolist())
    q_filter = flat[round(len(flat) * filter_rate) - 1]
    q_bar = flat[round(len(flat) * bar_ratio) - 1]
    entropy = np.zeros((L, F))
    for l in range(L):
        for f in range(F):
            p = probs[l, :, f]
            s = p.sum()
            pn = p / s if s > 0 else np.zeros(K)
            h = -sum(v * math.log(v) for v in pn if v > 0)
            entropy[l, f] = h if (p > q_filter).any() else math.inf
    order = sorted(range(L * F), key=lambda i: (entropy.ravel()[i], i))[: round(L * F * top_rate)]
    neurons = {k: set() for k in range(K)}
    for i in order:
        l, f = divmod(i, F)
        for k in range(K):
            if probs[l, k, f] > q_bar:
                neurons[k].add((l, f))
    return entropy, neurons, q_filter, q_bar


@pytest.mark.parametrize("seed,shape,rates", [(0, (4, 3, 50), (0.95, 0.01, 0.95)), (1, (6, 5, 40), (0.9, 0.05, 0.95)),
                                              (2, (3, 7, 33), (0.8, 0.1, 0.9))])
def test_lape_equals_plain_transcription(seed, shape, rates):
    rng = np.random.default_rng(seed)
    L, K, F = shape
    # Skewed probabilities, some exact zeros (whole neurons and single languages), some ties.
    probs = rng.beta(0.3, 2.0, size=shape)
    probs[rng.random(shape) < 0.1] = 0.0
    probs[:, :, 0] = 0.0
    probs[:, :, 1] = 0.5
    got = N.lape(probs, *rates)
    entropy, neurons, q_filter, q_bar = lape_reference(probs, *rates)
    assert got.filter_value == q_filter and got.bar_value == q_bar
    np.testing.assert_array_equal(got.entropy, entropy)  # bit-exact
    for k in range(K):
        assert set(zip(*np.nonzero(got.mask[k]))) == neurons[k]
    assert got.selected.sum() == round(L * F * rates[1])


def test_lape_finds_planted_language_neurons():
    rng = np.random.default_rng(0)
    L, K, F = 4, 3, 100
    probs = rng.uniform(0.2, 0.3, size=(L, K, F))  # shared neurons: similar in every language
    planted = {(0, 0, 5): 0, (3, 1, 7): 1, (3, 2, 9): 2}
    for (l, k, f) in planted:
        probs[l, :, f] = 0.01
        probs[l, k, f] = 0.9
    probs[1, :2, 11] = 0.9  # a two-language neuron
    probs[1, 2, 11] = 0.01
    got = N.lape(probs, top_rate=0.01)  # 4 of 400 neurons
    found = {(l, k, f) for k, l, f in zip(*np.nonzero(got.mask))}
    assert found == set(planted) | {(1, 0, 11), (1, 1, 11)}


# ---- finer classes ------------------------------------------------------------------------------


def test_classes_and_lambda_on_planted_data():
    L, K, F = 8, 4, 100
    probs = np.full((L, K, F), 0.02)  # background: equal in every language, never above tau
    probs[:, :, 0] = [0.9, 0, 0, 0]  # specific (N=1)
    probs[:, :, 1] = [0.9, 0.9, 0, 0]  # related (N=2)
    probs[:, :, 2] = 0.95  # general (N=4): highest max-p, entropy 1
    probs[:, :, 3:10] = np.array([0.02, 0.01, 0.01, 0.01])[:, None]  # quiet: entropy < 1, small max-p
    got = N.classify(probs, top_rate=9 / F)  # exactly specific + related + quiet at lambda = 0
    assert got.tau == 0.02
    assert (got.classes[:, 0] == 1).all() and (got.classes[:, 1] == 2).all() and (got.classes[:, 2] == 3).all()
    assert (got.classes[:, 3:] == 0).all()
    np.testing.assert_array_equal(got.per_layer, [[F - 3, 1, 1, 1]] * L)
    # The general neuron overtakes the quiet ones once lambda * (0.95 - 0.02) / c > 1 - h(quiet).
    c = (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4
    q = np.array([0.4, 0.2, 0.2, 0.2])
    h = -(q * np.log(q)).sum() / np.log(4)
    threshold = (1 - h) * c / (0.95 - 0.02)
    assert threshold - 1e-3 <= got.lam <= threshold
    assert not (got.selected & (got.n_langs == K)).any()
    np.testing.assert_array_equal(got.per_layer_selected, [[7, 1, 1, 0]] * L)
    mask = got.lang_mask(probs)  # [K, L, F]: specific + related assigned to their languages
    assert mask[0, :, :2].all() and mask[1, :, 1].all() and not mask[1, :, 0].any() and mask.sum() == 3 * L


def test_search_lambda_bisection():
    assert N.search_lambda(lambda x: x <= 0.0731, 0.0, 0.2, 1e-3) == pytest.approx(0.0731, abs=1e-3)
    assert N.search_lambda(lambda x: x <= 0.0731, 0.0, 0.2, 1e-3) <= 0.0731
    # The edges as the finer method's autosweep_lambda: an ok upper end is bisected to just below
    # it (the last ok midpoint wins), and when even lo fails there is no lambda (None, not 0).
    top = N.search_lambda(lambda x: True, 0.0, 0.2, 1e-3)
    assert 0.2 - 1e-3 <= top < 0.2
    assert N.search_lambda(lambda x: False, 0.0, 0.2, 1e-3) is None
    assert N.search_lambda(lambda x: x == 0.0, 0.0, 0.2, 1e-3) == 0.0


def test_classify_reports_when_no_lambda_works():
    L, K, F = 4, 3, 200
    probs = np.zeros((L, K, F))
    probs[:, :, :4] = 0.9  # general (above tau in every language)
    probs[:, :, 4:] = np.array([0.02, 0.01, 0.01])[:, None]  # below tau
    got = N.classify(probs, top_rate=1.0)  # every neuron selected: the general ones at every lambda
    assert got.lam_found is False and got.lam == 0.0
    assert got.per_layer_selected[:, 3].sum() == 16
    assert N.classify(probs, top_rate=1.0, lam=0.1).lam_found is None  # given, not searched


def _with_dead_neurons(seed=0, L=6, K=4, F=200, dead=5):
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0, 0.3, (L, K, F)) * (rng.uniform(size=(L, 1, F)) < 0.8)  # some quiet columns
    probs[:, rng.integers(K, size=F // 10), np.arange(F // 10)] = 0.9  # a few language-specific ones
    dead_idx = np.stack([rng.choice(np.arange(F // 10, F), dead, replace=False) for _ in range(L)])
    for layer in range(L):
        probs[layer, :, dead_idx[layer]] = 0.0
    return probs, dead_idx


def test_finer_classes_never_select_dead_neurons():
    """A neuron that never fires counts as uniform (the reference's wrap_neuron), never selected."""
    probs, dead_idx = _with_dead_neurons()
    L = probs.shape[0]
    dead = np.zeros(probs[:, 0].shape, bool)
    dead[np.arange(L)[:, None], dead_idx] = True
    np.testing.assert_allclose(N.normalized_entropy(probs)[dead], np.log(probs.shape[1]))
    for lam in (0.0, 0.05, 0.1, 0.2, None):
        got = N.classify(probs, top_rate=0.05, lam=lam)
        assert got.selected.sum() == 60 and not (got.selected & dead).any(), lam


def test_lape_unchanged_by_dead_neurons():
    """LAPE as transcribed from RUCAIBox identify.py (nan -> 0 after p / sum, filtered to inf):
    the dead neurons' entropy does not reach its selection."""
    probs, _ = _with_dead_neurons(seed=1)
    total = probs.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normed = np.nan_to_num(probs / total, nan=0.0)
        entropy = -(normed * np.where(normed > 0, np.log(normed), 0)).sum(axis=1)
    flat = np.sort(probs, axis=None)
    filter_value = flat[round(flat.size * 0.95) - 1]
    entropy[(probs > filter_value).sum(axis=1) == 0] = np.inf
    want = np.zeros(entropy.size, bool)
    want[np.argsort(entropy, axis=None, kind="stable")[: round(entropy.size * 0.01)]] = True
    got = N.lape(probs)
    np.testing.assert_array_equal(got.selected, want.reshape(entropy.shape))


def test_four_stages_on_known_curve():
    # share of language neurons: high early, valley mid-depth, late peak, last layer drops.
    r = np.array([0.9, 0.85, 0.6, 0.2, 0.1, 0.15, 0.5, 0.8, 0.7, 0.3])
    # e=0 (0.9), v=4 (0.1), p=7 (0.8): down=0.5 -> first <=0.5 after 0 is layer 3; up=0.45 -> layer 6.
    assert N.four_stages(r) == (3, 6, 9)
    with pytest.raises(ValueError, match="at least 4 layers"):
        N.four_stages(r[:3])


def test_compare_and_dominance():
    a = {"fr": np.array([[1, 1, 0], [0, 0, 0]], bool)}
    b = {"fr": np.array([[1, 0, 1], [0, 0, 0]], bool)}
    rows = N.compare(a, b)
    assert rows[0] == {"name": "fr", "layer": 0, "a": 2, "b": 2, "both": 1, "jaccard": 1 / 3}
    assert rows[1]["jaccard"] == 1.0
    with pytest.raises(ValueError, match="different groups"):
        N.compare(a, {"de": b["fr"]})
    base = np.array([10.0, 20.0, 30.0])
    matrix = base[None] * np.array([[3.0, 1.1, 1.0], [1.0, 2.0, 1.2], [1.5, 1.0, 1.4]])
    dom = N.diagonal_dominance(matrix, base)
    assert dom["rows"] == pytest.approx(2 / 3)  # row 2 hurts language 0 (1.5) more than its own (1.4)
    assert dom["cols"] == 1.0  # yet every language is hurt most by its own neurons
    d = np.log([[3.0, 1.1, 1.0], [1.0, 2.0, 1.2], [1.5, 1.0, 1.4]])
    assert dom["margin"] == pytest.approx(np.trace(d) / 3 - (d.sum() - np.trace(d)) / 6)


# ---- corpora and packing ------------------------------------------------------------------------


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [b % 100 + 2 for b in text.encode()]


def test_pack_keeps_documents_whole_and_stops_at_budget():
    docs = [("", "abc"), ("xy", "defg"), ("", "h" * 12)]
    tokens, mask, weights, counted = N.pack_documents(ByteTokenizer(), docs, seq_len=8, bos_id=1)
    # row 0: [bos a b c] then doc 2 (7 tokens) does not fit -> row 1; doc 3 (13) is cut over rows.
    assert mask.sum(axis=1).tolist() == [4, 7, 8, 5]
    assert weights[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert weights[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 0]  # bos + prompt not counted
    assert counted == 3 + 4 + 12 == weights.sum()
    _, _, w, counted = N.pack_documents(ByteTokenizer(), docs, seq_len=8, budget=5, bos_id=1)
    assert counted == 5 == w.sum()


def test_read_corpus_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "t"}\n{"instruction": "i", "output": "o"}\n', encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    corpus = N.parse_corpus_args([f"fr={tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}"])
    assert corpus["fr"].docs == (("", "one"), ("", "two"), ("", "t"), ("i", "o"))
    with pytest.raises(ValueError, match="needs 'text'"):
        N.read_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="not found"):
        N.read_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="LANG=PATH"):
        N.parse_corpus_args(["fr"])


def test_default_corpus_is_xcopa_with_english():
    corpus = N.default_corpus("val")
    assert "en" in corpus and "zh" in corpus and len(corpus["zh"].docs) == 100
    meta = N.corpus_meta(corpus)
    assert len(meta["zh"]["files"][0]["sha256"]) == 64


def test_counts_do_not_overflow_at_two_to_the_31():
    """A language seen for 3 x 2**30 tokens (past int32) keeps an exact count."""
    from jaxlens.kernels.neurons import counts

    L, K, F = 1, 2, 3
    state = empty_state(L, K, F)
    batch = {"active": jnp.full((L, K, F), 2**23, jnp.int32), "tokens": jnp.full((L, K), 2**23 + 1, jnp.int32),
             "sum": jnp.zeros((L, K, F)), "m2": jnp.zeros((L, K, F))}
    n = 3 * 2**30 // 2**23  # 384 batches
    for _ in range(n):
        state = update(state, batch)
    np.testing.assert_array_equal(counts(state, "tokens"), np.full((L, K), n * (2**23 + 1), np.int64))
    np.testing.assert_array_equal(counts(state, "active"), np.full((L, K, F), n * 2**23, np.int64))
    assert counts(state, "tokens").max() > 2**31


@pytest.mark.parametrize("tied,cap", [(True, None), (False, 2.0)])
def test_chunked_token_nll_equals_full_logits(tied, cap):
    """The perplexity step's NLL, vocabulary in chunks (one shorter last chunk), equals
    logsumexp - gold of the full logits; its compiled step never holds [B, T, V] float32."""
    import dataclasses

    import jax

    from jaxlens.core.config import ModelConfig
    from jaxlens.core.forward import init_params, param_shapes, unembed
    from jaxlens.core.modules import token_nll

    cfg = ModelConfig(family="test", vocab_size=1000, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8,
                      d_ff=24, max_positions=64, tie_embeddings=tied, final_softcap=cap)
    params = jax.tree.map(lambda p: 5 * p, init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((3, 7, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 1000, (3, 7)), jnp.int32)
    logits = unembed(params, h, cfg)
    want = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_nll(params, h, targets, cfg, chunk=128), want, rtol=1e-5, atol=1e-5)
    # The step (2 ablations vmapped) on a 64k vocabulary: 8 chunks of 8192, never P x [B, T, V].
    big = dataclasses.replace(cfg, vocab_size=65536)
    B, T, P = 4, 32, 2
    shape = jax.ShapeDtypeStruct
    mem = N._nll_step(big, P).lower(param_shapes(big), shape((B, T), jnp.int32), shape((B, T), jnp.int32),
                                    shape((B, T), jnp.int32), shape((P, 2, 24), jnp.bool_)).compile().memory_analysis()
    assert mem.temp_size_in_bytes < P * B * T * big.vocab_size * 4 / 2, mem.temp_size_in_bytes
