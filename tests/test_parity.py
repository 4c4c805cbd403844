"""Every family, converted through the real path, equals transformers' PyTorch forward.

Logits, every `hidden_states` entry, and the finer sites (read from transformers with forward
hooks) within 1e-4 max abs in float32, with and without left/right padding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxlens
from conftest import TINY_CONFIGS, random_tokens

FAMILIES = sorted(TINY_CONFIGS)
TOL = 1e-4


# Where transformers computes each finer site: model_type -> (the layer list, {site: (module path
# inside a layer, "in" = its first input | "out" = its output)}). Missing types use "default".
_LLAMA_SITES = {"mlp_act": ("mlp.act_fn", "out"), "mlp_hidden": ("mlp.down_proj", "in"),
                "attn_out": ("self_attn", "out"), "mlp_out": ("mlp", "out")}
_POST_NORM_SITES = {**_LLAMA_SITES, "attn_out": ("post_attention_layernorm", "out"),
                    "mlp_out": ("post_feedforward_layernorm", "out")}
HF_SITES = {
    "default": ("model.layers", _LLAMA_SITES),
    "gemma2": ("model.layers", _POST_NORM_SITES),
    "gemma3_text": ("model.layers", _POST_NORM_SITES),
    "olmo2": ("model.layers", _POST_NORM_SITES),
    "phi3": ("model.layers", {**_LLAMA_SITES, "mlp_act": ("mlp.activation_fn", "out")}),
    "gpt2": ("transformer.h", {"mlp_act": ("mlp.act", "out"), "mlp_hidden": ("mlp.c_proj", "in"),
                               "attn_out": ("attn", "out"), "mlp_out": ("mlp", "out")}),
    "gpt_neox": ("gpt_neox.layers", {"mlp_act": ("mlp.act", "out"), "mlp_hidden": ("mlp.dense_4h_to_h", "in"),
                                     "attn_out": ("attention", "out"), "mlp_out": ("mlp", "out")}),
    # BLOOM's attention and MLP modules return residual + output; read their last projections.
    "bloom": ("transformer.h", {"mlp_act": ("mlp.gelu_impl", "out"), "mlp_hidden": ("mlp.dense_4h_to_h", "in"),
                                "attn_out": ("self_attention.dense", "out"), "mlp_out": ("mlp.dense_4h_to_h", "out")}),
}


def hf_forward(model, tokens: np.ndarray):
    """transformers' outputs plus the finer sites, via forward hooks on its own modules."""
    layers_path, where = HF_SITES.get(model.config.model_type, HF_SITES["default"])
    sites = {k: [] for k in where}
    hooks = []

    def record(name, side):
        def hook(module, inputs, output):
            value = inputs[0] if side == "in" else output
            sites[name].append(value[0] if isinstance(value, tuple) else value)

        return hook

    for layer in model.get_submodule(layers_path):
        for name, (path, side) in where.items():
            hooks.append(layer.get_submodule(path).register_forward_hook(record(name, side)))
    try:
        with torch.no_grad():
            out = model(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    sites = {k: np.stack([t.numpy() for t in v]) for k, v in sites.items()}
    sites["attn_probs"] = np.stack([a.numpy() for a in out.attentions])
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states], sites


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_logits_hidden_states_and_sites(tiny_checkpoint, model_type):
    hf_model, directory = tiny_checkpoint(model_type)
    model = jaxlens.load(directory)
    tokens = random_tokens(1, (2, 12))
    ref_logits, ref_hidden, ref_sites = hf_forward(hf_model, tokens)
    capture = ("embed", "resid_pre", "resid_post", "resid_mid", "final_norm", "mlp_act",
               "mlp_hidden", "attn_out", "mlp_out", "attn_probs")
    logits, sites = model(tokens, capture=capture)

    assert max_diff(logits, ref_logits) < TOL
    # hidden_states: [embed, block 0 out, ..., block L-2 out, final-normed block L-1 out].
    assert len(ref_hidden) == model.config.n_layers + 1
    assert max_diff(sites["embed"], ref_hidden[0]) < TOL
    for i in range(1, model.config.n_layers):
        assert max_diff(sites["resid_post"][i - 1], ref_hidden[i]) < TOL, f"hidden_states[{i}]"
        assert max_diff(sites["resid_pre"][i], ref_hidden[i]) < TOL
    assert max_diff(sites["final_norm"], ref_hidden[-1]) < TOL
    for name, ref in ref_sites.items():
        assert sites[name].shape == ref.shape, name
        assert max_diff(sites[name], ref) < TOL, name
    np.testing.assert_allclose(sites["resid_mid"], sites["resid_pre"] + sites["attn_out"], atol=1e-5)
    np.testing.assert_allclose(sites["resid_post"], sites["resid_mid"] + sites["mlp_out"], atol=1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(tiny_checkpoint, model_type, padding_side):
    """A padded batch gives, per sequence, what transformers gives for that sequence alone."""
    hf_model, directory = tiny_checkpoint(model_type)
    model = jaxlens.load(directory)
    lengths = [12, 7, 3]
    seqs = [random_tokens(10 + i, (n,)) for i, n in enumerate(lengths)]
    T = max(lengths)
    tokens = np.zeros((len(seqs), T), np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    for row, seq in enumerate(seqs):
        span = slice(T - len(seq), T) if padding_side == "left" else slice(0, len(seq))
        tokens[row, span], mask[row, span] = seq, 1
    logits, sites = model(tokens, mask, capture=("resid_post",))
    assert np.isfinite(np.asarray(logits)).all()
    for row, seq in enumerate(seqs):
        ref_logits, ref_hidden, _ = hf_forward(hf_model, seq[None])
        span = slice(T - len(seq), T) if padding_side == "left" else slice(0, len(seq))
        assert max_diff(logits[row, span], ref_logits[0]) < TOL
        for i in range(1, model.config.n_layers):
            assert max_diff(sites["resid_post"][i - 1, row, span], ref_hidden[i][0]) < TOL


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "bloom"])
def test_bfloat16_tracks_float32_reference(tiny_checkpoint, model_type):
    """bf16 params and activations stay close to the float32 reference, relative to the logit scale."""
    hf_model, directory = tiny_checkpoint(model_type)
    model = jaxlens.load(directory, dtype="bfloat16")
    assert {p.dtype for p in __import__("jax").tree.leaves(model.params)} == {np.dtype("bfloat16")}
    tokens = random_tokens(2, (2, 12))
    ref_fp32, _, _ = hf_forward(hf_model, tokens)
    logits, _ = model(tokens)
    scale = np.abs(ref_fp32).max()
    # bf16 has 8 bits of mantissa: a few 1e-2 of the logit range after 3 layers.
    assert max_diff(logits, ref_fp32) / scale < 3e-2
    assert (np.asarray(logits).argmax(-1) == ref_fp32.argmax(-1)).mean() > 0.9


def test_alibi_slopes_match_transformers():
    """Our numpy ALiBi slopes equal BLOOM's, powers of 2 and the interleaved rest alike."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    from jaxlens.core.rope import alibi_slopes

    for n_heads in (1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 32, 112):
        # float32 pow may differ in the last bit between numpy and torch
        np.testing.assert_allclose(alibi_slopes(n_heads), _get_alibi_slopes(n_heads, "cpu").numpy(), rtol=1e-6)


@pytest.mark.parametrize("model_type", ["gpt2", "bloom"])
def test_base_model_checkpoint_loads_like_the_causal_lm(tiny_checkpoint, tmp_path, model_type):
    """The hub's GPT-2 and BLOOM files were saved from the bare base model: no 'transformer.' prefix."""
    from safetensors import safe_open

    hf_model, directory = tiny_checkpoint(model_type)
    hf_model.transformer.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "np") as f:
        assert not any(name.startswith("transformer.") for name in f.keys())
    tokens = random_tokens(4, (2, 9))
    base, causal_lm = jaxlens.load(tmp_path), jaxlens.load(directory)
    np.testing.assert_array_equal(np.asarray(base(tokens)[0]), np.asarray(causal_lm(tokens)[0]))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
def test_lens_on_the_last_layer_is_the_model_itself(tiny_checkpoint, model_type):
    """The logit lens applies each family's own head: RMSNorm or LayerNorm, and Gemma 2's final soft-cap."""
    import jax

    from jaxlens.kernels.lens import logit_lens

    _, directory = tiny_checkpoint(model_type)
    model = jaxlens.load(directory)
    tokens = random_tokens(5, (2, 7))
    logits, sites = model(tokens, capture=("resid_post",))
    out = logit_lens(model.params, sites["resid_post"], config=model.config, k=5, final_logits=logits)  # [L, B, T, k]
    ref_probs, ref_ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), 5)
    np.testing.assert_array_equal(out["top_ids"][-1], ref_ids)
    np.testing.assert_allclose(out["top_probs"][-1], ref_probs, atol=1e-6)
    np.testing.assert_allclose(out["kl"][-1], 0.0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma2", "gemma3_text", "gpt2", "bloom", "phi3"])
def test_blocked_attention_matches_transformers(tiny_checkpoint, model_type):
    """The memory-efficient attention (4-key blocks here: several per sequence, and a shorter last
    one) on a left-padded batch: each sequence gives what transformers gives for it alone."""
    import dataclasses

    hf_model, directory = tiny_checkpoint(model_type)
    model = jaxlens.load(directory)
    model = dataclasses.replace(model, config=dataclasses.replace(model.config, attn_block=4))
    seqs = [random_tokens(20 + i, (n,)) for i, n in enumerate([11, 6])]
    tokens, mask = np.zeros((2, 11), np.int32), np.zeros((2, 11), np.int32)
    for row, seq in enumerate(seqs):
        tokens[row, 11 - len(seq):], mask[row, 11 - len(seq):] = seq, 1
    logits, _ = model(tokens, mask)
    for row, seq in enumerate(seqs):
        ref_logits, _, _ = hf_forward(hf_model, seq[None])
        assert max_diff(logits[row, 11 - len(seq):], ref_logits[0]) < TOL


# ---- bfloat16: each float32 upcast, on inputs where bf16 arithmetic would visibly lose ------------
# The reference is the same computation in float64 on the same bf16-representable inputs and weights:
# an upcast kept means the bf16 result is that value rounded once (within one bf16 ulp, 2^-7).
BF16_ULP = 2.0**-7


def _bf16(rng, a):
    """float64 values rounded to bfloat16, as (the bf16 array, its exact float64 values)."""
    import jax.numpy as jnp

    b = jnp.asarray(a, jnp.float32).astype(jnp.bfloat16)
    return b, np.asarray(b, np.float64)


def _within_one_ulp(ours, ref, floor=0.0):
    err = np.abs(np.asarray(ours, np.float64) - ref)
    worst = float((err / (BF16_ULP * np.abs(ref) + floor)).max())
    assert worst <= 1.0, f"bf16 error up to {worst:.1f} ulps of the float32 result"


@pytest.mark.parametrize("kind", ["rms", "rms_plus_one", "layer"])
def test_bf16_norms_compute_in_float32(kind):
    """Inputs far from zero mean (an offset of 100, bf16 ulp 0.5 there) over 2048 features: a bf16
    mean is off by up to 0.25, so x - mean and the variance would be wrong by far more than an ulp."""
    from jaxlens.core.modules import LayerNorm, RMSNorm

    rng = np.random.default_rng(0)
    D = 2048
    x, x64 = _bf16(rng, 100.0 + rng.normal(size=(3, D)) * np.exp(rng.normal(size=(3, D))))
    scale, s64 = _bf16(rng, 1.0 + 0.5 * rng.normal(size=D))
    if kind == "layer":
        bias, b64 = _bf16(rng, rng.normal(size=D))
        out = LayerNorm(1e-5).apply({"params": {"scale": scale, "bias": bias}}, x)
        c = x64 - x64.mean(-1, keepdims=True)
        ref = c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5) * s64 + b64
    else:
        plus_one = kind == "rms_plus_one"
        out = RMSNorm(1e-6, plus_one).apply({"params": {"scale": scale}}, x)
        ref = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-6) * (1.0 + s64 if plus_one else s64)
    assert out.dtype == np.dtype("bfloat16")
    _within_one_ulp(out, ref)


def test_bf16_rope_rotates_in_float32():
    """x1 cos - x2 sin at positions up to 4000 cancels: with bf16 cos/sin (2^-9 relative error on each
    product) the difference is wrong by many of its own ulps; in float32 it is rounded once."""
    import jax.numpy as jnp

    from jaxlens.core.config import RopeConfig
    from jaxlens.core.rope import apply_rope, rope_tables

    rng = np.random.default_rng(1)
    x, x64 = _bf16(rng, rng.normal(size=(1, 64, 2, 32)))
    positions = jnp.asarray(rng.integers(0, 4000, (1, 64)))
    cos, sin = rope_tables(RopeConfig(theta=10000.0), 32, positions)
    out = apply_rope(x, cos, sin)
    c, s = np.asarray(cos, np.float64)[:, :, None], np.asarray(sin, np.float64)[:, :, None]
    x1, x2 = x64[..., :16], x64[..., 16:]
    ref = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    assert out.dtype == np.dtype("bfloat16")
    _within_one_ulp(out, ref, floor=2.0**-20)


def test_bf16_linear_adds_its_bias_before_rounding():
    """A bias that cancels most of the product (q/k/v biases of Qwen 2 are large): rounding the
    product to bf16 first would leave its error, an ulp of the product, on a 30x smaller sum."""
    from jaxlens.core.modules import Linear

    rng = np.random.default_rng(2)
    x, x64 = _bf16(rng, rng.normal(size=(1, 64)))
    w, w64 = _bf16(rng, rng.normal(size=(64, 16)))
    bias, b64 = _bf16(rng, -(x64 @ w64)[0] + rng.uniform(0.2, 0.5, 16))
    out = Linear((16,), use_bias=True).apply({"params": {"kernel": w, "bias": bias}}, x)
    assert out.dtype == np.dtype("bfloat16")
    _within_one_ulp(out, x64 @ w64 + b64)


@pytest.mark.parametrize("attn_block", [0, 4], ids=["reference", "blocked"])
def test_bf16_attention_scores_and_softmax_in_float32(attn_block):
    """Small-integer inputs and weights make q, k and v exact in bf16 and the scores exact in float32.
    Every score carries a common 900 (one constant feature, 30 x 30 in head dim 0), which the softmax
    ignores but a bf16 score cannot: its ulp there is 4, so a bf16 score (or softmax) moves the
    probabilities by tens of percent. Both the reference and the blocked online-softmax path, on a
    left-padded batch; compared with the float32 module on the same values."""
    import jax.numpy as jnp

    from jaxlens.core.config import ModelConfig
    from jaxlens.core.forward import _shared_inputs
    from jaxlens.core.modules import Attention, Keys

    cfg = ModelConfig(family="test", vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                      d_ff=8, max_positions=64, attn_block=attn_block)
    rng = np.random.default_rng(3)
    B, T = 2, 11
    sparse = lambda *shape: rng.choice([-1.0, 0.0, 0.0, 0.0, 1.0], shape).astype(np.float32)  # noqa: E731
    params = {name: {"kernel": sparse(*shape)} for name, shape in
              {"q": (16, 2, 16), "k": (16, 1, 16), "v": (16, 1, 16), "o": (2, 16, 16)}.items()}
    for name in ("q", "k"):  # head dim 0 reads only feature 0: q_0 = k_0 = 30 on every token
        params[name]["kernel"][:, :, 0] = 0.0
        params[name]["kernel"][0, :, 0] = 15.0
    x = rng.integers(-1, 2, (B, T, 16)).astype(np.float32)
    x[..., 0] = 2.0
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0
    shared = _shared_inputs(cfg, jnp.asarray(mask))
    keys = Keys(shared["mask"], shared["key_mask"], shared["positions"], shared["key_positions"],
                jnp.asarray(np.iinfo(np.int32).max, jnp.int32))
    cos, sin = jnp.ones((B, T, 8)), jnp.zeros((B, T, 8))  # rope as the identity: q and k stay integers

    def run(dtype):
        p = {name: {"kernel": jnp.asarray(v["kernel"], dtype)} for name, v in params.items()}
        return np.asarray(Attention(cfg).apply({"params": p}, jnp.asarray(x, dtype), cos, sin, keys)[0], np.float64)

    ours, ref = run(jnp.bfloat16), run(jnp.float32)
    real = mask.astype(bool)
    scale = np.abs(ref[real]).max()
    # probabilities and the context rounded to bf16 (as transformers does) before the o projection
    assert np.abs(ours[real] - ref[real]).max() <= 4 * BF16_ULP * scale


def test_bf16_linear_reads_its_input_in_the_weights_dtype():
    """float32 x, bf16 kernel: x is rounded to bf16 (a bf16 matmul, float32 accumulation), never the
    kernel widened; the output keeps x's dtype (the activations')."""
    import jax.numpy as jnp

    from jaxlens.core.modules import Linear

    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    w, w64 = _bf16(rng, rng.normal(size=(64, 16)))
    x16 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)  # what a bf16 matmul reads
    out = Linear((16,)).apply({"params": {"kernel": w}}, jnp.asarray(x))
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.asarray(out, np.float64), x16 @ w64, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(out, np.float64) - x.astype(np.float64) @ w64).max() > 1e-3  # x was rounded


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bf16_weights_with_float32_activations(family):
    """activation_dtype="float32" (the default) with bf16 params: every site and the KV cache are
    float32, and the logits track the float32 run on the same (bf16-valued) weights over twice as
    closely as bf16 activations do. "params": bf16 throughout."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxlens.core.config import ModelConfig
    from jaxlens.core.forward import forward, forward_cached, init_params

    extra = dict(norm_placement="sandwich", norm_plus_one=True, embed_scale=True, activation="gelu_tanh",
                 attn_softcap=50.0, final_softcap=30.0) if family == "gemma2" else {}
    cfg = ModelConfig(family=family, vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                      d_ff=256, max_positions=64, **extra)
    # A residual stream far larger than what each sublayer adds (as real models' massive activations):
    # bf16 rounds the additions away, float32 keeps them.
    params = init_params(cfg, jax.random.key(0))
    params = {**params, "embedding": params["embedding"] * 64}
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p16)  # the same weights, float32 arithmetic
    tokens = jnp.asarray(random_tokens(6, (2, 24)) % cfg.vocab_size)
    sites = ("resid_post", "attn_out", "mlp_act", "mlp_out", "final_norm")
    ref, _ = forward(p32, tokens, config=cfg)
    wide, captured = forward(p16, tokens, config=cfg, capture=sites)
    pure_cfg = dataclasses.replace(cfg, activation_dtype="params")
    pure, captured_pure = forward(p16, tokens, config=pure_cfg, capture=sites)
    assert {str(v.dtype) for v in captured.values()} == {"float32"}
    assert {str(v.dtype) for v in captured_pure.values()} == {"bfloat16"}
    assert forward_cached(p16, tokens, config=cfg)[2].k.dtype == jnp.float32
    assert forward_cached(p16, tokens, config=pure_cfg)[2].k.dtype == jnp.bfloat16
    err = lambda a: float(np.abs(np.asarray(a, np.float64) - np.asarray(ref, np.float64)).mean())  # noqa: E731
    assert err(wide) < err(pure) / 2, (err(wide), err(pure))  # measured 2.5x (llama), 3.1x (gemma2)


def test_bf16_lens_last_layer_is_the_model_with_float32_activations():
    """The lens reads the final norm in the unembedding's dtype, as the model does: with bf16 params
    and float32 activations its last layer is the model's own distribution."""
    import jax
    import jax.numpy as jnp

    from jaxlens.core.config import ModelConfig
    from jaxlens.core.forward import forward, init_params
    from jaxlens.kernels.lens import logit_lens

    cfg = ModelConfig(family="llama", vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      d_ff=128, max_positions=32)
    p16 = jax.tree.map(lambda a: (a * 4).astype(jnp.bfloat16), init_params(cfg, jax.random.key(1)))
    tokens = jnp.asarray(random_tokens(7, (2, 9)) % cfg.vocab_size)
    logits, sites = forward(p16, tokens, config=cfg, capture=("resid_post",))
    out = logit_lens(p16, sites["resid_post"], config=cfg, k=5, final_logits=logits, chunk=64)
    np.testing.assert_array_equal(out["top_ids"][-1], jax.lax.top_k(logits, 5)[1])
    np.testing.assert_allclose(out["kl"][-1], 0.0, atol=1e-5)
