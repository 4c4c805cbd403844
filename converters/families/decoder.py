"""What the Llama-like decoder families share: config field mapping and the tensor table."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlens.core.config import ConfigError, ModelConfig, RopeConfig
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


def base_config(hf: dict, family: str, names: dict[str, str] | None = None, **overrides) -> ModelConfig:
    """The fields every decoder family reads the same way; families override the rest.

    `names` maps a Llama-style config.json key to the key this family uses for it (GPT-2:
    {"hidden_size": "n_embd", ...}); a field given in `overrides` is not read at all.
    """
    names = names or {}
    key = lambda k: names.get(k, k)  # noqa: E731
    readers = dict(  # ModelConfig field -> how to read it (only called when not overridden)
        vocab_size=lambda: require(hf, key("vocab_size")),
        d_model=lambda: require(hf, key("hidden_size")),
        n_layers=lambda: require(hf, key("num_hidden_layers")),
        n_heads=lambda: require(hf, key("num_attention_heads")),
        n_kv_heads=lambda: hf.get(key("num_key_value_heads")) or fields["n_heads"],
        head_dim=lambda: hf.get(key("head_dim")) or fields["d_model"] // fields["n_heads"],
        d_ff=lambda: require(hf, key("intermediate_size")),
        max_positions=lambda: require(hf, key("max_position_embeddings")),
        norm_eps=lambda: float(hf.get(key("rms_norm_eps"), 1e-6)),
        activation=lambda: _activation(hf.get("hidden_activation") or hf.get(key("hidden_act")) or "silu"),
        rope=lambda: global_rope(hf),
        tie_embeddings=lambda: bool(hf.get("tie_word_embeddings", False)),
        pad_token_id=lambda: hf.get("pad_token_id"),
        bos_token_id=lambda: hf.get("bos_token_id"),
        eos_token_id=lambda: _first(hf.get("eos_token_id")),
    )
    fields = dict(family=family)
    for name, read in readers.items():  # in order: later readers use earlier fields
        fields[name] = overrides[name] if name in overrides else read()
    fields.update(overrides)
    return ModelConfig(**fields)


def _first(value):
    return value[0] if isinstance(value, list) else value


def _activation(name: str) -> str:
    table = {
        "silu": "silu", "swish": "silu", "gelu": "gelu",
        "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
    }
    if name not in table:
        raise ConfigError(f"activation {name!r} is not supported; supported: {', '.join(table)}")
    return table[name]


# Transforms: HF stores nn.Linear weights as [out, in]; our kernels are [in, *out]. The common ones
# return views of the (memory-mapped) tensor, so a host reads only the slices it places.
def same(w, cfg):
    return w


def transpose(w, cfg):
    return w.T


def to_heads(n_heads_of):
    """[N*H, D] -> [D, N, H] (q/k/v kernels) and [N*H] -> [N, H] (their biases)."""

    def transform(w, cfg):
        n = n_heads_of(cfg)
        if w.ndim == 1:
            return w.reshape(n, cfg.head_dim)
        return w.T.reshape(w.shape[1], n, cfg.head_dim)

    return transform


def from_heads(w, cfg):
    """o_proj [D, N*H] -> [N, H, D]."""
    return w.T.reshape(cfg.n_heads, cfg.head_dim, w.shape[0])


q_heads = to_heads(lambda c: c.n_heads)
kv_heads = to_heads(lambda c: c.n_kv_heads)


def fused_qkv(part: str, per_head: bool, stored_in_out: bool = False):
    """One of q, k, v out of a fused projection: weight -> [D, n, H] kernel, bias -> [n, H].

    per_head=False: rows are [all q | all k | all v] (GPT-2 c_attn, Phi-3 qkv_proj).
    per_head=True: rows are [N, 3, H], each head's q, k, v together (GPT-NeoX, BLOOM).
    stored_in_out: the weight is stored [in, out] (GPT-2's Conv1D) rather than nn.Linear's [out, in].
    """
    index = "qkv".index(part)

    def transform(w, cfg):
        if stored_in_out and w.ndim == 2:
            w = w.T  # -> [out, in] like every other fused weight
        H = cfg.head_dim
        if per_head:  # [N*3*H, ...] -> [N, 3, H, ...] -> this part's [N, H, ...]
            w = w.reshape(cfg.n_heads, 3, H, *w.shape[1:])[:, index]
        else:
            sizes = [cfg.n_heads * H, cfg.n_kv_heads * H, cfg.n_kv_heads * H]
            if w.shape[0] != sum(sizes):  # a slice would silently fit: say it does not
                raise ValueError(f"fused qkv has {w.shape[0]} rows, the config needs {sum(sizes)}")
            start = sum(sizes[:index])
            w = w[start : start + sizes[index]].reshape(sizes[index] // H, H, *w.shape[1:])
        return np.ascontiguousarray(w if w.ndim == 2 else w.transpose(2, 0, 1))  # [n, H] or [D, n, H]

    return transform

def decoder_tensors(cfg: ModelConfig) -> list[TensorRule]:
    """The table for a Llama-shaped checkpoint; switches in `cfg` add or drop entries."""
    layer = "model.layers.{i}."
    rules = [
        TensorRule("model.embed_tokens.weight", ("embedding",), same),
        TensorRule("model.norm.weight", ("final_norm", "scale"), same),
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
    rules += [
        TensorRule(layer + f"{hf_norm}.weight", ("layers", norm, "scale"), same)
        for hf_norm, norm in BLOCK_NORMS[cfg.norm_placement].items()
    ]
    return rules


# HF's per-layer norm names -> ours, by `norm_placement` (the same HF name moves with it).
BLOCK_NORMS = {
    "pre": {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"},
    "sandwich": {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attn_norm",
        "pre_feedforward_layernorm": "mlp_norm",
        "post_feedforward_layernorm": "post_mlp_norm",
    },
    "post": {"post_attention_layernorm": "post_attn_norm", "post_feedforward_layernorm": "post_mlp_norm"},
}


def layer_norm(hf: str, path: tuple[str, ...]) -> list[TensorRule]:
    """A LayerNorm's two tensors: `hf`.weight -> path/scale and `hf`.bias -> path/bias."""
    return [TensorRule(f"{hf}.weight", (*path, "scale"), same), TensorRule(f"{hf}.bias", (*path, "bias"), same)]


def plain_mlp(prefix: str, up: str = "dense_h_to_4h", down: str = "dense_4h_to_h") -> list[TensorRule]:
    """An ungated MLP with biases stored as nn.Linear ([out, in]): `prefix`.{up,down}.{weight,bias}."""
    return [
        TensorRule(f"{prefix}.{up}.weight", ("layers", "mlp", "up", "kernel"), transpose),
        TensorRule(f"{prefix}.{up}.bias", ("layers", "mlp", "up", "bias"), same),
        TensorRule(f"{prefix}.{down}.weight", ("layers", "mlp", "down", "kernel"), transpose),
        TensorRule(f"{prefix}.{down}.bias", ("layers", "mlp", "down", "bias"), same),
    ]


def rotary_dim(hf: dict, head_dim: int, default: float = 1.0) -> int | None:
    """Partial rotary: how many dims of each head rope rotates (None = all), from v5's
    rope_parameters.partial_rotary_factor or v4's partial_rotary_factor / rotary_pct."""
    params = hf.get("rope_parameters") or {}
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", default)))
    dim = int(head_dim * fraction)
    return None if dim == head_dim else dim
