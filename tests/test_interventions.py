"""Interventions and reducers: each kind against a direct computation, composition order,
no recompilation on new values, vmap equals one-by-one, reducers equal slices of the capture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens.core import interventions as iv
from jaxlens.converters.families import config_from_hf
from jaxlens.core.forward import _forward, forward, init_params
from jaxlens.core.reducers import Take

L, B, T, D, F = 3, 2, 7, 32, 48


@pytest.fixture(scope="module")
def model():
    config = config_from_hf(dict(
        model_type="llama", hidden_size=D, intermediate_size=F, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
    ))
    params = init_params(config, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 64, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0  # row 1 left-padded
    return config, params, tokens, mask


def run(model, site, intervention=None):
    config, params, tokens, mask = model
    _, sites = forward(params, tokens, mask, config=config, capture=(site,), interventions=intervention)
    return np.asarray(sites[site], np.float64)


def rng(seed=1):
    return np.random.default_rng(seed)


def orthonormal(k, n, seed=2):
    q, _ = np.linalg.qr(rng(seed).standard_normal((n, k)))
    return q.T.astype(np.float32)  # [k, n]


# Each case: (site, intervention, the op in numpy on the clean value, the first layer it acts at,
# the positions it selects [B, T]).
def cases(mask):
    last = np.asarray(iv.last_token(mask))
    v = rng(3).standard_normal(D).astype(np.float32)
    per_seq = rng(4).standard_normal((B, D)).astype(np.float32)
    factor = rng(5).standard_normal(F).astype(np.float32)
    neurons = rng(6).random((L, F)) < 0.3
    means = rng(7).standard_normal((L, F)).astype(np.float32)
    basis = orthonormal(2, D)
    mean_dir = rng(8).standard_normal(D).astype(np.float32)
    P = basis.T @ basis
    everywhere = np.ones((B, T), bool)
    return {
        "add": ("resid_post", iv.add("resid_post", v, alpha=2.5, layers=1, positions=last),
                lambda x, l: x + 2.5 * v, 1, last),
        "add_per_sequence": ("attn_out", iv.add("attn_out", per_seq, layers=[0, 2]),
                             lambda x, l: x + per_seq[:, None], 0, everywhere),
        "scale": ("mlp_act", iv.scale("mlp_act", factor, layers=0, positions=last),
                  lambda x, l: x * factor, 0, last),
        "set": ("resid_mid", iv.set_to("resid_mid", per_seq, layers=2, positions=last),
                lambda x, l: np.broadcast_to(per_seq[:, None], x.shape), 2, last),
        "zero_ablate_neurons": ("mlp_act", iv.ablate("mlp_act", neurons),
                                lambda x, l: np.where(neurons[l], 0.0, x), 0, everywhere),
        "mean_ablate_neurons": ("mlp_hidden", iv.ablate("mlp_hidden", neurons, mean=means),
                                lambda x, l: np.where(neurons[l], means[l], x), 0, everywhere),
        "project_out": ("resid_post", iv.project_out("resid_post", basis, layers=0),
                        lambda x, l: x - x @ P, 0, everywhere),
        "mean_ablate_direction": ("resid_pre", iv.project_out("resid_pre", basis[:1], mean=mean_dir, layers=1),
                                  lambda x, l: x - (x - mean_dir) @ (basis[:1].T @ basis[:1]), 1, everywhere),
        "project_onto": ("mlp_out", iv.project_onto("mlp_out", basis, layers=2, positions=last),
                         lambda x, l: x @ P, 2, last),
    }


@pytest.mark.parametrize("kind", ["add", "add_per_sequence", "scale", "set", "zero_ablate_neurons",
                                  "mean_ablate_neurons", "project_out", "mean_ablate_direction", "project_onto"])
def test_each_kind_equals_its_direct_computation(model, kind):
    site, intervention, op, layer, positions = cases(model[3])[kind]
    clean, changed = run(model, site), run(model, site, intervention)
    # Before the intervened layer nothing moves; at it, the selected entries are op(clean value).
    np.testing.assert_array_equal(changed[:layer], clean[:layer])
    expected = np.where(positions[..., None], op(clean[layer], layer), clean[layer])
    np.testing.assert_allclose(changed[layer], expected, atol=2e-5, rtol=1e-5)
    assert np.abs(run(model, "resid_post", intervention) - run(model, "resid_post")).max() > 1e-3


def test_set_to_the_captured_value_is_the_identity(model):
    config, params, tokens, mask = model
    for site in iv.INTERVENABLE_SITES:
        clean_logits, sites = forward(params, tokens, mask, config=config, capture=(site,))
        logits, _ = forward(params, tokens, mask, config=config, interventions=iv.patch(site, sites[site]))
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(clean_logits))


def test_composition_applies_left_first(model):
    _, _, _, mask = model
    v = rng(9).standard_normal(D).astype(np.float32)
    add = iv.add("resid_post", v, alpha=1.0, layers=1)
    double = iv.scale("resid_post", 2.0, layers=1)
    clean = run(model, "resid_post")[1]
    np.testing.assert_allclose(run(model, "resid_post", add | double)[1], 2 * (clean + v), atol=1e-4)
    np.testing.assert_allclose(run(model, "resid_post", double | add)[1], 2 * clean + v, atol=1e-4)
    # compose flattens, skips None, and is again a pytree that jit accepts.
    composed = iv.compose(add, None, iv.compose(double))
    assert len(composed.items) == 2 and len(jax.tree.leaves(composed)) > 0
    with pytest.raises(TypeError, match="cannot compose"):
        iv.compose(add, "not an intervention")


def test_new_values_do_not_recompile(model):
    config, params, tokens, mask = model
    _forward.clear_cache()
    for seed in range(4):
        r = rng(seed)
        positions = np.asarray(iv.at_positions(r.integers(0, T, B), T))
        steer = iv.add("resid_post", r.standard_normal(D), alpha=float(r.random()), layers=int(r.integers(0, L)),
                       positions=positions)
        forward(params, tokens, mask, config=config, interventions=steer)
    assert _forward._cache_size() == 1


def test_vmap_over_a_stack_equals_one_by_one(model):
    config, params, tokens, mask = model
    last = iv.last_token(mask)
    sweep = [iv.add("resid_post", rng(s).standard_normal(D), alpha=a, layers=l, positions=last)
             for s, (l, a) in enumerate([(0, 1.0), (1, -2.0), (2, 4.0), (1, 0.5)])]
    batched = jax.jit(jax.vmap(lambda one: forward(params, tokens, mask, config=config, interventions=one)[0]))
    logits = np.asarray(batched(iv.stack(sweep)))
    for i, one in enumerate(sweep):
        np.testing.assert_allclose(logits[i], np.asarray(forward(params, tokens, mask, config=config, interventions=one)[0]), atol=1e-5)


def test_transplant_a_pass_into_itself_at_the_same_layer_changes_nothing(model):
    config, params, tokens, mask = model
    logits, sites = forward(params, tokens, mask, config=config, capture=("mlp_out",))
    last = iv.last_token(mask)
    source = iv.gather(sites["mlp_out"], last)  # [L, B, D]
    for layer in range(L):
        same, _ = forward(params, tokens, mask, config=config, interventions=iv.transplant("mlp_out", source[layer], layer, last))
        np.testing.assert_array_equal(np.asarray(same), np.asarray(logits))
    moved, _ = forward(params, tokens, mask, config=config, interventions=iv.transplant("mlp_out", source[0], 2, last))
    assert np.abs(np.asarray(moved) - np.asarray(logits)).max() > 1e-4


def test_positions_helpers():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(iv.last_index(mask)), [4, 2])
    np.testing.assert_array_equal(np.asarray(iv.last_token(mask)), [[0, 0, 0, 0, 1], [0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(iv.at_positions([[1, 3], [0, -1]], 5)), [[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(iv.span([1, 0], [3, 1], 5)), [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    cache = np.arange(2 * 5 * 2, dtype=np.float32).reshape(2, 5, 2)
    np.testing.assert_allclose(np.asarray(iv.gather(cache, iv.span([1, 0], [3, 1], 5))), [[3, 4], [10, 11]])  # span means


def test_reducer_take_equals_the_captured_slice_and_stores_only_it(model):
    config, params, tokens, mask = model
    index = jnp.asarray([[6, 2], [6, 4]])
    _, sites = forward(params, tokens, mask, config=config, capture=("resid_post",), reducers={"at": Take("resid_post", index)})
    expected = np.take_along_axis(np.asarray(sites["resid_post"]), np.asarray(index)[None, :, :, None], axis=2)
    np.testing.assert_array_equal(np.asarray(sites["at"]), expected)
    compiled = _forward.lower(params, jnp.asarray(tokens), jnp.asarray(mask), config, (), None, {"at": Take("resid_post", index)}).compile()
    bare = _forward.lower(params, jnp.asarray(tokens), jnp.asarray(mask), config, ()).compile()
    extra = compiled.memory_analysis().output_size_in_bytes - bare.memory_analysis().output_size_in_bytes
    assert L * B * 2 * D * 4 <= extra <= L * B * 2 * D * 4 + 64


def test_bad_interventions_and_reducers_are_named(model):
    config, params, tokens, mask = model
    with pytest.raises(ValueError, match="cannot intervene at site 'logits'"):
        iv.add("logits", np.ones(D))
    with pytest.raises(ValueError, match="positions must be a bool mask"):
        iv.add("resid_post", np.ones(D), positions=np.array([1, 2]))
    with pytest.raises(ValueError, match="value must be"):
        iv.set_to("resid_post", np.ones((1, 1, 1, D)))
    with pytest.raises(ValueError, match="stack needs interventions of one kind"):
        iv.stack([iv.add("resid_post", np.ones(D)), iv.add("resid_post", np.ones(D), layers=1)])
    with pytest.raises(ValueError, match="is a site name"):
        forward(params, tokens, mask, config=config, reducers={"resid_post": Take("resid_post", jnp.zeros((B, 1), int))})
    with pytest.raises(ValueError, match="reducers read a layer site"):
        forward(params, tokens, mask, config=config, reducers={"x": Take("logits", jnp.zeros((B, 1), int))})
