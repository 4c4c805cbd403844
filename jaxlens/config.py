"""One `ModelConfig` for every family: the switches the shared blocks read.

A config is frozen and hashable so it can be a static argument of `jax.jit`. Families fill it
from a HF `config.json` (or GGUF metadata) in `jaxlens.converters.families`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A checkpoint's configuration is missing a field or holds a value jaxlens cannot run."""


def resolve_dtype(name: str | Any):
    """'float32' | 'bfloat16' | 'float16' (or the jnp dtype itself) -> jnp dtype."""
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[name])


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind (global or sliding)."""

    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_positions: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_positions: int
    norm_eps: float = 1e-6
    activation: str = "silu"  # silu | gelu_tanh | gelu
    gated_mlp: bool = True
    rope: RopeConfig = RopeConfig()
    # Sliding-window layers: per-layer flags and their own rope (Gemma 3: local base 10k).
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    rope_local: RopeConfig | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k, before rope
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w)
    sandwich_norms: bool = False  # Gemma 2/3: post-attention and post-MLP norms too
    embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
    query_scale: float | None = None  # attention scale; None -> head_dim ** -0.5
    tie_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if not self.sliding_layers:
            object.__setattr__(self, "sliding_layers", (self.sliding_window is not None,) * self.n_layers)
        if len(self.sliding_layers) != self.n_layers:
            raise ConfigError(
                f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}"
            )

    @property
    def attn_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        d = json.loads(text)
        d["rope"] = RopeConfig(**d["rope"])
        if d.get("rope_local") is not None:
            d["rope_local"] = RopeConfig(**d["rope_local"])
        d["sliding_layers"] = tuple(d["sliding_layers"])
        return cls(**d)
