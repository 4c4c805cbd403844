"""The shared decoder: one set of Flax linen modules, switched by `ModelConfig`.

Why linen and not NNX: `nn.scan` stacks the layers once (compile time flat in depth), and
`apply(..., mutable=[site, ...])` turns on exactly the `sow` calls a caller names: a site that is
not asked for is never written, so capturing nothing costs nothing. The public surface is the pure
function `forward(params, tokens, mask, config=..., capture=...)` in `jaxlens.core.forward`.

Axis letters in comments: B batch, T query tokens, S key tokens, D d_model, N q heads,
K kv heads, G q heads per kv head, H head_dim, F d_ff, V vocab, L layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.core.config import ModelConfig
from jaxlens.core.interventions import apply_at
from jaxlens.core.rope import alibi_slopes, apply_rope
from jaxlens.core.sharding import gathered
from jaxlens.core.sites import LAYER_SITES

# Reducer outputs go to their own collection, under "reducer:<name>" (never a site or module name).
REDUCED = "reduced"
REDUCED_PREFIX = "reducer:"

# Masked attention scores: a large finite negative, so fully masked (padding) rows stay finite.
_MASKED = -1e30


def _keep(_, new):
    return new


def sow(module: nn.Module, site: str, value: jnp.ndarray) -> None:
    """Store `value` under collection `site` only if the caller made that collection mutable."""
    module.sow(site, "sown", value, init_fn=lambda: None, reduce_fn=_keep)


class SiteContext(NamedTuple):
    """What a layer site needs besides its value: passed down the scanned block."""

    layer: jnp.ndarray  # int32 scalar: this layer's index
    mask: jnp.ndarray  # [B, T] attention mask (1 = real token)
    interventions: Any  # None, an Intervention or a Compose (jaxlens.core.interventions)
    reducers: dict  # {name: reducer}; see jaxlens.core.reducers


def site(module: nn.Module, ctx: SiteContext, name: str, value: jnp.ndarray) -> jnp.ndarray:
    """A named point of the layer: interventions at `name` change the value, then it is captured
    (if asked) and reduced by every reducer of `name`. Returns the value the layer goes on with."""
    value = apply_at(ctx.interventions, name, value, ctx.layer)
    sow(module, name, value)
    for key, reducer in ctx.reducers.items():
        if reducer.site == name:
            module.sow(REDUCED, REDUCED_PREFIX + key, reducer(value, ctx), init_fn=lambda: None, reduce_fn=_keep)
    return value


def _activation(name: str):
    return {
        "silu": jax.nn.silu,
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    }[name]


class RMSNorm(nn.Module):
    eps: float
    plus_one: bool = False  # Gemma stores w and scales by (1 + w)

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros if self.plus_one else nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = scale.astype(jnp.float32)
        return (normed * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias (GPT-2, GPT-NeoX, BLOOM), computed in float32."""

    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def make_norm(cfg: ModelConfig, name: str | None = None) -> nn.Module:
    """The model's norm (block norms, final norm): RMSNorm or LayerNorm as the family says."""
    if cfg.norm == "layer":
        return LayerNorm(cfg.norm_eps, name=name)
    return RMSNorm(cfg.norm_eps, cfg.norm_plus_one, name=name)


def softcap(x, cap: float | None):
    """Gemma 2's soft-capping: cap * tanh(x / cap); identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def unembed(params, h, cfg: ModelConfig):
    """Final-normed states h [..., D] -> logits [..., V] float32: the (tied or own) unembedding,
    then Gemma 2's final soft-cap. The one place logits are made (forward, lens, scoring)."""
    # Gathered over fsdp (still split over model), so the batch stays split over data x fsdp.
    # h is read in the weights' dtype, as every matmul (Linear): a float32 residual stream never
    # makes a float32 copy of a bf16 [V, D] matrix.
    if cfg.tie_embeddings:  # contract with the embedding's own [V, D] layout: no transpose copy
        w = gathered("embedding", params["embedding"])
        logits = jnp.einsum("...d,vd->...v", h.astype(w.dtype), w, preferred_element_type=jnp.float32)
    else:
        w = gathered("unembed", params["unembed"])
        logits = jnp.einsum("...d,dv->...v", h.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return softcap(logits, cfg.final_softcap)


def token_nll(params, h, targets, cfg: ModelConfig, chunk: int = 8192):
    """-log p(targets) [B, T] float32 from final-normed states h [B, T, D]: `unembed` then log-
    softmax, with the vocabulary read `chunk` columns at a time (a running max and sum, one
    shorter last chunk), so the [B, T, V] float32 logits never exist."""
    tied = cfg.tie_embeddings
    w = gathered("embedding", params["embedding"]) if tied else gathered("unembed", params["unembed"])
    axis, spec = (0, "btd,vd->btv") if tied else (1, "btd,dv->btv")
    h = h.astype(w.dtype)  # read in the weights' dtype, as `unembed`

    def step(carry, start, size):
        m, total = carry
        cols = jax.lax.dynamic_slice_in_dim(w, start, size, axis=axis)
        z = softcap(jnp.einsum(spec, h, cols, preferred_element_type=jnp.float32), cfg.final_softcap)
        m_new = jnp.maximum(m, z.max(-1))
        return m_new, total * jnp.exp(m - m_new) + jnp.exp(z - m_new[..., None]).sum(-1)

    n, tail = divmod(cfg.vocab_size, chunk)
    carry = (jnp.full(h.shape[:-1], -jnp.inf, jnp.float32), jnp.zeros(h.shape[:-1], jnp.float32))
    if n:
        carry = jax.lax.fori_loop(0, n, lambda i, c: step(c, i * chunk, chunk), carry)
    if tail:
        carry = step(carry, n * chunk, tail)
    m, total = carry
    gold_w = jnp.take(w, targets, axis=axis)  # [B, T, D] (tied) or [D, B, T]
    gold_w = gold_w if tied else jnp.moveaxis(gold_w, 0, -1)
    gold = jnp.einsum("btd,btd->bt", h, gold_w, preferred_element_type=jnp.float32)
    return m + jnp.log(total) - softcap(gold, cfg.final_softcap)


class Linear(nn.Module):
    """x [..., in] -> [..., *out_shape], kernel [in, *out_shape]; einsum so heads stay an axis.
    Computes in the kernel's dtype (x rounded to it: bf16 weights, bf16 matmul, float32 accumulation)
    and returns x's dtype, the activations' (`ModelConfig.activation_dtype`): with float32
    activations nothing a matmul writes is rounded to bf16."""

    out_shape: tuple[int, ...]
    in_axes: int = 1  # how many trailing input axes are contracted
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.in_axes :]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*in_shape, *self.out_shape), x.dtype)
        kernel = gathered("/".join(self.path) + "/kernel", kernel)  # this layer's weights, whole over fsdp
        letters = "abcdefgh"
        ins, outs = letters[: self.in_axes], letters[self.in_axes : self.in_axes + len(self.out_shape)]
        # float32 accumulation and bias, one rounding to x.dtype (as torch's addmm in bf16): a bias
        # that cancels most of the product would otherwise add the product's rounding error.
        y = jnp.einsum(f"...{ins},{ins}{outs}->...{outs}", x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, self.out_shape, x.dtype).astype(jnp.float32)
        return y.astype(x.dtype)


class Keys(NamedTuple):
    """Which keys each query sees, two ways: the materialised mask (the reference path) and the
    vectors it is made of (the blocked path rebuilds each block's slice of it, so the [T, S] mask
    is never stored)."""

    mask: jnp.ndarray  # [B,1,1,T,S] bool (True = attend)
    valid: jnp.ndarray  # [B,S] bool: the key is a real token
    positions: jnp.ndarray  # [B,T] the queries' positions
    key_positions: jnp.ndarray  # [B,S]
    window: jnp.ndarray  # int32 scalar: a query sees keys fewer than this many positions back

    def block(self, start, size: int, T: int):
        """Columns [start, start + size) of `mask`, from the vectors: [B,1,1,T,size]."""
        S = self.valid.shape[1]
        cols = start + jnp.arange(size)
        causal = cols[None, :] <= jnp.arange(S - T, S)[:, None]  # [T,C]
        key_pos = jax.lax.dynamic_slice_in_dim(self.key_positions, start, size, axis=1)
        valid = jax.lax.dynamic_slice_in_dim(self.valid, start, size, axis=1)
        near = self.positions[:, :, None] - key_pos[:, None, :] < self.window
        return (causal[None] & valid[:, None, :] & near)[:, None, None]


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, keys: Keys, past=None):
        """x [B,T,D]; cos/sin [B,T,R/2]; keys: which keys each query sees (S of them); past: the
        keys and values of S - T earlier tokens, in parts read in order (((k, v), ...), each
        [B,S_i,K,H], after rope) or None (S = T). Returns (out [B,T,D], (k, v) of these T tokens)."""
        c = self.cfg
        G = c.n_heads // c.n_kv_heads
        q = Linear((c.n_heads, c.head_dim), use_bias=c.qkv_bias, name="q")(x)  # [B,T,N,H]
        k = Linear((c.n_kv_heads, c.head_dim), use_bias=c.qkv_bias, name="k")(x)  # [B,S,K,H]
        v = Linear((c.n_kv_heads, c.head_dim), use_bias=c.qkv_bias, name="v")(x)  # [B,S,K,H]
        if c.qk_norm:  # over each head; OLMo 2: over the whole [N*H] projection at once
            span = (lambda t: t.reshape(*t.shape[:2], -1)) if c.qk_norm_all_heads else (lambda t: t)
            q = RMSNorm(c.norm_eps, c.norm_plus_one, name="q_norm")(span(q)).reshape(q.shape)
            k = RMSNorm(c.norm_eps, c.norm_plus_one, name="k_norm")(span(k)).reshape(k.shape)
        if c.positions == "rope":
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        new_kv = (k, v)
        # With a cache, the keys/values are read in parts (earlier tokens' parts, these) and only the
        # [.., T, S] scores are joined: concatenating the cache would copy it, and under a vmapped
        # sweep (one shared cache, many interventions) copy it once per point.
        parts = [tuple(p.astype(n.dtype) for p, n in zip(part, new_kv)) for part in past or ()] + [new_kv]
        B, T = q.shape[:2]
        q = q.reshape(B, T, c.n_kv_heads, G, c.head_dim)  # [B,T,K,G,H]
        S = keys.valid.shape[1]
        if self.is_mutable_collection("attn_probs") or c.attn_block == 0 or S <= c.attn_block:
            ctx = self._reference(q, parts, keys)
        else:
            ctx = self._blocked(q, parts, keys)
        ctx = ctx.reshape(B, T, c.n_heads, c.head_dim)
        return Linear((c.d_model,), in_axes=2, use_bias=c.o_bias, name="o")(ctx), new_kv  # [B,T,D]

    def _bias(self, scores, key_positions, mask):
        """Raw q.k scores [B,K,G,T,C] float32 -> the ones softmax reads: scale, ALiBi, soft-cap, mask."""
        c = self.cfg
        scores = scores * c.attn_scale
        if c.positions == "alibi":  # + slope(head) * key position; softmax ignores the query's share
            slopes = jnp.asarray(alibi_slopes(c.n_heads)).reshape(c.n_kv_heads, -1)
            scores = scores + slopes[None, :, :, None, None] * key_positions[:, None, None, None, :].astype(jnp.float32)
        scores = softcap(scores, c.attn_softcap)
        return scores + jnp.where(mask, 0.0, _MASKED)  # added, not selected: XLA fuses it into the softmax

    def _reference(self, q, parts, keys: Keys):
        """Every score at once ([B,K,G,T,S] float32): the reference, and what `attn_probs` captures."""
        scores = jnp.concatenate([jnp.einsum("btkgh,bskh->bkgts", q, pk, preferred_element_type=jnp.float32)
                                  for pk, _ in parts], axis=-1)
        probs = jax.nn.softmax(self._bias(scores, keys.key_positions, keys.mask), axis=-1)
        B, T = q.shape[:2]
        sow(self, "attn_probs", probs.reshape(B, self.cfg.n_heads, T, -1))
        starts = np.cumsum([0] + [pv.shape[1] for _, pv in parts])
        # probs in the values' dtype (as transformers), summed in float32 over keys and parts.
        out = sum(jnp.einsum("bkgts,bskh->btkgh", probs[..., a:b].astype(pv.dtype), pv, preferred_element_type=jnp.float32)
                  for (_, pv), a, b in zip(parts, starts[:-1], starts[1:]))  # [B,T,K,G,H]
        return out.astype(parts[-1][1].dtype)

    def _blocked(self, q, parts, keys: Keys):
        """The same attention as an online softmax over blocks of `attn_block` keys, with a float32
        running max, sum and output: memory O(T x block) per layer, never O(T x S). Each part (cache,
        new tokens) is read in place, block by block, plus one shorter last block: nothing is
        padded or concatenated."""
        block, f32 = self.cfg.attn_block, jnp.float32
        B, T, K, G, H = q.shape

        def step(carry, k, v, start):
            m, total, out = carry  # [B,K,G,T], [B,K,G,T], [B,T,K,G,H]
            size = k.shape[1]
            key_pos = jax.lax.dynamic_slice_in_dim(keys.key_positions, start, size, axis=1)
            raw = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=f32)
            scores = self._bias(raw, key_pos, keys.block(start, size, T))
            m_new = jnp.maximum(m, scores.max(-1))  # finite: masked scores are finite too
            p = jnp.exp(scores - m_new[..., None])
            rescale = jnp.exp(m - m_new)  # 0 on the first block (m = -inf)
            pv = jnp.einsum("bkgts,bskh->btkgh", p.astype(v.dtype), v, preferred_element_type=f32)
            return m_new, total * rescale + p.sum(-1), out * jnp.moveaxis(rescale, -1, 1)[..., None] + pv

        carry = (jnp.full((B, K, G, T), -jnp.inf, f32), jnp.zeros((B, K, G, T), f32), jnp.zeros(q.shape, f32))
        offset = 0
        for k, v in parts:
            n, tail = divmod(k.shape[1], block)

            def body(i, carry, k=k, v=v, offset=offset):
                cut = lambda a: jax.lax.dynamic_slice_in_dim(a, i * block, block, axis=1)  # noqa: E731
                return step(carry, cut(k), cut(v), offset + i * block)

            if n:  # a part shorter than one block (a decode step's new token) is only its tail
                carry = jax.lax.fori_loop(0, n, body, carry)
            if tail:
                carry = step(carry, k[:, n * block :], v[:, n * block :], offset + n * block)
            offset += k.shape[1]
        _, total, out = carry
        return (out / jnp.moveaxis(total, -1, 1)[..., None]).astype(parts[-1][1].dtype)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, ctx: SiteContext):
        c = self.cfg
        act = _activation(c.activation)
        if c.gated_mlp:
            # gate and up as one [D, 2, F] kernel: one wide matmul runs ~1.4x faster on CPU than two.
            gate_up = Linear((2, c.d_ff), use_bias=c.mlp_bias, name="gate_up")(x)  # [B,T,2,F]
            neurons = site(self, ctx, "mlp_act", act(gate_up[..., 0, :]))  # [B,T,F]
            hidden = neurons * gate_up[..., 1, :]
        else:
            hidden = neurons = site(self, ctx, "mlp_act", act(Linear((c.d_ff,), use_bias=c.mlp_bias, name="up")(x)))
        hidden = site(self, ctx, "mlp_hidden", hidden)
        return Linear((c.d_model,), use_bias=c.mlp_bias, name="down")(hidden)  # [B,T,D]


class Block(nn.Module):
    """One decoder layer; `nn.scan` stacks it over layers (params get a leading [L] axis).
    Scanned per layer: (sliding?, index, earlier tokens' keys/values in parts, or None); the layer's own
    keys/values are its scan output when `return_kv`."""

    cfg: ModelConfig
    return_kv: bool = False

    @nn.compact
    def __call__(self, x, layer_in, shared):
        c = self.cfg
        sliding, layer, past = layer_in
        ctx = SiteContext(layer, shared["attention_mask"], shared["interventions"], shared["reducers"])
        cos = jnp.where(sliding, shared["cos_local"], shared["cos"])
        sin = jnp.where(sliding, shared["sin_local"], shared["sin"])
        no_window = jnp.iinfo(jnp.int32).max
        window = no_window if c.sliding_window is None else jnp.where(sliding, c.sliding_window, no_window)
        keys = Keys(jnp.where(sliding, shared["mask_local"], shared["mask"]), shared["key_mask"], shared["positions"],
                    shared["key_positions"], jnp.asarray(window, jnp.int32))
        pre = c.norm_placement in ("pre", "sandwich")  # a norm before attention / MLP
        post = c.norm_placement in ("sandwich", "post")  # a norm on what they add to the residual
        norm = lambda name, h, here: make_norm(c, name)(h) if here else h  # noqa: E731

        x = site(self, ctx, "resid_pre", x)
        attn, kv = Attention(c, name="attn")(norm("attn_norm", x, pre), cos, sin, keys, past)
        attn = norm("post_attn_norm", attn, post)
        attn = site(self, ctx, "attn_out", attn)
        block_in = x
        x = site(self, ctx, "resid_mid", x + attn)
        # Parallel residual (GPT-NeoX): the MLP reads the block input; resid_mid is then only a sum.
        mlp = MLP(c, name="mlp")(norm("mlp_norm", block_in if c.parallel_residual else x, pre), ctx)
        mlp = norm("post_mlp_norm", mlp, post)
        mlp = site(self, ctx, "mlp_out", mlp)
        x = site(self, ctx, "resid_post", x + mlp)
        return x, (kv if self.return_kv else None)


class Transformer(nn.Module):
    """tokens [B,T] -> logits [B,T,V]; with `past` (((k, v), ...): keys and values [L,B,S_i,K,H] of
    earlier tokens, in parts read in order) the T tokens continue them. With `return_kv`, returns
    (logits, their keys/values)."""

    cfg: ModelConfig
    return_kv: bool = False

    @nn.compact
    def __call__(self, tokens, shared, past=None):
        c = self.cfg
        embedding = self.param("embedding", nn.initializers.normal(0.02), (c.vocab_size, c.d_model))
        x = jnp.take(gathered("embedding", embedding), tokens, axis=0)  # [B,T,D]
        x = x.astype(jnp.float32 if c.activation_dtype == "float32" else embedding.dtype)  # the activations' dtype
        if c.embed_scale:
            x = x * jnp.asarray(c.d_model**0.5, dtype=x.dtype)
        if c.positions == "learned":  # GPT-2: + a learned vector per position
            table = self.param("pos_embedding", nn.initializers.normal(0.02), (c.max_positions, c.d_model))
            x = x + jnp.take(table, shared["positions"], axis=0).astype(x.dtype)
        if c.embed_norm:  # BLOOM
            x = LayerNorm(c.norm_eps, name="embed_norm")(x)
        sow(self, "embed", x)

        Stack = nn.scan(
            Block,
            variable_axes={"params": 0, REDUCED: 0, **{name: 0 for name in LAYER_SITES}},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=c.n_layers,
        )
        per_layer = (jnp.asarray(c.sliding_layers, dtype=bool), jnp.arange(c.n_layers, dtype=jnp.int32), past)
        x, kv = Stack(c, self.return_kv, name="layers")(x, per_layer, shared)

        x = make_norm(c, "final_norm")(x)
        sow(self, "final_norm", x)
        if not c.tie_embeddings:
            self.param("unembed", nn.initializers.normal(0.02), (c.d_model, c.vocab_size))
        logits = unembed(self.variables["params"], x, c)
        return (logits, kv) if self.return_kv else logits
