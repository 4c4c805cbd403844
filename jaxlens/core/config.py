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
ACTIVATION_DTYPES = ("float32", "params")  # ModelConfig.activation_dtype


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


# The string-valued switches and the values the shared blocks understand.
_CHOICES = {
    "norm": ("rms", "layer"),
    "norm_placement": ("pre", "sandwich", "post"),
    "positions": ("rope", "learned", "alibi"),
    "activation": ("silu", "gelu_tanh", "gelu"),
    "activation_dtype": ACTIVATION_DTYPES,
}


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
    norm: str = "rms"  # rms | layer (LayerNorm with bias: GPT-2, GPT-NeoX, BLOOM)
    # Where the block norms sit: "pre" (norm -> sublayer), "sandwich" (Gemma 2/3: norm -> sublayer
    # -> norm), "post" (OLMo 2: sublayer -> norm, nothing before).
    norm_placement: str = "pre"
    parallel_residual: bool = False  # GPT-NeoX: the MLP reads the block input, not resid_mid
    activation: str = "silu"  # silu | gelu_tanh | gelu
    gated_mlp: bool = True
    positions: str = "rope"  # rope | learned (GPT-2: a [max_positions, D] table) | alibi (BLOOM)
    rotary_dim: int | None = None  # partial rotary (GPT-NeoX, Phi-3): rotate only the first dims
    rope: RopeConfig = RopeConfig()
    # Sliding-window layers: per-layer flags and their own rope (Gemma 3: local base 10k).
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    rope_local: RopeConfig | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k, before rope
    qk_norm_all_heads: bool = False  # OLMo 2: that norm spans the whole N*H projection instead
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
    embed_norm: bool = False  # BLOOM: a LayerNorm on the embeddings
    query_scale: float | None = None  # attention scale; None -> head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    tie_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Key block of the memory-efficient attention (online softmax over blocks of this many keys:
    # memory linear in the sequence, not quadratic). Sequences of at most this many keys, and
    # calls that capture `attn_probs`, take the reference path (all scores at once); 0 = always.
    attn_block: int = 512
    # The activations' dtype. "float32": float32 whatever the params' dtype. With bf16 weights each
    # weight matmul still reads its input rounded to bf16 and accumulates in float32 (bf16 speed),
    # but everything it writes (the residual stream, q/k/v and so the KV cache, the MLP's states,
    # every site) stays float32, and the attention's own q.k and p.v run on float32: bf16 weights
    # then track float32 to >= 99% top-1 (docs/parity.md). "params": the params' dtype throughout,
    # as transformers runs a bf16 model. The same with float32 params.
    activation_dtype: str = "float32"

    def __post_init__(self):
        if not self.sliding_layers:
            object.__setattr__(self, "sliding_layers", (self.sliding_window is not None,) * self.n_layers)
        if len(self.sliding_layers) != self.n_layers:
            raise ConfigError(
                f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers"
            )
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported; choose one of {allowed}")
        if self.rotary_dim is not None and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim):
            raise ConfigError(f"rotary_dim={self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")
        if self.attn_block < 0:
            raise ConfigError(f"attn_block={self.attn_block} must be >= 0 (0 = always the reference attention)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}"
            )

    @property
    def rope_dim(self) -> int:
        """How many leading dims of each head rope rotates (all unless partial rotary)."""
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

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
        if d.pop("sandwich_norms", False):  # configs written before norm_placement existed
            d["norm_placement"] = "sandwich"
        return cls(**d)
