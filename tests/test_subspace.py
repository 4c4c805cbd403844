"""Lens subspaces: LSAR against a column-form numpy transcription of the paper's steps, its closed
form at rank K-1, reducer means against captured states, the artifact round trip, the errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_on_8_devices

from jaxlens.methods import subspace as ss
from jaxlens.core.forward import forward

PROMPTS = {
    "en": ["The man went home.", "She lost her keys.", "It rained all day."],
    "xx": ["A man home went.", "Keys she lost."],
    "yy": ["Rain day all it.", "Went he.", "Lost keys her she.", "Home."],
}


def transcription(W, r):
    """The issue's steps verbatim, in column form: W [d, L] with one language mean per column."""
    d, L = W.shape
    one = np.ones(L)
    wc = W @ one / L
    U, S, Vt = np.linalg.svd(W - np.outer(wc, one), full_matrices=False)
    Wp = np.outer(wc, one) + U[:, :r] @ np.diag(S[:r]) @ Vt[:r]
    a = np.linalg.pinv(Wp).T @ one
    a = a / np.linalg.norm(a) ** 2
    U2, _, _ = np.linalg.svd(Wp - np.outer(a, one), full_matrices=False)
    return a, U2[:, :r]


def projector(rows):
    q, _ = np.linalg.qr(np.asarray(rows).T)
    return q @ q.T


@pytest.mark.parametrize("K,D,rank", [(2, 16, None), (7, 64, None), (7, 64, 3)])
def test_lsar_equals_the_transcription(K, D, rank):
    W = np.random.default_rng(K + D).standard_normal((K, D)) + 3.0
    a, M, _ = ss.lsar(W, rank)
    a_ref, M_ref = transcription(W.T, K - 1 if rank is None else rank)
    np.testing.assert_allclose(a, a_ref, atol=1e-6)
    # Singular vectors are defined up to sign (and rotation within ties): compare the spanned spaces.
    np.testing.assert_allclose(projector(M), M_ref @ M_ref.T, atol=1e-6)
    np.testing.assert_allclose(M @ M.T, np.eye(M.shape[0]), atol=1e-10)


def test_closed_form_at_full_rank():
    W = np.random.default_rng(1).standard_normal((5, 32)) + 1.0
    a, M, _ = ss.lsar(W)
    diffs = W[1:] - W[0]
    np.testing.assert_allclose(projector(M), projector(diffs), atol=1e-8)  # M_s spans m_k - m_en
    np.testing.assert_allclose(M @ a, 0, atol=1e-8)  # a ⊥ M_s
    residual = (a - W[0]) - projector(diffs) @ (a - W[0])
    np.testing.assert_allclose(residual, 0, atol=1e-8)  # a lies on the affine hull of the means
    # ... and is its nearest point to the origin: any other hull point is farther.
    other = W[0] + np.random.default_rng(2).standard_normal(4) @ diffs
    assert np.linalg.norm(other) > np.linalg.norm(a)


def test_lsar_is_not_trivially_the_mean():
    """A transcription mismatch must be visible: a is not the centroid direction in general."""
    W = np.random.default_rng(3).standard_normal((4, 8)) + 1.0
    a, _, _ = ss.lsar(W)
    c = W.mean(0)
    assert abs(a @ c / np.linalg.norm(a) / np.linalg.norm(c)) < 0.999


@pytest.mark.parametrize("last_norm", [True, False])
def test_reducer_means_equal_means_of_captured_states(tiny, last_norm):
    model, _, _ = tiny
    probe = ss.probe_prompts(model, PROMPTS, last_norm=last_norm, batch_rows=4)
    L = model.config.n_layers
    for k, (lang, texts) in enumerate(PROMPTS.items()):
        ref = []
        for text in texts:  # one prompt at a time, no padding: the independent path
            tokens, mask = model.encode([text])
            _, sites = forward(model.params, tokens, mask, config=model.config, capture=("resid_post", "final_norm"))
            h = np.array(sites["resid_post"][:, 0, -1])  # [L, D]
            if last_norm:
                h[-1] = np.asarray(sites["final_norm"][0, -1])
            ref.append(h)
        np.testing.assert_allclose(probe.means[:, k], np.mean(ref, 0), atol=2e-5)
        assert probe.counts[k] == len(texts)
    assert probe.means.shape == (L, 3, model.config.d_model)
    states = ss.prompt_states(model, PROMPTS["en"], last_norm=last_norm, batch_rows=2)
    np.testing.assert_allclose(states.mean(1), probe.means[:, 0], atol=2e-5)


def test_fit_save_load(tiny, tmp_path):
    model, _, _ = tiny
    probe = ss.probe_prompts(model, PROMPTS, batch_rows=4, meta={"model": "tiny", "template": "{text}"})
    sub = ss.fit(probe)
    L, D = model.config.n_layers, model.config.d_model
    assert sub.basis.shape == (L, 2, D) and sub.agnostic.shape == (L, D) and sub.delta.shape == (L, 3, D)
    np.testing.assert_allclose(sub.delta[:, 0], 0)
    for l in range(L):  # δ_k = mean P_s h_k - mean P_s h_en
        P = sub.basis[l].T @ sub.basis[l]
        np.testing.assert_allclose(sub.delta[l, 1], P @ probe.means[l, 1] - P @ probe.means[l, 0], atol=1e-8)
    sub.save(tmp_path / "s")
    back = ss.Subspace.load(tmp_path / "s")
    assert back.langs == sub.langs and back.rank == 2 and back.meta["model"] == "tiny"
    assert back.meta["corpus_sha256"] == ss.corpus_sha256(PROMPTS) and back.meta["last_norm"] is True
    for name in ("agnostic", "basis", "delta", "means", "spectrum", "counts"):
        np.testing.assert_array_equal(getattr(back, name), getattr(sub, name))


def test_errors_before_model_work():
    with pytest.raises(ValueError, match="at least 2 languages"):
        ss.check_prompts({"en": ["a"]})
    with pytest.raises(ValueError, match="no 'en' prompts"):
        ss.check_prompts({"zh": ["a"], "sw": ["b"]})
    with pytest.raises(ValueError, match="rank=3 must be"):
        ss.lsar(np.ones((3, 4)), rank=3)


# ---- interventions ------------------------------------------------------------------------------


def test_scale_along_op_matches_numpy(tiny):
    import jax.numpy as jnp

    from jaxlens.core import interventions as iv

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((8, 2)))[0].T.astype(np.float32)  # [2, 8] orthonormal rows
    P = basis.T @ basis
    for factor in (0.0, 0.5, 3.0):
        out = np.asarray(iv.scale_along("resid_post", basis, factor).apply(jnp.asarray(x), 0))
        np.testing.assert_allclose(out, x + (factor - 1) * x @ P, atol=1e-5)
    zero = iv.scale_along("resid_post", basis, 0.0).apply(jnp.asarray(x), 0)
    np.testing.assert_allclose(zero, iv.project_out("resid_post", basis).apply(jnp.asarray(x), 0), atol=1e-6)
    np.testing.assert_allclose(iv.scale_along("resid_post", basis, 1.0).apply(jnp.asarray(x), 0), x, atol=1e-6)


def _items():
    from conftest import parallel_items

    return parallel_items()


@pytest.fixture(scope="module")
def tiny_sub(tiny):
    model, _, _ = tiny
    prompts = {"en": PROMPTS["en"], "xx": PROMPTS["xx"], "yy": PROMPTS["yy"]}
    return ss.fit(ss.probe_prompts(model, prompts, batch_rows=4))


@pytest.mark.parametrize("kind,positions", [("shift", "all"), ("shift", "last"), ("project", "all"), ("scale", "last")])
def test_sweep_points_equal_the_harness_with_the_intervention(tiny, tiny_sub, kind, positions):
    from jaxlens.data.templates import XCOPA_TEMPLATE
    from jaxlens.methods.scoring import score_items
    from jaxlens.core import interventions as iv

    model, _, _ = tiny
    items, template = _items(), XCOPA_TEMPLATE
    sub = tiny_sub
    points = np.array([(0, 0.0 if kind != "scale" else 1.0), (1, 2.0), (0, -1.5)])
    scores = ss.steer_scores(model, items, template, sub, points, kind=kind, positions=positions, progress=False)
    clean = score_items(items, model.tokenizer, template=template, model=model, methods=("letters",), progress=False)
    for g, (layer, alpha) in enumerate(points):
        def forward_fn(tokens, mask, batch, layer=int(layer), alpha=float(alpha)):
            rows = np.array([sub.langs.index(items[i].lang) if i >= 0 and items[i].lang != "en" else -1 for i in batch.item])
            at = iv.at_positions(batch.prompt_last, tokens.shape[1]) if positions == "last" else np.asarray(mask, bool)
            P = {"shift": None, "project": sub.basis, "scale": sub.unit_agnostic()[:, None]}[kind]
            if kind == "shift":  # written out: x + alpha δ_k, per row, at `layer`
                vec = np.where((rows >= 0)[:, None], sub.delta[layer, np.maximum(rows, 0)], 0.0)
                op = iv.add("resid_post", vec.astype(np.float32), alpha, layers=layer, positions=at)
            else:
                factor = 1 - alpha if kind == "project" else alpha
                op = iv.scale_along("resid_post", P[layer].astype(np.float32), factor, layers=layer, positions=at)
            return forward(model.params, tokens, mask, config=model.config, interventions=op)[0]
        direct = score_items(items, model.tokenizer, forward_fn, template, model=model, methods=("letters",), progress=False)
        np.testing.assert_allclose(scores.letter[g], direct.letter, atol=2e-4)
        if g == 0:  # the identity point
            np.testing.assert_allclose(scores.letter[g], clean.letter, atol=2e-4)
        if kind == "shift":  # English rows are never shifted
            np.testing.assert_allclose(scores.letter[g][:2], clean.letter[:2], atol=2e-4)
    assert not np.allclose(scores.letter[1], clean.letter, atol=1e-3)  # the intervention does something


def test_steer_refuses_the_post_norm_layer(tiny, tiny_sub):
    from jaxlens.data.templates import XCOPA_TEMPLATE

    model, _, _ = tiny
    L = model.config.n_layers
    with pytest.raises(ValueError, match=f"layer {L - 1} was probed after the final norm"):
        ss.steer_scores(model, _items(), XCOPA_TEMPLATE, tiny_sub, np.array([(L - 1, 1.0)]), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        ss.steer_scores(model, _items(), XCOPA_TEMPLATE, tiny_sub, np.array([(L, 1.0)]), progress=False)


# ---- diagnostics --------------------------------------------------------------------------------


def _clusters(seed, n, L=2, D=12, K=3, spread=0.1):
    """Synthetic states {lang: [L, n, D]}: a shared part plus a language offset, and noise."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((L, n, D))
    offsets = np.random.default_rng(99).standard_normal((K, L, 1, D)) * 2
    return {lang: shared + offsets[k] + spread * rng.standard_normal((L, n, D)) for k, lang in enumerate(("en", "xx", "yy"))}


def _sub_of(states):
    probe = ss.Probe(tuple(states), np.stack([v.mean(1) for v in states.values()], 1), np.array([v.shape[1] for v in states.values()]),
                     {"english": "en"})
    return ss.fit(probe)


def test_language_id_and_cosines_on_synthetic_clusters():
    from jaxlens.methods import subspace_diag as sd

    fit_states, test_states = _clusters(0, 20), _clusters(1, 20)
    sub = _sub_of(fit_states)
    lid = sd.language_id(sub, fit_states, test_states)
    np.testing.assert_array_equal(lid["subspace"], 1.0)  # the offsets live in span(m_k - m_en)
    # In the complement the offsets are gone: language identity is at chance for a nearest mean.
    assert np.all(lid["complement_nearest"] < 0.6)
    assert np.all(lid["complement_probe"] < 0.6) and np.all(lid["full_probe"] > 0.95)
    cos = sd.english_cosine(sub, test_states)
    np.testing.assert_allclose(cos["before"][:, 0], 1.0)  # English with itself
    assert np.all(cos["after"][:, 1:] > cos["before"][:, 1:])  # removing M_s brings languages together
    var = sd.variance_explained(sub)
    np.testing.assert_allclose(var.sum(1), 1.0)
    assert np.all(var[:, -1] < 1e-20)


def test_ridge_probe_separates_linearly_separable_data():
    from jaxlens.methods import subspace_diag as sd

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 30))
    y = (x[:, 0] > 0).astype(int)
    xt = rng.standard_normal((200, 30))
    assert np.mean(sd.ridge_probe(x, y, xt, 2, lam=1e-3) == (xt[:, 0] > 0)) > 0.85


def test_principal_angles():
    from jaxlens.methods import subspace_diag as sd

    e = np.eye(4)
    np.testing.assert_allclose(sd.principal_angles(e[:2], e[:2]), [0, 0], atol=1e-6)
    np.testing.assert_allclose(sd.principal_angles(e[:1], e[1:2]), [90])
    r = np.array([[np.cos(0.3), np.sin(0.3), 0, 0]])
    np.testing.assert_allclose(sd.principal_angles(e[:1], r), [np.degrees(0.3)])


def test_diagnose_and_figures(tiny, tiny_sub, tmp_path):
    from jaxlens.methods import subspace_diag as sd

    model, _, _ = tiny
    fit_states = {lang: ss.prompt_states(model, PROMPTS[lang], batch_rows=4) for lang in tiny_sub.langs}
    diag = sd.diagnose(model, tiny_sub, fit_states, fit_states, k=3)
    L = model.config.n_layers
    assert diag.lid["subspace"].shape == (L,) and diag.angles.shape == (L - 1, 2)
    assert set(diag.tokens[L - 1]) == {"agnostic", "xx", "yy"} and len(diag.tokens[L - 1]["xx"]) == 3
    diag.save(tmp_path)
    names = sd.write_figures(tmp_path, diag)
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)


# ---- training -----------------------------------------------------------------------------------

TRAIN = {lang: [f"{w} {lang} {i}" for i, w in enumerate(["man home", "rain day", "keys lost", "she went", "all it", "day man",
                                                          "home rain", "lost she"])] for lang in ("en", "xx", "yy")}


def test_losses_match_a_direct_computation():
    import jax.numpy as jnp

    from jaxlens.methods import subspace_train as st

    rng = np.random.default_rng(0)
    K, B, D = 3, 4, 6
    h, h0, m, m0 = (rng.standard_normal((K, B, D)) for _ in range(4))
    basis = np.linalg.qr(rng.standard_normal((D, 2)))[0].T
    a = rng.standard_normal(D)
    a /= np.linalg.norm(a)
    delta = rng.standard_normal((K, D))
    total, parts = st.losses(*(jnp.asarray(x) for x in (h, m, h0, m0)), tuple(jnp.asarray(x) for x in (basis, a, delta)),
                             (1.0, 2.0, 3.0), 0.5)
    P, Pa = basis.T @ basis, np.outer(a, a)
    retain = np.mean((m[0] - m0[0]) ** 2)
    separate = sum(np.mean((h[k] @ P - h0[k] @ P - 0.5 * delta[k]) ** 2) for k in (1, 2))
    align = sum(np.mean((h[0] @ Pa - h[k] @ Pa) ** 2) for k in (1, 2))
    np.testing.assert_allclose([parts["retain"], parts["separate"], parts["align"]], [retain, separate, align], rtol=1e-5)
    np.testing.assert_allclose(total, retain + 2 * separate + 3 * align, rtol=1e-5)


@pytest.fixture(scope="module")
def trained(tiny, tiny_sub):
    from jaxlens.methods import subspace_train as st

    model, _, _ = tiny
    sub = ss.fit(ss.probe_prompts(model, TRAIN, batch_rows=8))
    cfg = st.TrainConfig(batch=4, lr=3e-3, epochs=10, warmup=0.1, accumulate=1)
    return sub, cfg, st.train(model, sub, TRAIN, config=cfg, progress=False)


def test_training_lowers_the_loss_and_keeps_frozen_layers_bitwise(tiny, trained):
    import jax

    from jaxlens.methods import subspace_train as st

    model, _, _ = tiny
    _, _, result = trained
    L = model.config.n_layers
    assert result.layers == tuple(st.default_layers(L)) == (L - 1,)
    total = result.log["total"]
    assert np.mean(total[-2:]) < 0.5 * np.mean(total[:2]), total
    merged = st.merge(model.params, result.trained, result.layers)
    for path, new in jax.tree_util.tree_leaves_with_path(merged):
        old = np.asarray(dict(jax.tree_util.tree_leaves_with_path(model.params))[path])
        new = np.asarray(new)
        if path[0].key == "layers":
            np.testing.assert_array_equal(new[: L - 1], old[: L - 1])  # below the trained layer: bitwise
        else:
            np.testing.assert_array_equal(new, old)  # embeddings, final norm: bitwise
    kernel = lambda p: np.asarray(p["layers"]["mlp"]["down"]["kernel"][L - 1])  # noqa: E731
    assert not np.array_equal(kernel(merged), kernel(model.params))


def test_switched_off_losses_are_logged_but_not_trained(tiny, trained):
    from jaxlens.methods import subspace_train as st

    model, _, _ = tiny
    sub, _, _ = trained
    cfg = st.TrainConfig(batch=4, lr=1e-3, weights=(0.0, 0.0, 1.0))
    result = st.train(model, sub, TRAIN, config=cfg, progress=False)
    np.testing.assert_allclose(result.log["total"], result.log["align"], rtol=1e-6)
    assert result.log["retain"][0] < 1e-10 and result.log["separate"][0] > 0  # first step: θ = θ0, so retain ~0
    acc = st.train(model, sub, TRAIN, config=st.TrainConfig(batch=2, accumulate=2, lr=1e-3), progress=False)
    assert len(acc.log["total"]) == 4


def test_delta_saves_only_trained_layers_and_loads(tiny, trained, tmp_path):
    import jaxlens
    from jaxlens.methods import subspace_train as st

    model, _, directory = tiny
    sub, cfg, result = trained
    st.save(tmp_path / "delta", result, model_name="tiny", config=model.config, train_config=cfg)
    meta = st.read_meta(tmp_path / "delta")
    assert meta["layers"] == [model.config.n_layers - 1] and len(meta["log"]["total"]) == 20
    back = jaxlens.load(str(directory), delta=tmp_path / "delta")
    tokens, mask = model.encode(["man home en"])
    want = forward(st.merge(model.params, result.trained, result.layers), tokens, mask, config=model.config)[0]
    got = back(tokens, mask)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.allclose(np.asarray(got), np.asarray(model(tokens, mask)[0]))


def test_training_errors(tiny, trained):
    from jaxlens.methods import subspace_train as st

    model, _, _ = tiny
    sub, _, _ = trained
    with pytest.raises(ValueError, match=r"trained layer\(s\) \[3\] outside"):
        st.train(model, sub, TRAIN, config=st.TrainConfig(layers=(3,)), progress=False)
    with pytest.raises(ValueError, match="must be parallel"):
        st.train(model, sub, {**TRAIN, "xx": TRAIN["xx"][:3]}, progress=False)
    with pytest.raises(ValueError, match="not in the subspace"):
        st.train(model, sub, {**TRAIN, "zz": TRAIN["xx"]}, progress=False)
    with pytest.raises(FileNotFoundError, match="not a subspace delta"):
        st.apply_delta(model, ".")


@pytest.mark.slow
def test_one_step_on_eight_devices_equals_one(tiny):

    _, _, directory = tiny
    run = run_on_8_devices("subspace_mesh_check.py", directory, timeout=600)
    assert "train step equal on one device and on both meshes" in run


# ---- CLI ----------------------------------------------------------------------------------------


def _jsonl(path, prompts):
    from jaxlens.report.io import write_jsonl

    write_jsonl(path, [{"id": i, "lang": l, "text": t} for l, v in prompts.items() for i, t in enumerate(v)])
    return str(path)


@pytest.mark.parametrize("argv,message", [
    (["probe", "--langs", "en", "--model", "/nonexistent"], "at least 2 languages"),
    (["probe", "--langs", "zh,sw", "--model", "/nonexistent"], "must include 'en'"),
    (["probe", "--langs", "en,zh", "--rank", "2", "--model", "/nonexistent"], "--rank 2 must be between 1 and"),
    (["train", "--space", "/nonexistent", "--layers", "-1", "--model", "/nonexistent"], "a trained layer outside the model"),
])
def test_cli_errors_before_loading(argv, message, tmp_path, capsys):
    from jaxlens import cli

    with pytest.raises(SystemExit, match=message):
        cli.main(["subspace", *argv, "--out", str(tmp_path / "o")])


def test_cli_probe_report_steer_train(tiny, tmp_path, capsys):
    from jaxlens import cli
    from jaxlens.methods import subspace_train as st

    model, _, directory = tiny
    data = _jsonl(tmp_path / "p.jsonl", {l: TRAIN[l] * 2 for l in TRAIN})
    space = tmp_path / "space"
    assert cli.main(["subspace", "probe", "--model", str(directory), "--data", data, "--langs", "en,xx,yy", "--fit", "10",
                     "--test", "6", "--out", str(space)]) == 0
    for name in ("subspace.npz", "subspace.json", "index.html", "lid.png", "summary.json"):
        assert (space / name).exists(), name
    assert cli.main(["subspace", "report", "--space", str(space), "--compare", str(space), "--data", data,
                     "--fit", "10", "--test", "6", "--out", str(tmp_path / "rep")]) == 0
    angles = json.loads((tmp_path / "rep" / "summary.json").read_text())["angles_to_compare"]
    np.testing.assert_allclose(angles, 0, atol=1e-3)  # a subspace with itself
    L = model.config.n_layers
    with pytest.raises(SystemExit, match=rf"outside the model's layers 0..{L - 1}"):
        cli.main(["subspace", "train", "--space", str(space), "--data", data, "--layers", str(L), "--out", str(tmp_path / "x")])
    assert cli.main(["subspace", "train", "--space", str(space), "--data", data, "--prompts", "16", "--batch", "4",
                     "--lr", "1e-3", "--out", str(tmp_path / "delta")]) == 0
    assert st.read_meta(tmp_path / "delta")["layers"] == [L - 1]
    assert "total loss" in capsys.readouterr().out

