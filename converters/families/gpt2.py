"""GPT-2: learned absolute positions, LayerNorm with bias, biases everywhere, a plain GELU MLP.

Its Conv1D layers store weights [in, out] (the transpose of nn.Linear), and c_attn fuses q, k, v
as [all q | all k | all v] along the output axis.
"""

from jaxlens.core.config import ConfigError
from jaxlens.converters.families import Family, TensorRule
from jaxlens.converters.families.decoder import base_config, fused_qkv, layer_norm, require, same, transpose

# Llama-style config key -> GPT-2's.
NAMES = {
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "n_positions",
    "rms_norm_eps": "layer_norm_epsilon",
    "hidden_act": "activation_function",
}


def config(hf):
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ConfigError(
            "GPT-2 with scale_attn_by_inverse_layer_idx=true (a per-layer attention scale) is not supported"
        )
    n_heads = require(hf, "n_head")
    return base_config(
        hf,
        "gpt2",
        names=NAMES,
        n_kv_heads=n_heads,
        head_dim=require(hf, "n_embd") // n_heads,
        d_ff=hf.get("n_inner") or 4 * require(hf, "n_embd"),
        norm="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        gated_mlp=False,
        positions="learned",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        query_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def out_heads(w, cfg):
    """c_proj [N*H, D] (already [in, out]) -> [N, H, D]."""
    return w.reshape(cfg.n_heads, cfg.head_dim, w.shape[1])


def tensors(cfg):
    layer = "transformer.h.{i}."
    rules = [
        TensorRule("transformer.wte.weight", ("embedding",), same),
        TensorRule("transformer.wpe.weight", ("pos_embedding",), same),
        *layer_norm("transformer.ln_f", ("final_norm",)),
        *layer_norm(layer + "ln_1", ("layers", "attn_norm")),
        *layer_norm(layer + "ln_2", ("layers", "mlp_norm")),
        TensorRule(layer + "attn.c_proj.weight", ("layers", "attn", "o", "kernel"), out_heads),
        TensorRule(layer + "attn.c_proj.bias", ("layers", "attn", "o", "bias"), same),
        TensorRule(layer + "mlp.c_fc.weight", ("layers", "mlp", "up", "kernel"), same),
        TensorRule(layer + "mlp.c_fc.bias", ("layers", "mlp", "up", "bias"), same),
        TensorRule(layer + "mlp.c_proj.weight", ("layers", "mlp", "down", "kernel"), same),
        TensorRule(layer + "mlp.c_proj.bias", ("layers", "mlp", "down", "bias"), same),
    ]
    for part in "qkv":
        split = fused_qkv(part, per_head=False, stored_in_out=True)
        rules += [
            TensorRule(layer + "attn.c_attn.weight", ("layers", "attn", part, "kernel"), split),
            TensorRule(layer + "attn.c_attn.bias", ("layers", "attn", part, "bias"), split),
        ]
    if not cfg.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("unembed",), transpose))
    return rules


# Old checkpoints also hold the causal-mask buffers attn.bias / attn.masked_bias.
FAMILY = Family("gpt2", ("gpt2",), config, tensors, ignored=(r".*\.attn\.(bias|masked_bias)",), prefix="transformer.")
