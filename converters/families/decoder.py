"""What the Llama-like decoder families share: config field mapping and the tensor table."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlens.config import ConfigError, ModelConfig, RopeConfig
from jaxlens.converters.families import TensorRule


def require(hf: dict, key: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(
            f"config.json of model_type {hf.get('model_type')!r} is missing the required field {key!r}"
        )
    return hf[key]


def rope_from_hf(params: dict | None, theta: float) -> RopeConfig:
    """One rope description from transformers' v5 `rope_parameters` or v4 `rope_scaling` dict."""
    params = params or {}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", theta))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_positions=int(params["original_max_position_embeddings"]),
        )
    raise ConfigError(f"rope scaling {kind!r} is not supported; supported: default, linear, llama3")


def global_rope(hf: dict) -> RopeConfig:
    params = hf.get("rope_parameters") or hf.get("rope_scaling")
    if params and "full_attention" in params:  # v5 per-layer-type form (Gemma 3)
        params = params["full_attention"]
    return rope_from_hf(params, hf.get("rope_theta", 10000.0))


def sliding_layers(hf: dict, n_layers: int, default: bool) -> tuple[bool, ...]:
    types = hf.get("layer_types")
    if types:
        if len(types) != n_layers:
            raise ConfigError(f"layer_types has {len(types)} entries for num_hidden_layers={n_layers}")
        return tuple(t == "sliding_attention" for t in types)
    return (default,) * n_layers


def base_config(hf: dict, family: str, **overrides) -> ModelConfig:
    """The fields every decoder family reads the same way; families override the rest."""
    d_model = require(hf, "hidden_size")
    n_heads = require(hf, "num_attention_heads")
    n_layers = require(hf, "num_hidden_layers")
    eos = hf.get("eos_token_id")
    fields = dict(
        family=family,
        vocab_size=require(hf, "vocab_size"),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        d_ff=require(hf, "intermediate_size"),
        max_positions=require(hf, "max_position_embeddings"),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=_activation(hf.get("hidden_activation") or hf.get("hidden_act") or "silu"),
        rope=global_rope(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _activation(name: str) -> str:
    table = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
    if name not in table:
        raise ConfigError(f"activation {name!r} is not supported; supported: {', '.join(table)}")
    return table[name]


# Transforms: HF stores nn.Linear weights as [out, in]; our kernels are [in, *out].
def same(w, cfg):
    return w


def transpose(w, cfg):
    return np.ascontiguousarray(w.T)


def to_heads(n_heads_of):
    """[N*H, D] -> [D, N, H] (q/k/v kernels) and [N*H] -> [N, H] (their biases)."""

    def transform(w, cfg):
        n = n_heads_of(cfg)
        if w.ndim == 1:
            return w.reshape(n, cfg.head_dim)
        return np.ascontiguousarray(w.T).reshape(w.shape[1], n, cfg.head_dim)

    return transform


def from_heads(w, cfg):
    """o_proj [D, N*H] -> [N, H, D]."""
    return np.ascontiguousarray(w.T).reshape(cfg.n_heads, cfg.head_dim, w.shape[0])


q_heads = to_heads(lambda c: c.n_heads)
kv_heads = to_heads(lambda c: c.n_kv_heads)


def decoder_tensors(cfg: ModelConfig) -> list[TensorRule]:
    """The table for a Llama-shaped checkpoint; switches in `cfg` add or drop entries."""
    layer = "model.layers.{i}."
    rules = [
        TensorRule("model.embed_tokens.weight", ("embedding",), same),
        TensorRule("model.norm.weight", ("final_norm", "scale"), same),
        TensorRule(layer + "input_layernorm.weight", ("layers", "attn_norm", "scale"), same),
        TensorRule(layer + "self_attn.q_proj.weight", ("layers", "attn", "q", "kernel"), q_heads),
        TensorRule(layer + "self_attn.k_proj.weight", ("layers", "attn", "k", "kernel"), kv_heads),
        TensorRule(layer + "self_attn.v_proj.weight", ("layers", "attn", "v", "kernel"), kv_heads),
        TensorRule(layer + "self_attn.o_proj.weight", ("layers", "attn", "o", "kernel"), from_heads),
        TensorRule(layer + "mlp.down_proj.weight", ("layers", "mlp", "down", "kernel"), transpose),
    ]
    if cfg.gated_mlp:  # gate and up fill the two halves of one fused [D, 2, F] kernel
        rules += [
            TensorRule(layer + "mlp.gate_proj.weight", ("layers", "mlp", "gate_up", "kernel"), transpose, slot=(1, 0)),
            TensorRule(layer + "mlp.up_proj.weight", ("layers", "mlp", "gate_up", "kernel"), transpose, slot=(1, 1)),
        ]
    else:
        rules.append(TensorRule(layer + "mlp.up_proj.weight", ("layers", "mlp", "up", "kernel"), transpose))
    if not cfg.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", ("unembed",), transpose))
    if cfg.qkv_bias:
        rules += [
            TensorRule(layer + "self_attn.q_proj.bias", ("layers", "attn", "q", "bias"), q_heads),
            TensorRule(layer + "self_attn.k_proj.bias", ("layers", "attn", "k", "bias"), kv_heads),
            TensorRule(layer + "self_attn.v_proj.bias", ("layers", "attn", "v", "bias"), kv_heads),
        ]
    if cfg.o_bias:
        rules.append(TensorRule(layer + "self_attn.o_proj.bias", ("layers", "attn", "o", "bias"), same))
    if cfg.mlp_bias:
        rules.append(TensorRule(layer + "mlp.down_proj.bias", ("layers", "mlp", "down", "bias"), same))
        if cfg.gated_mlp:
            rules += [
                TensorRule(layer + "mlp.gate_proj.bias", ("layers", "mlp", "gate_up", "bias"), same, slot=(0, 0)),
                TensorRule(layer + "mlp.up_proj.bias", ("layers", "mlp", "gate_up", "bias"), same, slot=(0, 1)),
            ]
        else:
            rules.append(TensorRule(layer + "mlp.up_proj.bias", ("layers", "mlp", "up", "bias"), same))
    if cfg.qk_norm:
        rules += [
            TensorRule(layer + "self_attn.q_norm.weight", ("layers", "attn", "q_norm", "scale"), same),
            TensorRule(layer + "self_attn.k_norm.weight", ("layers", "attn", "k_norm", "scale"), same),
        ]
    if cfg.sandwich_norms:
        rules += [
            TensorRule(layer + "post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"), same),
            TensorRule(layer + "pre_feedforward_layernorm.weight", ("layers", "mlp_norm", "scale"), same),
            TensorRule(layer + "post_feedforward_layernorm.weight", ("layers", "post_mlp_norm", "scale"), same),
        ]
    else:
        rules.append(TensorRule(layer + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), same))
    return rules
