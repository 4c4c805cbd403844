"""Greedy generation on the cache equals greedy decoding by full passes over the growing text."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import _COMMON, TINY_CONFIGS
from jaxlens.core import interventions as iv
from jaxlens.converters.families import config_from_hf
from jaxlens.runtime.batching import bucket
from jaxlens.methods.generate import generate, generate_text
from jaxlens.runtime.batching import text_batches
from jaxlens.core.forward import forward, forward_cached, init_params

# A sliding window shorter than prompt + generation (Gemma 3), ALiBi (BLOOM), learned positions (GPT-2).
FAMILIES = ["llama", "gemma3_text", "bloom", "gpt2"]
N_NEW = 6


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    from transformers import AutoConfig

    hf = AutoConfig.for_model(request.param, **{**_COMMON, **TINY_CONFIGS[request.param], "vocab_size": 64}).to_dict()
    config = config_from_hf(hf)
    return config, init_params(config, jax.random.key(3))


def naive_generate(params, config, prompt, n, intervention_at=None, make=None):
    """Greedy decoding by a full forward over the whole text each step (no cache). With `make`, the
    intervention make(at) acts at prompt position `intervention_at` in every one of those passes."""
    text, out = list(prompt), []
    for _ in range(n):
        tokens = np.array([text], np.int32)
        interventions = None if make is None else make(iv.at_positions(np.array([intervention_at]), len(text)))
        logits, _ = forward(params, tokens, config=config, interventions=interventions)
        out.append(int(np.argmax(logits[0, -1])))
        text.append(out[-1])
    return out


def test_generation_equals_full_passes_with_left_and_right_padding(model):
    config, params = model
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 64, n).tolist() for n in (7, 3, 5)]
    want = [naive_generate(params, config, p, N_NEW) for p in prompts]
    T = max(map(len, prompts))
    for side in ("left", "right"):
        tokens, mask = np.zeros((3, T), np.int32), np.zeros((3, T), np.int32)
        for r, p in enumerate(prompts):
            cols = slice(T - len(p), T) if side == "left" else slice(0, len(p))
            tokens[r, cols], mask[r, cols] = p, 1
        new, lengths = generate(params, tokens, mask, config=config, max_new_tokens=N_NEW)
        assert np.asarray(new).tolist() == want, side
        assert np.asarray(lengths).tolist() == [N_NEW] * 3


def test_an_intervention_acts_in_the_prefill_and_later_tokens_see_it(model):
    """A transplant-like `set` at the prompt's last token: the cached decode equals full passes that
    apply it at that position every time (and differs from the clean generation)."""
    config, params = model
    if config.family not in ("llama", "gemma3"):
        pytest.skip("one rope and one sliding-window family suffice here")
    prompt = np.random.default_rng(1).integers(0, 64, 6).tolist()
    value = 5 * np.random.default_rng(2).standard_normal((1, config.d_model)).astype(np.float32)
    make = lambda at: iv.set_to("mlp_out", value, layers=0, positions=at)  # noqa: E731
    want = naive_generate(params, config, prompt, N_NEW, intervention_at=len(prompt) - 1, make=make)
    tokens = np.array([prompt], np.int32)
    new, _ = generate(params, tokens, config=config, max_new_tokens=N_NEW, interventions=make(iv.last_token(np.ones_like(tokens))))
    assert np.asarray(new)[0].tolist() == want
    assert want != naive_generate(params, config, prompt, N_NEW)


def test_continuing_a_cached_prefix_equals_generating_from_the_whole_prompt(model):
    config, params = model
    if config.family not in ("llama", "gemma3"):
        pytest.skip("one rope and one sliding-window family suffice here")
    tokens = np.random.default_rng(6).integers(0, 64, (2, 7)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    whole, _ = generate(params, tokens, mask, config=config, max_new_tokens=N_NEW)
    _, _, cache = forward_cached(params, tokens[:, :5], mask[:, :5], config=config)
    rest, _ = generate(params, tokens[:, 5:], mask[:, 5:], config=config, max_new_tokens=N_NEW, past=cache)
    np.testing.assert_array_equal(np.asarray(rest), np.asarray(whole))
    with pytest.raises(ValueError, match="prompt length 7 \\+ max_new_tokens"):
        generate(params, tokens[:, 5:], config=config, max_new_tokens=config.max_positions - 6, past=cache)


def test_vmap_over_a_stack_of_interventions_equals_one_by_one(model):
    config, params = model
    if config.family != "llama":
        pytest.skip("family-independent")
    tokens = np.random.default_rng(3).integers(0, 64, (2, 5)).astype(np.int32)
    at = iv.last_token(np.ones_like(tokens))
    values = 4 * np.random.default_rng(4).standard_normal((3, 2, config.d_model)).astype(np.float32)
    points = [iv.set_to("mlp_out", v, layers=1, positions=at) for v in values]
    one_by_one = [np.asarray(generate(params, tokens, config=config, max_new_tokens=4, interventions=p)[0]) for p in points]
    stacked = jax.vmap(lambda p: generate(params, tokens, config=config, max_new_tokens=4, interventions=p)[0])(iv.stack(points))
    np.testing.assert_array_equal(np.asarray(stacked), np.stack(one_by_one))


def test_stops_at_eos_and_checks_lengths(model):
    config, params = model
    if config.family != "llama":
        pytest.skip("family-independent")
    tokens = np.random.default_rng(5).integers(0, 64, (2, 4)).astype(np.int32)
    free, _ = generate(params, tokens, config=config, max_new_tokens=5)
    eos = int(np.asarray(free)[0, 1])  # row 0's second token
    new, lengths = generate(params, tokens, config=config, max_new_tokens=5, eos_ids=[eos])
    new = np.asarray(new)
    assert int(lengths[0]) == 2 and (new[0, 1:] == eos).all()
    assert new[0, :2].tolist() == np.asarray(free)[0, :2].tolist()
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(params, tokens, config=config, max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds the model's max_positions"):
        generate(params, tokens, config=config, max_new_tokens=config.max_positions)


def test_generate_text_and_left_padding(tiny):
    model = tiny[0]
    texts = ["the cat sat", "a much longer prompt about the cat"]
    batch = text_batches(model, texts, rows=3)[0]
    tokens, mask = batch.tokens, batch.mask
    assert batch.index.tolist() == [0, 1, -1]
    assert tokens.shape[0] == 3 and mask[:, -1].all() and mask[2].sum() == 1 and mask[0, 0] == 0
    assert tokens.shape[1] == bucket(mask[1].sum())  # widened to a bucketed length: few compiled shapes
    out = generate_text(model, texts, max_new_tokens=3, batch_rows=2)
    eos = model.tokenizer.eos_token_id
    direct = []
    for t in texts:
        ids = naive_generate(model.params, model.config, model.tokenizer.encode(t), 3)
        ids = ids[: ids.index(eos) + 1] if eos in ids else ids
        direct.append(model.tokenizer.decode(ids, skip_special_tokens=True))
    assert out == direct


def test_prefill_unembeds_only_the_last_rows():
    """The prefill's first token reads one row per prompt: the compiled program never holds the
    [B, T, V] float32 logits (issue 13)."""
    import jax.numpy as jnp

    from jaxlens.core.config import ModelConfig
    from jaxlens.core.forward import param_shapes
    from jaxlens.methods.generate import decode

    config = ModelConfig(family="test", vocab_size=8192, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                         d_ff=48, max_positions=128)
    B, T = 2, 64
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    eos = jax.ShapeDtypeStruct((1,), jnp.int32)
    mem = decode.lower(param_shapes(config), tokens, tokens, None, eos, None, config=config,
                       max_new_tokens=2).compile().memory_analysis()
    assert mem.temp_size_in_bytes < B * T * config.vocab_size * 4 / 2, mem
