"""Position encodings: rotary (the half-split "rotate_half" layout transformers uses, full or
partial) and ALiBi slopes."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxlens.core.config import ConfigError, RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """[head_dim/2] float32 inverse frequencies, with the checkpoint's rope scaling applied."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.kind == "default":
        return inv_freq
    if rope.kind == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.kind == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
        low_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_wavelen = rope.original_max_positions / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ConfigError(f"rope scaling {rope.kind!r} is not supported; supported: default, linear, llama3")


def rope_tables(rope: RopeConfig, head_dim: int, positions: jnp.ndarray):
    """positions [B, T] -> (cos, sin), each [B, T, head_dim/2] float32."""
    inv_freq = jnp.asarray(inverse_frequencies(rope, head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [B, T, N, hd]; cos/sin [B, T, r/2] with r <= hd. Rotates pairs (i, i + r/2) of the first
    r dims; the other hd - r dims pass unchanged (partial rotary: GPT-NeoX, Phi-3)."""
    r = 2 * cos.shape[-1]
    # In float32, one rounding back to x.dtype: bf16 cos/sin (transformers' way) put a relative
    # 2^-9 error on each product, which x1 cos - x2 sin can cancel down to a much larger one.
    x1, x2 = jnp.split(x[..., :r].astype(jnp.float32), 2, axis=-1)
    cos = cos[:, :, None, :].astype(jnp.float32)
    sin = sin[:, :, None, :].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return jnp.concatenate([rotated, x[..., r:]], axis=-1)


def alibi_slopes(n_heads: int) -> np.ndarray:
    """[n_heads] float32 ALiBi slopes (Press et al.; BLOOM's construction for non-powers of 2)."""

    def powers_of(base_heads: int, exponents: np.ndarray) -> np.ndarray:
        base = np.float32(2.0 ** (-(2.0 ** -(math.log2(base_heads) - 3))))
        return np.power(base, exponents.astype(np.float32)).astype(np.float32)

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers_of(closest, np.arange(1, 1 + closest))
    if closest != n_heads:  # the rest interleave between the slopes of the next power of 2
        extra = min(closest, n_heads - closest)
        slopes = np.concatenate([slopes, powers_of(2 * closest, np.arange(1, 1 + 2 * extra, 2))])
    return slopes
