"""The blocked (online-softmax) attention equals the reference path that materialises every score.

`attn_block=0` forces the reference; a small block (with a shorter last block) exercises the
blocked path on every variant the shared decoder has: GQA, sliding windows (per layer, with their
own rope), soft-capping, ALiBi, learned positions, left padding, and a KV prefix / cache.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxlens.core.config import ModelConfig, RopeConfig
from jaxlens.core.forward import forward, forward_cached, init_params

TOL = 1e-5

BASE = dict(family="test", vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
            d_ff=48, max_positions=256, attn_block=0)
VARIANTS = {  # variant -> (config switches, the [B, T] it is tested at)
    "gqa": (dict(), (2, 13)),
    "mha_bias": (dict(n_kv_heads=4, qkv_bias=True), (1, 40)),
    # Gemma 2/3-like: sliding layers with their own rope, soft-capped scores and logits
    "sliding_softcap": (dict(sliding_window=5, sliding_layers=(True, False, True), rope_local=RopeConfig(theta=100.0),
                             attn_softcap=0.5, final_softcap=2.0, query_scale=0.3), (3, 29)),
    "alibi": (dict(positions="alibi", norm="layer", n_kv_heads=4), (3, 7)),
    "learned_mqa": (dict(positions="learned", norm="layer", n_kv_heads=1, gated_mlp=False, activation="gelu"), (2, 21)),
}


def _setup(variant: str, seed: int = 0):
    reference = ModelConfig(**{**BASE, **VARIANTS[variant][0]})
    params = init_params(reference, jax.random.key(seed))
    # lecun init keeps the scores near 0, where every softmax looks alike: sharpen them.
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim == 4 else p, params)
    return reference, params


def _inputs(seed: int, shape, left_pad: bool):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, BASE["vocab_size"], size=shape).astype(np.int32)
    mask = np.ones(shape, np.int32)
    if left_pad:  # row b loses its first 2b tokens (the last row may be all but one padding)
        for b in range(shape[0]):
            mask[b, : min(2 * b, shape[1] - 1)] = 0
    return tokens, mask


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_blocked_attention_equals_reference(variant):
    reference, params = _setup(variant)
    shape = VARIANTS[variant][1]
    tokens, mask = _inputs(1 + shape[1], shape, left_pad=True)
    ref_logits, ref_sites = forward(params, tokens, mask, config=reference, capture=("resid_post",))
    for block in (4, shape[1] - 2):  # several blocks and a short last one; one block and a short one
        blocked = dataclasses.replace(reference, attn_block=block)
        logits, sites = forward(params, tokens, mask, config=blocked, capture=("resid_post",))
        assert float(np.max(np.abs(np.asarray(logits) - np.asarray(ref_logits)))) < TOL, (variant, shape, block)
        ref_resid = np.asarray(ref_sites["resid_post"])  # float32 rounding, relative to the stream's scale
        np.testing.assert_allclose(sites["resid_post"], ref_resid, atol=TOL * np.abs(ref_resid).max())


def test_capturing_attn_probs_takes_the_reference_path():
    """With `attn_probs` asked for, the scores are materialised (and the logits are the same)."""
    reference, params = _setup("sliding_softcap")
    tokens, mask = _inputs(3, (2, 12), left_pad=True)
    blocked = dataclasses.replace(reference, attn_block=4)
    logits, sites = forward(params, tokens, mask, config=blocked, capture=("attn_probs",))
    assert sites["attn_probs"].shape == (3, 2, 4, 12, 12)
    np.testing.assert_allclose(np.asarray(sites["attn_probs"]).sum(-1), 1.0, atol=1e-5)
    ref_logits, _ = forward(params, tokens, mask, config=reference)
    np.testing.assert_allclose(logits, ref_logits, atol=TOL)


@pytest.mark.parametrize("variant", ["sliding_softcap", "alibi"])
def test_blocked_attention_over_a_kv_prefix(variant):
    """Continuing a cache (cache part and new part read block by block) equals the reference, also
    when the new part is shorter than one block (a decode step's one token)."""
    reference, params = _setup(variant, seed=1)
    tokens, mask = _inputs(5, (2, 23), left_pad=True)
    full, _ = forward(params, tokens, mask, config=reference)
    for split in (17, 22):
        prefix, rest = slice(0, split), slice(split, 23)
        out = {}
        for block in (0, 4):
            cfg = dataclasses.replace(reference, attn_block=block)
            _, _, cache = forward_cached(params, tokens[:, prefix], mask[:, prefix], config=cfg)
            logits, _, _ = forward_cached(params, tokens[:, rest], mask[:, rest], config=cfg, past=cache)
            out[block] = np.asarray(logits)
        np.testing.assert_allclose(out[4], out[0], atol=TOL)
        np.testing.assert_allclose(out[4], np.asarray(full)[:, rest], atol=TOL)


@pytest.mark.parametrize("variant", ["gqa", "sliding_softcap", "alibi"])
def test_a_cache_in_parts_equals_one_pass(variant):
    """`past` as several parts read in order (a shared prefix, then a tail of its own) equals one
    pass, on both attention paths; `new_only` returns only the new tokens' keys/values."""
    reference, params = _setup(variant, seed=2)
    tokens, mask = _inputs(7, (3, 23), left_pad=True)
    full, _ = forward(params, tokens, mask, config=reference)
    a, b, rest = slice(0, 9), slice(9, 22), slice(22, 23)  # the tail part spans a window of 5 and a block of 4
    for block in (0, 4):
        cfg = dataclasses.replace(reference, attn_block=block)
        _, _, prefix = forward_cached(params, tokens[:, a], mask[:, a], config=cfg)
        _, _, tail = forward_cached(params, tokens[:, b], mask[:, b], config=cfg, past=prefix, new_only=True)
        assert tail.k.shape[2] == tail.mask.shape[1] == 13
        logits, _, last = forward_cached(params, tokens[:, rest], mask[:, rest], config=cfg, past=(prefix, tail))
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full)[:, rest], atol=TOL)
        assert last.k.shape[2] == 23  # without new_only: every part and the new tokens, joined


def test_attn_block_must_not_be_negative():
    with pytest.raises(ValueError, match="attn_block"):
        ModelConfig(**{**BASE, "attn_block": -1})
