"""Phi-3: Llama with fused qkv_proj ([all q | all k | all v] rows) and gate_up_proj ([gate | up]
rows), optional partial rotary, and a sliding window on every layer when `sliding_window` is set."""

from jaxlens.converters.families import Family, TensorRule
from jaxlens.converters.families.decoder import base_config, decoder_tensors, fused_qkv, require, rotary_dim

FUSED_AWAY = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # Llama names Phi-3 does not have


def config(hf):
    head_dim = hf.get("head_dim") or require(hf, "hidden_size") // require(hf, "num_attention_heads")
    return base_config(
        hf, "phi3", sliding_window=hf.get("sliding_window"), sliding_layers=(), rotary_dim=rotary_dim(hf, head_dim)
    )


def gate_up(w, cfg):
    """gate_up_proj [2F, D] -> our fused [D, 2, F] kernel (gate first, as transformers chunks it)."""
    return w.T.reshape(w.shape[1], 2, cfg.d_ff).copy()


def tensors(cfg):
    layer = "model.layers.{i}."
    rules = [rule for rule in decoder_tensors(cfg) if not any(f".{name}." in rule.hf for name in FUSED_AWAY)]
    for part in "qkv":
        split = fused_qkv(part, per_head=False)
        rules.append(TensorRule(layer + "self_attn.qkv_proj.weight", ("layers", "attn", part, "kernel"), split))
    rules.append(TensorRule(layer + "mlp.gate_up_proj.weight", ("layers", "mlp", "gate_up", "kernel"), gate_up))
    return rules


FAMILY = Family("phi3", ("phi3",), config, tensors)
