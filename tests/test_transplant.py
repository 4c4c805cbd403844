"""XTransplant sweep: every pair equals a full pass with that transplant; i -> i is the identity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens import interventions as iv
from jaxlens import transplant as xt
from jaxlens.converters.families import config_from_hf
from jaxlens.models import forward, init_params

L = 3


@pytest.fixture(scope="module")
def setup():
    config = config_from_hf(dict(model_type="gemma3_text", hidden_size=32, intermediate_size=48, num_hidden_layers=L,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64,
                                 max_position_embeddings=32, sliding_window=4, query_pre_attn_scalar=16,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"]))
    params = init_params(config, jax.random.key(2))
    rng = np.random.default_rng(0)
    target = rng.integers(0, 64, (3, 10)).astype(np.int32)
    tmask = np.ones_like(target)
    tmask[1, :3] = 0
    src = rng.integers(0, 64, (3, 8)).astype(np.int32)
    smask = np.ones_like(src)
    smask[2, :2] = 0
    source = xt.source_states(params, src, smask, config=config)
    return config, params, target, tmask, source


def last_logits(logits, _):
    return logits[:, -1]


def option_logits(logits, _):
    return logits


def test_source_states_are_the_last_token_mlp_out(setup):
    config, params, _, _, _ = setup
    src = np.random.default_rng(0).integers(0, 64, (3, 8)).astype(np.int32)
    smask = np.ones_like(src)
    smask[2, :2] = 0
    _, sites = forward(params, src, smask, config=config, capture=("mlp_out",))
    np.testing.assert_array_equal(np.asarray(xt.source_states(params, src, smask, config=config)),
                                  np.swapaxes(np.asarray(sites["mlp_out"][:, :, -1]), 0, 1))


@pytest.mark.parametrize("tail", [1, 3])
def test_every_pair_equals_a_full_pass(setup, tail):
    config, params, target, tmask, source = setup
    T = target.shape[1]
    prompt_last = np.full(3, T - tail)  # the scored positions follow the last prompt token
    pairs = xt.all_pairs(L)
    got = np.asarray(xt.sweep(params, target, tmask, source, prompt_last, pairs, config=config, tail=tail,
                              score=option_logits, chunk=4))  # 9 pairs: chunks padded
    at = iv.at_positions(prompt_last, T)
    for p, (i, j) in enumerate(pairs):
        full, _ = forward(params, target, tmask, config=config, interventions=iv.transplant("mlp_out", source[:, i], j, at))
        np.testing.assert_allclose(got[p], np.asarray(full[:, T - tail:]), atol=3e-5)
    loop = np.asarray(xt.sweep_loop(params, target, tmask, source, prompt_last, pairs[:3], config=config, tail=tail, score=option_logits))
    np.testing.assert_allclose(loop, got[:3], atol=3e-5)


def test_a_pass_transplanted_into_itself_at_the_same_layer_changes_nothing(setup):
    config, params, target, tmask, _ = setup
    own = xt.source_states(params, target, tmask, config=config)
    clean, _ = forward(params, target, tmask, config=config)
    diagonal = np.stack([np.arange(L), np.arange(L)], -1).astype(np.int32)
    got = np.asarray(xt.sweep(params, target, tmask, own, np.full(3, target.shape[1] - 1), diagonal, config=config,
                              tail=1, score=last_logits))
    for layer in range(L):
        np.testing.assert_allclose(got[layer], np.asarray(clean[:, -1]), atol=3e-5)
