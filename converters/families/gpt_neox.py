"""GPT-NeoX / Pythia: parallel residual, partial rotary, LayerNorm with bias, plain GELU MLP.

query_key_value fuses q, k, v per head: its rows are [N, 3, H] (each head's q, k, v together).
"""

from jaxlens.converters.families import Family, TensorRule
from jaxlens.converters.families.decoder import (
    base_config, from_heads, fused_qkv, layer_norm, plain_mlp, require, rope_from_hf, rotary_dim, same, transpose,
)


def config(hf):
    n_heads = require(hf, "num_attention_heads")
    head_dim = require(hf, "hidden_size") // n_heads
    bias = bool(hf.get("attention_bias", True))
    theta = hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))  # v4 Pythia: rotary_emb_base
    return base_config(
        hf,
        "gpt_neox",
        names={"rms_norm_eps": "layer_norm_eps"},
        n_kv_heads=n_heads,
        head_dim=head_dim,
        norm="layer",
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        gated_mlp=False,
        rope=rope_from_hf(hf.get("rope_parameters") or hf.get("rope_scaling"), theta),
        rotary_dim=rotary_dim(hf, head_dim, default=0.25),  # transformers' default rotary_pct
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
    )


def tensors(cfg):
    layer = "gpt_neox.layers.{i}."
    rules = [
        TensorRule("gpt_neox.embed_in.weight", ("embedding",), same),
        *layer_norm("gpt_neox.final_layer_norm", ("final_norm",)),
        *layer_norm(layer + "input_layernorm", ("layers", "attn_norm")),
        *layer_norm(layer + "post_attention_layernorm", ("layers", "mlp_norm")),
        TensorRule(layer + "attention.dense.weight", ("layers", "attn", "o", "kernel"), from_heads),
        *plain_mlp(layer + "mlp"),
    ]
    for part in "qkv":
        split = fused_qkv(part, per_head=True)
        rules.append(TensorRule(layer + "attention.query_key_value.weight", ("layers", "attn", part, "kernel"), split))
        if cfg.qkv_bias:
            rules.append(TensorRule(layer + "attention.query_key_value.bias", ("layers", "attn", part, "bias"), split))
    if cfg.o_bias:
        rules.append(TensorRule(layer + "attention.dense.bias", ("layers", "attn", "o", "bias"), same))
    if not cfg.tie_embeddings:
        rules.append(TensorRule("embed_out.weight", ("unembed",), transpose))
    return rules


# Old checkpoints also hold the causal-mask buffers attention.bias / attention.masked_bias.
FAMILY = Family(
    "gpt_neox",
    ("gpt_neox",),
    config,
    tensors,
    ignored=(r".*rotary_emb\.inv_freq", r".*\.attention\.(bias|masked_bias)"),
)
