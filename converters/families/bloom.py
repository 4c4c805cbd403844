"""BLOOM: ALiBi instead of positions, a LayerNorm on the embeddings, LayerNorm with bias,
biases everywhere, a plain GELU (tanh) MLP of width 4 * hidden_size.

query_key_value fuses q, k, v per head: its rows are [N, 3, H] (each head's q, k, v together).
"""

from jaxlens.core.config import ConfigError
from jaxlens.converters.families import Family, TensorRule
from jaxlens.converters.families.decoder import base_config, from_heads, fused_qkv, layer_norm, plain_mlp, require, same, transpose

NAMES = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "rms_norm_eps": "layer_norm_epsilon"}


def config(hf):
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ConfigError("BLOOM with apply_residual_connection_post_layernorm=true is not supported")
    d_model = require(hf, "hidden_size")
    n_heads = require(hf, "n_head")
    return base_config(
        hf,
        "bloom",
        names=NAMES,
        n_kv_heads=n_heads,
        head_dim=d_model // n_heads,
        d_ff=4 * d_model,
        max_positions=1 << 20,  # ALiBi has no position table: any length runs
        norm="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation="gelu_tanh",
        gated_mlp=False,
        positions="alibi",
        embed_norm=True,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def tensors(cfg):
    layer = "transformer.h.{i}."
    rules = [
        TensorRule("transformer.word_embeddings.weight", ("embedding",), same),
        *layer_norm("transformer.word_embeddings_layernorm", ("embed_norm",)),
        *layer_norm("transformer.ln_f", ("final_norm",)),
        *layer_norm(layer + "input_layernorm", ("layers", "attn_norm")),
        *layer_norm(layer + "post_attention_layernorm", ("layers", "mlp_norm")),
        TensorRule(layer + "self_attention.dense.weight", ("layers", "attn", "o", "kernel"), from_heads),
        TensorRule(layer + "self_attention.dense.bias", ("layers", "attn", "o", "bias"), same),
        *plain_mlp(layer + "mlp"),
    ]
    for part in "qkv":
        split = fused_qkv(part, per_head=True)
        rules += [
            TensorRule(layer + "self_attention.query_key_value.weight", ("layers", "attn", part, "kernel"), split),
            TensorRule(layer + "self_attention.query_key_value.bias", ("layers", "attn", part, "bias"), split),
        ]
    if not cfg.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("unembed",), transpose))
    return rules


FAMILY = Family("bloom", ("bloom",), config, tensors, prefix="transformer.")
