"""Capture costs what it captures: nothing for no sites, [L, B, T, D] for resid_post, no more."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlens.core.forward import _forward, init_params
from jaxlens.converters.families import config_from_hf


@pytest.fixture(scope="module")
def small():
    config = config_from_hf(dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
    ))
    return config, init_params(config, jax.random.key(0))


def compiled_memory(config, params, capture, B=2, T=32):
    tokens = jnp.zeros((B, T), jnp.int32)
    mask = jnp.ones((B, T), jnp.int32)
    return _forward.lower(params, tokens, mask, config, capture).compile().memory_analysis()


def test_capture_costs_exactly_its_output(small):
    config, params = small
    bare = compiled_memory(config, params, ())
    resid = compiled_memory(config, params, ("resid_post",))
    L, B, T, D = config.n_layers, 2, 32, config.d_model
    extra = resid.output_size_in_bytes - bare.output_size_in_bytes
    # Exactly the captured array, plus the output tuple's table of buffer pointers (8 bytes each).
    assert L * B * T * D * 4 <= extra <= L * B * T * D * 4 + 64
    # Scratch memory does not grow with the capture (XLA may reuse buffers, never need more).
    assert resid.temp_size_in_bytes <= bare.temp_size_in_bytes + L * B * T * D * 4


def test_no_capture_compiles_to_the_same_program_as_logits_only(small):
    config, params = small
    tokens = jnp.zeros((2, 8), jnp.int32)
    mask = jnp.ones((2, 8), jnp.int32)
    a = _forward.lower(params, tokens, mask, config, ()).as_text()
    b = _forward.lower(params, tokens, mask, config, ("logits",)).as_text()
    assert a.count("dot_general") == b.count("dot_general")
    logits_a, sites_a = _forward(params, tokens, mask, config, ())
    logits_b, sites_b = _forward(params, tokens, mask, config, ("logits",))
    assert sites_a == {} and set(sites_b) == {"logits"}
    np.testing.assert_array_equal(np.asarray(logits_a), np.asarray(sites_b["logits"]))
