"""Continuing from cached keys/values gives what one pass over all the tokens gives."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import _COMMON, TINY_CONFIGS
from jaxlens.core import interventions as iv
from jaxlens.converters.families import config_from_hf
from jaxlens.core.forward import forward, forward_cached, init_params

# Sliding windows shorter than the prompt (Gemma 3), ALiBi (BLOOM), learned positions (GPT-2),
# partial rotary and parallel residual (GPT-NeoX): positions and masks must continue across the
# cache boundary.
FAMILIES = ["llama", "gemma3_text", "bloom", "gpt2", "gpt_neox"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    from transformers import AutoConfig

    hf = AutoConfig.for_model(request.param, **{**_COMMON, **TINY_CONFIGS[request.param], "vocab_size": 64}).to_dict()
    config = config_from_hf(hf)
    return config, init_params(config, jax.random.key(1))


def test_continuing_a_cache_equals_one_pass(model):
    config, params = model
    tokens = np.random.default_rng(0).integers(0, 64, (3, 11)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    full, full_sites = forward(params, tokens, mask, config=config, capture=("resid_post",))
    for split in (1, 7):  # a one-token prefix; a prefix longer than the sliding window
        _, _, cache = forward_cached(params, tokens[:, :split], mask[:, :split], config=config)
        logits, sites, cache2 = forward_cached(params, tokens[:, split:], mask[:, split:], config=config, past=cache,
                                               capture=("resid_post",))
        real = mask[:, split:, None].astype(bool)
        np.testing.assert_allclose(np.where(real, logits, 0), np.where(real, full[:, split:], 0), atol=2e-5)
        np.testing.assert_allclose(np.asarray(sites["resid_post"]) * real, np.asarray(full_sites["resid_post"][:, :, split:]) * real, atol=2e-5)
        assert cache2.k.shape[2] == tokens.shape[1] and cache2.mask.shape == tokens.shape


def test_an_intervention_on_the_last_token_equals_it_in_one_pass(model):
    """The transplant trick: changing only the last position needs only the last position re-run."""
    config, params = model
    if config.family not in ("llama", "gemma3"):
        pytest.skip("one rope and one sliding-window family suffice here")
    tokens = np.random.default_rng(1).integers(0, 64, (2, 9)).astype(np.int32)
    mask = np.ones_like(tokens)
    vector = np.random.default_rng(2).standard_normal(config.d_model).astype(np.float32)
    last = iv.last_token(mask)
    full, _ = forward(params, tokens, mask, config=config, interventions=iv.add("mlp_out", vector, 3.0, layers=1, positions=last))
    _, _, cache = forward_cached(params, tokens[:, :-1], mask[:, :-1], config=config)
    one, _, _ = forward_cached(params, tokens[:, -1:], mask[:, -1:], config=config, past=cache,
                               interventions=iv.add("mlp_out", vector, 3.0, layers=1))
    np.testing.assert_allclose(one[:, 0], full[:, -1], atol=2e-5)


def test_cache_errors(model):
    config, params = model
    if config.family != "llama":
        pytest.skip("family-independent")
    tokens = np.zeros((2, 5), np.int32)
    _, _, cache = forward_cached(params, tokens, config=config)
    with pytest.raises(ValueError, match="past cache has batch 2"):
        forward_cached(params, np.zeros((3, 1), np.int32), config=config, past=cache)
    with pytest.raises(ValueError, match="exceed max_positions"):
        forward_cached(params, np.zeros((2, config.max_positions), np.int32), config=config, past=cache)
