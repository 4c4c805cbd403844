"""Lim et al. (2505.13141) complete: the latent log-probability of teacher-forced phrases (fused,
vocabulary-chunked), representation similarity (linear CKA, cosines) of pooled states, and which
language the answer forms in. References: float64 numpy transcriptions of the plain formulas, the
model's own plain forward, and the evaluation harness's option log-likelihood."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import parallel_items, run_on_8_devices
from jaxlens.core.forward import forward
from jaxlens.kernels.lens import phrase_logprobs, target_logprobs
from jaxlens.data.items import Item
from jaxlens.data.templates import XCOPA_TEMPLATE
from jaxlens.methods.scoring import score_items, Scores
from jaxlens.methods import similarity as sim
from jaxlens.methods.answer_language import answer_language, phrase_logprob, summarize
from test_lens_kernel import make_case, reference


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))


# ---- the kernel: log softmax at target ids, chunked over the vocabulary ------------------------


@pytest.mark.parametrize("L,B,P,V,tied,softcap,chunk", [
    (3, 2, 4, 300, True, None, 64),     # the chunk does not divide V: a remainder chunk
    (2, 3, 1, 257, False, None, 300),   # one chunk larger than V
    (4, 1, 5, 128, True, 2.0, 32),      # Gemma 2's soft-cap
])
def test_target_logprobs_match_the_full_softmax(L, B, P, V, tied, softcap, chunk):
    config, params, resid, _ = make_case(3, L=L, B=B, P=P, V=V, tied=tied, softcap=softcap)
    targets = np.random.default_rng(1).integers(0, V, (B, P, 2)).astype(np.int32)
    got = np.asarray(target_logprobs(params, resid, targets, config=config, chunk=chunk))
    ref = reference(config, params, resid, k=1, targets=targets)
    want = np.take_along_axis(_log_softmax(ref["z"]), ref["target_index"], -1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_target_logprobs_stay_finite_where_the_probability_underflows():
    config, params, resid, _ = make_case(0, V=300)
    params = {**params, "embedding": params["embedding"] * 40}  # very peaked lens: many targets have p << 1e-38
    targets = np.arange(6, dtype=np.int32)
    got = np.asarray(target_logprobs(params, resid, targets, config=config, chunk=64))
    ref = reference(config, params, resid, k=1, targets=targets)
    want = np.take_along_axis(_log_softmax(ref["z"]), ref["target_index"], -1)
    assert np.isfinite(got).all() and got.min() < -200
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ---- phrases on a tiny random model -------------------------------------------------------------


def _left_padded(rng, B, T, lengths, phrase_lengths, vocab=128):
    tokens = rng.integers(3, vocab, (B, T)).astype(np.int32)
    mask = np.zeros((B, T), np.int32)
    target = np.zeros((B, T), bool)
    for b, (n, k) in enumerate(zip(lengths, phrase_lengths)):
        mask[b, T - n :] = 1
        target[b, T - k :] = True
    tokens[mask == 0] = 0
    return tokens, mask, target


def _naive_phrase(model, tokens, mask, target):
    """[L, B]: the full [L, B, T, V] lens in float64 from every layer's block output."""
    config, params = model.config, model.params
    _, sites = forward(params, tokens, mask, config=config, capture=("resid_post",))
    h = np.asarray(sites["resid_post"], np.float64)  # [L, B, T, D]
    scale = np.asarray(params["final_norm"]["scale"], np.float64)
    normed = h / np.sqrt((h * h).mean(-1, keepdims=True) + config.norm_eps) * ((1 + scale) if config.norm_plus_one else scale)
    W = np.asarray(params["embedding"], np.float64).T if config.tie_embeddings else np.asarray(params["unembed"], np.float64)
    logp = _log_softmax(normed @ W)  # [L, B, T, V]
    nxt = np.take_along_axis(logp[:, :, :-1], tokens[None, :, 1:, None].repeat(logp.shape[0], 0), -1)[..., 0]
    return np.where(target[None, :, 1:], nxt, 0.0).sum(-1)


@pytest.mark.parametrize("B,T,lengths,phrases,chunk", [
    (2, 12, (12, 7), (3, 5), 40),
    (3, 16, (16, 9, 4), (1, 6, 2), 128),
    (4, 8, (8, 8, 5, 2), (4, 1, 3, 1), 17),
])
def test_phrase_logprobs_equal_the_naive_full_lens(tiny, B, T, lengths, phrases, chunk):
    model, _, _ = tiny
    tokens, mask, target = _left_padded(np.random.default_rng(B), B, T, lengths, phrases)
    got = np.asarray(phrase_logprobs(model.params, tokens, mask, target, config=model.config, chunk=chunk))
    np.testing.assert_allclose(got, _naive_phrase(model, tokens, mask, target), atol=1e-5, rtol=1e-5)
    # Reading more positions than the longest phrase changes nothing.
    wide = np.asarray(phrase_logprobs(model.params, tokens, mask, target, config=model.config, width=T - 1, chunk=chunk))
    np.testing.assert_allclose(wide, got, atol=1e-5)


def test_last_layer_is_the_models_own_teacher_forced_logprob(tiny):
    model, _, _ = tiny
    tokens, mask, target = _left_padded(np.random.default_rng(7), 4, 16, (16, 11, 6, 9), (4, 7, 2, 5))
    logits, _ = forward(model.params, tokens, mask, config=model.config)
    logp = _log_softmax(np.asarray(logits))[:, :-1]  # [B, T-1, V]: position t predicts t + 1
    own = np.where(target[:, 1:], np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0], 0.0).sum(-1)
    got = np.asarray(phrase_logprobs(model.params, tokens, mask, target, config=model.config, chunk=50))
    np.testing.assert_allclose(got[-1], own, atol=1e-5, rtol=1e-6)


def test_phrase_logprob_of_texts_is_the_harness_option_loglikelihood(tiny):
    """Multi-token options after XCOPA prompts, left-padded batches of 2 rows: the last layer is the
    option log-likelihood `jaxlens eval` scores (same tokenization: prefix with BOS, phrase alone)."""
    model, _, _ = tiny
    items = parallel_items()
    template = XCOPA_TEMPLATE
    prefixes = [template.context_text(it) for it in items for _ in it.options]
    phrases = [template.option_text(o) for it in items for o in it.options]
    lp, n_tok = phrase_logprob(model, prefixes, phrases, batch_rows=2, chunk=50, progress=False)
    assert lp.shape == (8, model.config.n_layers) and n_tok.min() >= 2  # multi-token phrases
    scores = score_items(items, model.tokenizer, template=template, model=model, methods=("options",), progress=False)
    np.testing.assert_allclose(lp[:, -1], scores.ll.reshape(-1), atol=1e-5)
    # A letter is a phrase too: the lettered prompt, then " A".
    letter, _ = phrase_logprob(model, [template.lettered_text(items[0])], [" A"], progress=False)
    assert letter.shape == (1, model.config.n_layers) and np.isfinite(letter).all()


def test_phrase_errors_name_the_argument(tiny):
    model, _, _ = tiny
    tokens, mask, target = _left_padded(np.random.default_rng(0), 2, 8, (8, 5), (2, 3))
    with pytest.raises(ValueError, match="width=9"):
        phrase_logprobs(model.params, tokens, mask, target, config=model.config, width=9)
    with pytest.raises(ValueError, match="before the last width=2"):
        phrase_logprobs(model.params, tokens, mask, target, config=model.config, width=2)
    with pytest.raises(ValueError, match="chunk=0"):
        phrase_logprobs(model.params, tokens, mask, target, config=model.config, chunk=0)
    with pytest.raises(ValueError, match="mask and target"):
        phrase_logprobs(model.params, tokens, mask[:, 1:], target, config=model.config)
    with pytest.raises(ValueError, match="one phrase per prefix"):
        phrase_logprob(model, ["a", "b"], ["c"], progress=False)


# ---- linear CKA -----------------------------------------------------------------------------------


def _cka_direct(X, Y):
    """Kornblith et al.'s feature-space formula, transcribed: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    return np.linalg.norm(Yc.T @ Xc) ** 2 / (np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))


@pytest.mark.parametrize("seed", range(5))
def test_cka_properties_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n, d1, d2 = rng.integers(3, 40), rng.integers(2, 30), rng.integers(2, 30)
    X = rng.normal(size=(n, d1)) * rng.uniform(0.1, 10, d1) + rng.normal(size=d1)  # anisotropic, off-centre
    Y = X @ rng.normal(size=(d1, d2)) + rng.normal(size=(n, d2)) * rng.uniform(0, 3)
    cka = sim.linear_cka(X, Y)
    assert abs(cka - _cka_direct(X, Y)) < 1e-6
    assert 0 <= cka <= 1 + 1e-12
    assert abs(sim.linear_cka(X, X) - 1) < 1e-6 and abs(sim.linear_cka(Y, Y) - 1) < 1e-6
    Q1, _ = np.linalg.qr(rng.normal(size=(d1, d1)))
    Q2, _ = np.linalg.qr(rng.normal(size=(d2, d2)))
    for Xt, Yt in ((X @ Q1, Y), (X, Y @ Q2), (X * 7.5, Y), (X, Y * 0.01), (3 * X @ Q1 + 2.0, Y @ Q2)):
        assert abs(sim.linear_cka(Xt, Yt) - cka) < 1e-6
    # Not invariant to an anisotropic scaling: the test above could not pass by accident.
    S = np.diag(rng.uniform(0.01, 100, d1))
    assert abs(sim.linear_cka(X @ S, Y) - cka) > 1e-6 or d1 == 1


def test_cka_bootstrap_per_layer():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 4, 8))
    Q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    Y = X @ Q + rng.normal(size=(30, 4, 8)) * np.array([0.1, 1, 3, 10])[:, None]  # a rotation, then more noise per layer
    cka, lo, hi = sim.cka_bootstrap(X, Y, n_boot=200, block=64)
    np.testing.assert_allclose(cka, [_cka_direct(X[:, layer], Y[:, layer]) for layer in range(4)], atol=1e-6)
    assert (lo <= cka).all() and (cka <= hi).all() and (hi - lo > 0).all()
    assert (np.diff(cka) < 0).all()  # more noise, less similar
    with pytest.raises(ValueError, match="same items and layers"):
        sim.cka_bootstrap(X, Y[:5])
    with pytest.raises(ValueError, match="at least 2 rows"):
        sim.linear_cka(X[:1, 0], Y[:1, 0])


# ---- pooled states by reducers, and the similarity of parallel prompts ----------------------------


def test_prompt_states_equal_the_full_capture(tiny):
    model, _, _ = tiny
    texts = ["The man turned on the tap.", "Water.", "She lost her appetite. He poured milk."]
    states = sim.prompt_states(model, texts, batch_rows=2)
    for i, text in enumerate(texts):
        tokens, mask = model.encode([text])
        _, sites = forward(model.params, tokens, mask, config=model.config, capture=("resid_post",))
        h = np.asarray(sites["resid_post"], np.float64)[:, 0]  # [L, T, D]
        keep = np.arange(tokens.shape[1]) > 0  # the first token (here BOS) is left out of the mean
        np.testing.assert_allclose(states["last"][i], h[:, -1], atol=1e-5)
        np.testing.assert_allclose(states["mean"][i], h[:, keep].mean(1), atol=1e-5)


def test_similarity_of_parallel_prompts(tiny):
    model, _, _ = tiny
    en = ["The man turned on the tap.", "She lost her appetite.", "He poured milk.", "The toilet filled with water."]
    xx = ["A man turned the tap.", "She lost appetite.", "He poured water.", "The toilet filled."]
    X, Y = sim.prompt_states(model, xx), sim.prompt_states(model, en)
    out = sim.similarity(X, Y, n_boot=50)
    L = model.config.n_layers
    for pooling in sim.POOLINGS:
        for name in ("cka", "cos", "cos_centred"):
            mean, lo, hi = out[pooling][name]
            assert mean.shape == lo.shape == hi.shape == (L,) and (lo <= mean + 1e-12).all() and (mean <= hi + 1e-12).all()
        np.testing.assert_allclose(out[pooling]["cka"][0], [sim.linear_cka(X[pooling][:, layer], Y[pooling][:, layer])
                                                            for layer in range(L)], atol=1e-9)
    same = sim.similarity(Y, Y, n_boot=20)
    np.testing.assert_allclose(same["last"]["cka"][0], 1.0, atol=1e-6)
    np.testing.assert_allclose(same["mean"]["cos_centred"][0], 1.0, atol=1e-6)


# ---- which language the answer forms in ------------------------------------------------------------


def test_answer_language_reads_both_languages_after_the_query_prompt(tiny):
    model, _, _ = tiny
    items = parallel_items()
    en, xx = items[:2], items[2:]
    template = XCOPA_TEMPLATE
    reading = answer_language(model, xx, en, template, batch_rows=2, progress=False)
    L = model.config.n_layers
    assert reading.lang == "xx" and all(v.shape == (2, L) for v in reading.logp.values())
    # The last layer of the query-language options is the harness's log-likelihood of xx items.
    scores = score_items(xx, model.tokenizer, template=template, model=model, methods=("options",), progress=False)
    answer = np.array([it.answer for it in xx])
    np.testing.assert_allclose(reading.logp["correct_query"][:, -1], scores.ll[np.arange(2), answer], atol=1e-5)
    np.testing.assert_allclose(reading.logp["wrong_query"][:, -1], scores.ll[np.arange(2), 1 - answer], atol=1e-5)
    # The English options are read after the xx prompt, not after the English one.
    ctx = [template.context_text(it) for it in xx]
    want, n = phrase_logprob(model, ctx, [template.option_text(e.options[e.answer]) for e in en], progress=False)
    np.testing.assert_allclose(reading.logp["correct_en"], want, atol=1e-5)
    np.testing.assert_array_equal(reading.n_tokens["correct_en"], n)
    s = summarize(reading, n_boot=50)
    assert set(s["bands"]) == {"correct_query", "correct_en", "wrong_query", "wrong_en"}
    assert s["query_takes_over"] is None or 0 <= s["query_takes_over"] < L
    np.testing.assert_allclose(s["diff_en_minus_query"][0], (reading.per_token("correct_en") - reading.per_token("correct_query")).mean(0))
    with pytest.raises(ValueError, match="parallel English item"):
        answer_language(model, xx, [Item("9", "en", "x", ("a", "b"), 0, "cause")], template, progress=False)


# ---- on a mesh ----------------------------------------------------------------------------------------


@pytest.mark.slow  # a fresh 8-device process compiles every program again (~30 s)
def test_phrase_logprobs_on_an_8_device_mesh_equal_one_device(tiny):
    _, _, directory = tiny
    proc = run_on_8_devices("shared_space_mesh_check.py", directory, timeout=300)
    assert "phrase max diff" in proc


@pytest.mark.slow  # two models, each compiling its state, phrase and scoring programs (~40 s on 2 shared cores)
def test_shared_space_command_writes_one_report_for_several_models(tiny, tmp_path):
    import json

    from jaxlens.cli import main

    from conftest import build_hf_model, tiny_tokenizer

    _, _, directory = tiny
    other = tmp_path / "qwen3"  # qwen3 tiny, two blocks deep: relative depth lines them up
    build_hf_model("qwen3", num_hidden_layers=2).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    rows = [{"id": it.id, "lang": it.lang, "question": it.prompt, "options": list(it.options), "answer": it.answer}
            for it in parallel_items()]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["shared-space", "--models", f"{directory},{other}", "--items", str(data), "--n-boot", "20",
                 "--batch-rows", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "shared_space.json").read_text(encoding="utf-8"))
    assert [r["lang"] for r in summary["summary"]] == ["xx", "xx"]
    for name, layers in ((str(directory), 3), (str(other), 2)):
        entry = summary["per_model"][name]
        assert entry["n_layers"] == layers and entry["depth"][-1] == 1.0
        assert len(entry["langs"]["xx"]["similarity"]["last/cka"][0]) == layers
    for name in ("shared_space.csv", "shared_space.npz", "similarity.png", "answer_language.png", "answer_language_log.png",
                 "index.html"):
        assert (out / name).is_file(), name
    for bad in (["--models", " "], ["--models", f"{other},{other}"], ["--n-boot", "0"]):
        assert main(["shared-space", *bad, "--items", str(data), "--out", str(tmp_path / "o2")]) == 2


# ---- steering with a paired test per cell ------------------------------------------------------------


def test_mcnemar_exact_p():
    from math import comb

    from jaxlens.methods.steer import mcnemar_p

    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(4, 4) == 1.0
    assert mcnemar_p(10, 0) == mcnemar_p(0, 10) == 2 / 2**10
    assert abs(mcnemar_p(3, 9) - 2 * sum(comb(12, i) for i in range(4)) / 2**12) < 1e-15


def test_steer_summary_counts_gained_and_lost_items():
    from jaxlens.methods import steer

    items = [Item(str(i), lang, "q", ("a", "b"), 0) for lang in ("en", "xx") for i in range(6)]
    clean = Scores(ll=np.array([[1.0, 0.0]] * 6 + [[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3),
                      n_tokens=np.ones((12, 2)), n_chars=np.ones((12, 2)))
    # Point 0: unchanged. Point 1: xx gains its 3 wrong items and loses 1 right one.
    steered = np.stack([clean.ll, np.array([[1.0, 0.0]] * 6 + [[0.0, 1.0]] + [[1.0, 0.0]] * 5)])
    summary = steer.summarize(items, Scores(ll=steered, n_tokens=clean.n_tokens, n_chars=clean.n_chars), clean,
                              steer.grid([0], [0.0, 1.0]), n_boot=200)
    same, moved = summary["points"]
    assert (same["gained"], same["lost"], same["p_mcnemar"], same["accuracy_change"]) == (0, 0, 1.0, 0.0)
    assert (moved["gained"], moved["lost"]) == (3, 1) and abs(moved["accuracy_change"] - 2 / 6) < 1e-12
    assert moved["p_mcnemar"] == steer.mcnemar_p(3, 1) == 0.625
    assert moved["accuracy_change_lo"] <= moved["accuracy_change"] <= moved["accuracy_change_hi"]
