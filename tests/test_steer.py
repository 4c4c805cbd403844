"""Steering: vectors are the mean English-minus-language state; every grid point's scores equal the
evaluation harness with that `add` intervention in a plain forward; alpha 0 is the unsteered run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import parallel_items
from jaxlens.data.templates import XCOPA_TEMPLATE
from jaxlens.methods.scoring import score_items
from jaxlens.core import interventions as iv
from jaxlens.methods import steer
from jaxlens.core.forward import forward
from jaxlens.methods.states import last_token_states

ITEMS = parallel_items()


def test_language_vectors_are_the_mean_difference(tiny):
    model, _, _ = tiny
    template = XCOPA_TEMPLATE
    v = steer.language_vectors(model, ITEMS, template, method="options")
    en = last_token_states(model, [template.context_text(i) for i in ITEMS[:2]])
    xx = last_token_states(model, [template.context_text(i) for i in ITEMS[2:]])
    assert set(v) == {"xx"}
    np.testing.assert_allclose(v["xx"], en.mean(1) - xx.mean(1), atol=1e-5)
    with pytest.raises(ValueError, match="no 'en' items"):
        steer.language_vectors(model, ITEMS[2:], template)

@pytest.mark.parametrize("positions,method", [("all", "options"), ("last", "letters")])
def test_grid_points_equal_the_harness_with_the_intervention(tiny, positions, method):
    model, _, _ = tiny
    template = XCOPA_TEMPLATE
    L, D = model.config.n_layers, model.config.d_model
    vectors = {"xx": np.random.default_rng(0).standard_normal((L, D)).astype(np.float32)}
    points = steer.grid([0, L - 1], [0.0, 2.0])
    scores = steer.steer_scores(model, ITEMS, template, vectors, points, positions=positions, method=method, progress=False)
    key = "ll" if method == "options" else "letter"
    methods = (method,)
    clean = score_items(ITEMS, model.tokenizer, template=template, model=model, methods=methods, progress=False)
    for g, (layer, alpha) in enumerate(points):
        def forward_fn(tokens, mask, batch, layer=int(layer), alpha=float(alpha)):
            lang_rows = np.array([ITEMS[i].lang == "xx" if i >= 0 else False for i in batch.item])
            vector = np.where(lang_rows[:, None], vectors["xx"][layer], 0.0)  # [R, D]
            at = iv.at_positions(batch.prompt_last, tokens.shape[1]) if positions == "last" else np.asarray(mask, bool)
            add = iv.add("resid_post", vector, alpha, layers=layer, positions=at)
            return forward(model.params, tokens, mask, config=model.config, interventions=add)[0]
        direct = score_items(ITEMS, model.tokenizer, forward_fn, template, model=model, methods=methods, progress=False)
        np.testing.assert_allclose(getattr(scores, key)[g], getattr(direct, key), atol=2e-4)
        if alpha == 0:
            np.testing.assert_allclose(getattr(scores, key)[g], getattr(clean, key), atol=2e-4)
        # English rows are never steered.
        np.testing.assert_allclose(getattr(scores, key)[g][:2], getattr(clean, key)[:2], atol=2e-4)
    summary = steer.summarize(ITEMS, scores, clean, points)
    assert {(r["layer"], r["alpha"]) for r in summary["points"]} == {(0, 0.0), (0, 2.0), (L - 1, 0.0), (L - 1, 2.0)}
    assert all(r["accuracy_change"] == 0 for r in summary["points"] if r["alpha"] == 0)

def test_bad_grid_is_named(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="out of range"):
        steer.steer_scores(model, ITEMS, XCOPA_TEMPLATE, {"xx": np.zeros((model.config.n_layers, model.config.d_model))},
                           steer.grid([99], [1.0]), progress=False)
    with pytest.raises(ValueError, match="positions must be"):
        steer.steer_scores(model, ITEMS, XCOPA_TEMPLATE, {}, steer.grid([0], [1.0]), positions="first", progress=False)

def test_cli_end_to_end(tiny, tmp_path):
    from jaxlens.cli import main

    _, _, directory = tiny
    data = tmp_path / "mc.jsonl"
    rows = [{"id": i, "lang": lang, "question": f"The man {w}.", "options": ["Water.", "Milk."], "answer": i % 2}
            for lang, w in (("en", "turned"), ("xx", "poured")) for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "steer"
    assert main(["steer", "--model", str(directory), "--data", str(data), "--langs", "xx", "--layers", "0,1",
                 "--alphas", "1,4", "--vector-items", "3", "--limit", "3", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"summary.json", "vectors.npz", "accuracy_change.png", "index.html"}
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["points"]) == 4 and set(summary["best"]) == {"xx"}


def broadcast_steering_stack(vectors, points, positions=None, site="resid_post"):
    """The construction before the vectors were shared (the reference): every point carries all
    L vectors, [G, L, R, 1, D]."""
    import jax
    import jax.numpy as jnp

    per_layer = jnp.swapaxes(jnp.asarray(vectors), 0, 1)
    return jax.vmap(lambda layer, alpha: iv.add(site, per_layer, alpha, layers=layer, positions=positions, per_layer=True))(
        jnp.asarray(points[:, 0], jnp.int32), jnp.asarray(points[:, 1], jnp.float32))


@pytest.mark.parametrize("layers,alphas,chunk", [([1], [2.0], None), ([0, 1], [-3.0, 0.0, 1.5], 4), ([1, 0, 1], [0.5, 4.0], 1)])
def test_shared_vectors_equal_the_broadcast_stack(tiny, layers, alphas, chunk):
    """The points carry (layer, alpha) only, the vectors once: the scores are bitwise those of the
    stack that copies every layer's vectors into every point, full passes and the KV tail."""
    import jax

    from conftest import random_tokens
    from jaxlens.methods.sweep import run_stack, score_options

    model, _, _ = tiny
    cfg = model.config
    R, T, tail = 3, 12, 2
    tokens, mask = random_tokens(1, (R, T)), np.ones((R, T), np.int32)
    mask[1, :4] = 0
    vectors = np.random.default_rng(2).standard_normal((R, cfg.n_layers, cfg.d_model)).astype(np.float32)
    points = steer.grid(layers, alphas)
    target = np.ones((R, tail), np.int32)
    new = steer.steering_stack(vectors, points, np.asarray(mask, bool))
    assert sum(a.size for a in jax.tree.leaves(new.each)) == 2 * len(points)  # per point: a layer and an alpha
    for stack, old, tail_only in ((new, broadcast_steering_stack(vectors, points, np.asarray(mask, bool)), False),
                                  (steer.steering_stack(vectors, points, np.ones((R, tail), bool)),
                                   broadcast_steering_stack(vectors, points, np.ones((R, tail), bool)), True)):
        got, want = (np.asarray(run_stack(model.params, tokens, mask, s, (tokens, target), config=cfg, tail=tail,
                                          score=score_options, tail_only=tail_only, chunk=chunk)) for s in (stack, old))
        np.testing.assert_array_equal(got, want)
        assert got.shape == (len(points), R) and np.isfinite(got).all()


def test_auto_chunk_budgets_what_a_point_holds():
    """The chunk counts each point's activations, KV cache and stack arrays, not only its logits:
    it shrinks as d_model or the re-run length T grows, or a cache is carried; tiny points hit the cap."""
    from jaxlens.core.config import ModelConfig
    from jaxlens.methods.sweep import auto_chunk, point_bytes

    def chunk(d_model=64, T=16, cache=0, tail_only=False):
        cfg = ModelConfig(family="test", vocab_size=1000, d_model=d_model, n_layers=32, n_heads=8, n_kv_heads=8,
                          head_dim=d_model // 8, d_ff=4 * d_model, max_positions=8192)
        live = point_bytes(cfg, 8, 1 if tail_only else T, T, cache=cache)
        return auto_chunk(8, 1, cfg.vocab_size, tail_only, live=live)

    assert chunk() == 8 and chunk(tail_only=True) == 32  # small points: the caps
    assert chunk(d_model=4096, T=64) < chunk(d_model=1024, T=64) < 8
    assert chunk(d_model=1024, T=1024) < chunk(d_model=1024, T=128) < 8
    assert chunk(d_model=1024, T=8, cache=4096, tail_only=True) < chunk(d_model=1024, T=8, tail_only=True)
    assert chunk(d_model=8192, T=4096) == 1  # never 0
    # The formula's terms, checked by hand for one point: activations, scores and probs, KV cache.
    cfg = ModelConfig(family="test", vocab_size=10, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8,
                      d_ff=32, max_positions=64, attn_block=4)
    assert point_bytes(cfg, 3, 5, 20, cache=7) == 3 * 5 * (6 * 16 + 4 * 32) * 4 + 2 * 3 * 2 * 5 * 4 * 4 + 2 * 2 * 3 * 7 * 1 * 8 * 4
