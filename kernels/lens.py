"""The logit lens as one fused, vocabulary-chunked, sharded kernel.

    out = logit_lens(params, resid, config=cfg, k=5, targets=ids, token_sets=sets)
    out = lens_from_tokens(params, tokens, mask, config=cfg, positions="last")  # forward + lens, one jit

Per residual row h (a layer at a sequence position) the lens reads the model's own head:
`z = softcap(W_U · FinalNorm(h))` (the tuned lens first maps h -> h + A h + b). The [V] logits are
never stored: the vocabulary is walked in chunks of `chunk` ids (`lax.scan`) and every output is a
running statistic of the chunks seen so far:

  logsumexp  running max m and  s = Σ exp(z - m)              -> lse = m + log s
  entropy    t = Σ exp(z - m)(z - m)                          -> H = log s - t / s
  top-k      the chunk's top min(k, chunk) merged into the running top-k
  targets    z_target gathered once; rank = #{v != target : z_v > z_target}
  token sets u = Σ_{v in set} exp(z - m)                       -> P(set) = u / s
  KL         w = Σ exp(z_f - m_f)(z_f - z)  against the reference logits z_f
             -> KL(final || layer) = w / s_f - lse_f + lse

When the running max grows from m to m', the sums are rescaled by exp(m - m') (t also gains
(m - m') s). The reference for the KL is `final_logits` when given, else the LAST of the L layers
passed in (pass all layers, or let `lens_from_tokens` append the last one). The vocabulary need
not divide by the chunk: the remainder is folded in as one smaller chunk after the loop, so
nothing is padded or copied.

Sharded (a mesh with axes `data`, `model`): rows split over `data` (the batch), the vocabulary over
`model` as `jaxlens.core.sharding` already places the unembedding; each device runs the chunk loop over
its vocabulary slice and the statistics are merged across `model` with pmax/psum/all_gather. Peak
extra memory is O(L*B*P*chunk) per device.

Axis letters: L layers read, B batch, P positions, D d_model, V vocab, C chunk, k top-k,
n targets per row, S token sets, M = B*P rows per layer.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jaxlens.core.config import ModelConfig
from jaxlens.core.modules import make_norm, softcap
from jaxlens.core.sharding import batch_spec, params_mesh

OUTPUTS = ("top_ids", "top_probs", "logsumexp", "entropy", "target_probs", "target_ranks", "set_probs", "kl")


# ---- the family's head: final norm, unembedding, soft-cap (one place for every family) -------


def final_norm(params, h, config: ModelConfig):
    """The model's own final norm of h [..., D] (RMSNorm, Gemma's (1+w), or LayerNorm by config), in
    the unembedding's dtype: what its matmul reads (as `core.modules.unembed`), cast once here."""
    return make_norm(config).apply({"params": params["final_norm"]}, h).astype(unembedding(params, config)[0].dtype)


def final_softcap(z, config: ModelConfig):
    """Gemma 2's final logit soft-cap c * tanh(z / c); identity for families without one."""
    return softcap(z, config.final_softcap)


def unembedding(params, config: ModelConfig):
    """(W, tied): tied -> the embedding [V, D]; untied -> unembed [D, V]. Never transposed (no copy)."""
    return (params["embedding"], True) if config.tie_embeddings else (params["unembed"], False)


def apply_translators(resid, translators):
    """Tuned lens: h -> h + A h + b per layer. resid [L, B, P, D]; A [L, D, D]; b [L, D]."""
    A, b = translators["A"], translators["b"]
    Ah = jnp.einsum("lbpj,lij->lbpi", resid, A.astype(resid.dtype))
    return resid + Ah + b.astype(resid.dtype)[:, None, None, :]


def _chunk_logits(x, w, start, size, tied):
    """x [L, M, D] against vocabulary ids [start, start+size) of w -> [L, M, C] float32."""
    if tied:  # w [V, D]
        rows = lax.dynamic_slice_in_dim(w, start, size, axis=0)  # [C, D]
        return jnp.einsum("lmd,cd->lmc", x, rows.astype(x.dtype), preferred_element_type=jnp.float32)
    cols = lax.dynamic_slice_in_dim(w, start, size, axis=1)  # [D, C]
    return jnp.einsum("lmd,dc->lmc", x, cols.astype(x.dtype), preferred_element_type=jnp.float32)


def _target_logits(x, w, targets, offset, tied, config):
    """z at the target ids [M, n] for every layer -> [L, M, n]; ids outside this vocabulary slice -> 0
    (the shards' pieces are summed)."""
    v_local = w.shape[0] if tied else w.shape[1]
    local = targets - offset
    here = (local >= 0) & (local < v_local)
    local = jnp.clip(local, 0, v_local - 1)
    rows = jnp.take(w, local, axis=0) if tied else jnp.take(w, local, axis=1).transpose(1, 2, 0)  # [M, n, D]
    z = jnp.einsum("lmd,mnd->lmn", x, rows.astype(x.dtype), preferred_element_type=jnp.float32)
    return jnp.where(here, final_softcap(z, config), 0.0)


# ---- the per-device pass over its vocabulary slice ---------------------------------------------


def _top_k(z, k, block=128):
    """Exact top-k over the last axis of z [..., C]. For k <= C / block: the k best blocks by their
    maxima hold the k best values, so only k * block candidates go through the sort (XLA:CPU's
    top_k on the whole chunk costs about as much as two passes over it)."""
    C = z.shape[-1]
    if C % block or k > C // block:
        return lax.top_k(z, min(k, C))
    blocks = z.reshape(*z.shape[:-1], C // block, block)  # [..., C/block, block]
    _, best = lax.top_k(blocks.max(-1), k)  # [..., k] block indices
    cand = jnp.take_along_axis(blocks, best[..., None], axis=-2).reshape(*z.shape[:-1], k * block)
    vals, pos = lax.top_k(cand, k)
    return vals, jnp.take_along_axis(best, pos // block, axis=-1) * block + pos % block


def _fold_chunk(st, x, wc, ids, *, tied, config, k, zt, targets, members, zf):
    """Fold one vocabulary chunk into one row tile's statistics.

    x [L, R, D] normed rows (R positions, every layer); wc the chunk of the unembedding ([C, D]
    tied, [D, C] untied); ids [C] their global ids; zt [L, R, n] target logits; targets [R, n];
    members [S, C] token-set membership; zf [R, C] reference logits (None: the last layer's)."""
    spec = "lrd,cd->lrc" if tied else "lrd,dc->lrc"
    z = final_softcap(jnp.einsum(spec, x, wc.astype(x.dtype), preferred_element_type=jnp.float32), config)  # [L, R, C]

    # logsumexp and entropy, rescaled to the new running max
    m_new = jnp.maximum(st["m"], z.max(-1))
    d = jnp.where(st["s"] > 0, st["m"] - m_new, 0.0)  # 0 before the first chunk (m = -inf)
    a = jnp.exp(d)
    zc = z - m_new[..., None]
    e = jnp.exp(zc)  # [L, R, C]
    new = {"m": m_new, "s": a * st["s"] + e.sum(-1), "t": a * (st["t"] + d * st["s"]) + (e * zc).sum(-1)}

    # running top-k: this chunk's best merged with the best so far
    vals, idx = _top_k(z, k)
    vals = jnp.concatenate([st["top_v"], vals], -1)
    gids = jnp.concatenate([st["top_i"], ids[idx]], -1)
    new["top_v"], pick = lax.top_k(vals, k)
    new["top_i"] = jnp.take_along_axis(gids, pick, -1)

    if zt is not None:  # how many other ids beat each target
        beats = (z[..., None, :] > zt[..., None]) & (ids != targets[..., None])[None]  # [L, R, n, C]
        new["rank"] = st["rank"] + beats.sum(-1, dtype=jnp.int32)
    if members is not None:
        new["u"] = a[..., None] * st["u"] + jnp.einsum("lrc,sc->lrs", e, members)

    # KL(reference || layer): the reference's own running max/sum and w = sum e_f (z_f - z)
    zf = z[-1] if zf is None else zf  # [R, C]
    mf_new = jnp.maximum(st["mf"], zf.max(-1))
    df = jnp.where(st["sf"] > 0, st["mf"] - mf_new, 0.0)
    af = jnp.exp(df)
    ef = jnp.exp(zf - mf_new[:, None])  # [R, C]
    new["sf"] = af * st["sf"] + ef.sum(-1)
    new["mf"] = mf_new
    new["w"] = af * st["w"] + (ef * (zf - z)).sum(-1)
    return new


def _scan_vocab(x, w, tied, config, *, k, chunk, tile_rows, offset, zt, targets, sets, ref):
    """Running statistics over one vocabulary slice. x [L, M, D] normed rows; w this device's slice
    of the unembedding; zt [L, M, n] target logits (already complete); targets [M, n] global ids;
    sets [S, V_local] or None; ref [M, V_local] reference logits, or None for the last layer.

    Loop order: chunks of the vocabulary outside, tiles of R positions (all L layers) inside, so a
    tile's [L, R, C] logits stay in cache while the statistics read them several times, and the
    unembedding is streamed from memory once."""
    L, M, D = x.shape
    v_local = w.shape[0] if tied else w.shape[1]
    C = min(chunk, v_local)
    R = max(1, min(M, tile_rows // L))
    T = -(-M // R)
    f32 = jnp.float32

    def tiles(a, axis):  # [..., M, ...] -> [T, ..., R, ...], padding M up to T * R
        a = jnp.pad(a, [(0, T * R - M if i == axis else 0) for i in range(a.ndim)])
        a = a.reshape(*a.shape[:axis], T, R, *a.shape[axis + 1 :])
        return jnp.moveaxis(a, axis, 0)

    xs = {"x": tiles(x, 1)}  # [T, L, R, D]
    if zt is not None:
        xs["zt"], xs["targets"] = tiles(zt, 1), tiles(targets, 0)

    def fold(st, start, size):
        """Chunk [start, start + size) (size static) into every tile's statistics."""
        wc = lax.dynamic_slice_in_dim(w, start, size, axis=0 if tied else 1)
        ids = (start + offset + jnp.arange(size)).astype(jnp.int32)
        members = None if sets is None else lax.dynamic_slice_in_dim(sets, start, size, axis=1).astype(f32)
        chunk_xs = dict(xs, st=st)
        if ref is not None:
            chunk_xs["zf"] = tiles(lax.dynamic_slice_in_dim(ref, start, size, axis=1).astype(f32), 0)  # [T, R, C]

        def tile(_, a):
            return None, _fold_chunk(a["st"], a["x"], wc, ids, tied=tied, config=config, k=k, zt=a.get("zt"),
                                     targets=a.get("targets"), members=members, zf=a.get("zf"))

        return lax.scan(tile, None, chunk_xs)[1]

    zeros = jnp.zeros((T, L, R), f32)
    st = {
        "m": jnp.full((T, L, R), -jnp.inf, f32), "s": zeros, "t": zeros,
        "top_v": jnp.full((T, L, R, k), -jnp.inf, f32), "top_i": jnp.zeros((T, L, R, k), jnp.int32),
        "mf": jnp.full((T, R), -jnp.inf, f32), "sf": jnp.zeros((T, R), f32), "w": zeros,
    }
    if zt is not None:
        st["rank"] = jnp.zeros((T, L, R, zt.shape[-1]), jnp.int32)
    if sets is not None:
        st["u"] = jnp.zeros((T, L, R, sets.shape[0]), f32)
    # Whole chunks in a loop, then the remainder as one smaller chunk: nothing padded or masked.
    n_full, tail = divmod(v_local, C)
    st, _ = lax.scan(lambda st, c: (fold(st, c * C, C), None), st, jnp.arange(n_full))
    if tail:
        st = fold(st, n_full * C, tail)

    def untile(name, a):  # [T, L, R, ...] -> [L, M, ...]; the reference's [T, R] -> [M]
        if name in ("mf", "sf"):
            return a.reshape(T * R)[:M]
        a = jnp.moveaxis(a, 0, 1)
        return a.reshape(L, T * R, *a.shape[3:])[:, :M]

    return {name: untile(name, a) for name, a in st.items()}


def _merge_shards(st, axis):
    """Combine the vocabulary slices' statistics across mesh axis `axis` (None: nothing to do)."""
    if axis is None:
        return st
    m = lax.pmax(st["m"], axis)
    a = jnp.exp(st["m"] - m)  # every slice saw finite logits, so this is finite
    out = {"m": m, "s": lax.psum(a * st["s"], axis), "t": lax.psum(a * (st["t"] + (st["m"] - m) * st["s"]), axis)}
    if "u" in st:
        out["u"] = lax.psum(a[..., None] * st["u"], axis)
    if "rank" in st:
        out["rank"] = lax.psum(st["rank"], axis)
    mf = lax.pmax(st["mf"], axis)
    af = jnp.exp(st["mf"] - mf)
    out["mf"], out["sf"], out["w"] = mf, lax.psum(af * st["sf"], axis), lax.psum(af * st["w"], axis)
    k = st["top_v"].shape[-1]
    vals = jnp.moveaxis(lax.all_gather(st["top_v"], axis), 0, -2)  # [L, M, shards, k]
    ids = jnp.moveaxis(lax.all_gather(st["top_i"], axis), 0, -2)
    out["top_v"], pick = lax.top_k(vals.reshape(*vals.shape[:-2], -1), k)
    out["top_i"] = jnp.take_along_axis(ids.reshape(*ids.shape[:-2], -1), pick, -1)
    return out


def _lens_local(x, w, targets, sets, ref, *, tied, config, k, chunk, tile_rows, axis):
    """One device's share: x [L, B, P, D] normed, w its vocabulary slice -> the outputs [L, B, P, ...]."""
    L, B, Pn, D = x.shape
    M = B * Pn
    x = x.reshape(L, M, D)
    v_local = w.shape[0] if tied else w.shape[1]
    offset = lax.axis_index(axis) * v_local if axis is not None else 0
    zt = None
    if targets is not None:
        targets = targets.reshape(M, -1)
        zt = _target_logits(x, w, targets, offset, tied, config)
        if axis is not None:
            zt = lax.psum(zt, axis)
    if ref is not None:
        ref = ref.reshape(M, -1)
    st = _scan_vocab(x, w, tied, config, k=k, chunk=chunk, tile_rows=tile_rows, offset=offset, zt=zt, targets=targets, sets=sets, ref=ref)
    st = _merge_shards(st, axis)

    log_s = jnp.log(st["s"])
    lse = st["m"] + log_s
    lse_f = st["mf"] + jnp.log(st["sf"])
    out = {
        "top_ids": st["top_i"],
        "top_probs": jnp.exp(st["top_v"] - lse[..., None]),
        "logsumexp": lse,
        "entropy": log_s - st["t"] / st["s"],
        "kl": st["w"] / st["sf"][None] - lse_f[None] + lse,
    }
    if zt is not None:
        out["target_probs"] = jnp.exp(zt - lse[..., None])
        out["target_ranks"] = st["rank"]
    if sets is not None:
        out["set_probs"] = st["u"] / st["s"][..., None]
    return {name: v.reshape(L, B, Pn, *v.shape[2:]) for name, v in out.items()}


# ---- the public kernel ---------------------------------------------------------------------------


def _check(resid, config, k, valid, targets, token_sets, final_logits, translators):
    V = config.vocab_size
    if resid.ndim != 4 or resid.shape[-1] != config.d_model:
        raise ValueError(f"resid must be [layers, batch, positions, d_model={config.d_model}]; got {tuple(resid.shape)}")
    L, B, Pn, _ = resid.shape
    if not 1 <= k <= V:
        raise ValueError(f"k={k} must be between 1 and the vocabulary size {V}")
    if valid is not None and tuple(valid.shape) != (B, Pn):
        raise ValueError(f"valid must be [batch, positions] = {(B, Pn)}; got {tuple(valid.shape)}")
    if targets is not None and not (targets.ndim == 1 or tuple(targets.shape[:2]) == (B, Pn) and targets.ndim == 3):
        raise ValueError(f"targets must be [n] or [batch, positions, n] = {(B, Pn)} + (n,); got {tuple(targets.shape)}")
    if token_sets is not None and (token_sets.ndim != 2 or token_sets.shape[1] != V):
        raise ValueError(f"token_sets must be [sets, vocab={V}] booleans; got {tuple(token_sets.shape)}")
    if final_logits is not None and tuple(final_logits.shape) != (B, Pn, V):
        raise ValueError(f"final_logits must be [batch, positions, vocab] = {(B, Pn, V)}; got {tuple(final_logits.shape)}")
    if translators is not None and (translators["A"].shape != (L, config.d_model, config.d_model) or translators["b"].shape != (L, config.d_model)):
        raise ValueError(
            f"translators must hold A [{L}, D, D] and b [{L}, D] for the {L} layers of resid; "
            f"got A {tuple(translators['A'].shape)}, b {tuple(translators['b'].shape)}"
        )


def logit_lens(params, resid, *, config: ModelConfig, valid=None, k: int = 5, targets=None, token_sets=None,
               final_logits=None, translators=None, chunk: int = 4096, tile_rows: int = 256,
               mesh: Mesh | None = None) -> dict:
    """The lens of residuals at chosen layers and positions, without materialising [L, B, P, V].

    resid [L, B, P, D]: block outputs (`resid_post`, before the final norm). valid [B, P] bool:
    False rows (padding) come back as 0 (ids and ranks -1). targets [B, P, n] or [n] int: ids whose
    probability and rank (0 = top) are wanted. token_sets [S, V] bool: the summed probability of
    each set. final_logits [B, P, V] or None: the reference of the KL(final || layer); None means the
    LAST of the L layers is the reference (pass the last layer; its own KL is then 0).
    translators {A [L, D, D], b [L, D]} or None: the tuned lens's h + A h + b before the final norm.
    mesh: where to shard (default: the mesh the params were placed on by `jaxlens.load`).

    Returns float32 arrays [L, B, P, ...]: top_ids [k] int32, top_probs [k], logsumexp, entropy,
    target_probs [n], target_ranks [n] int32 (with targets), set_probs [S] (with token_sets), kl.
    """
    _check(resid, config, k, valid, targets, token_sets, final_logits, translators)
    if mesh is None:
        mesh = params_mesh(params)
    return _logit_lens(params, resid, valid, targets, token_sets, final_logits, translators,
                       config=config, k=k, chunk=chunk, tile_rows=tile_rows, mesh=mesh)


@partial(jax.jit, static_argnames=("config", "k", "chunk", "tile_rows", "mesh"))
def _logit_lens(params, resid, valid, targets, token_sets, final_logits, translators, *, config, k, chunk, tile_rows, mesh):
    return _lens(params, resid, valid, targets, token_sets, final_logits, translators, config=config, k=k, chunk=chunk,
                 tile_rows=tile_rows, mesh=mesh)


def _lens(params, resid, valid, targets, token_sets, final_logits, translators, *, config, k, chunk, tile_rows, mesh):
    """Traceable body of `logit_lens` (called inside other jitted programs too)."""
    L, B, Pn, _ = resid.shape
    if translators is not None:
        resid = apply_translators(resid, translators)
    x = final_norm(params, resid, config)  # [L, B, P, D]
    w, tied = unembedding(params, config)
    if targets is not None:
        targets = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), (B, Pn, targets.shape[-1]))
    args = {"x": x, "w": w, "targets": targets, "sets": token_sets, "ref": final_logits}
    body = partial(_lens_local, tied=tied, config=config, k=k, chunk=chunk, tile_rows=tile_rows)

    if mesh is None:
        out = body(**args, axis=None)
    else:
        batch = batch_spec(mesh, B, warn=False)  # the data axes (data x fsdp) when they divide B
        data = batch[0] if len(batch) else None
        # Vocabulary over `model` when it divides (as jaxlens.core.sharding places the unembedding).
        vocab = "model" if mesh.shape["model"] > 1 and config.vocab_size % mesh.shape["model"] == 0 else None
        specs = {
            "x": P(None, data), "w": P(vocab, None) if tied else P(None, vocab),
            "targets": P(data), "sets": P(None, vocab), "ref": P(data, None, vocab),
        }
        in_specs = {name: (specs[name] if a is not None else None) for name, a in args.items()}
        out_spec = P(None, data)
        fn = jax.shard_map(lambda a: body(**a, axis=vocab), mesh=mesh, in_specs=(in_specs,), out_specs=out_spec, check_vma=False)
        out = fn(args)

    if valid is not None:
        keep = valid.astype(bool)[None, :, :]  # [1, B, P]
        out = {
            name: jnp.where(keep.reshape(keep.shape + (1,) * (v.ndim - 3)), v, -1 if name in ("top_ids", "target_ranks") else 0)
            for name, v in out.items()
        }
    return out


# ---- forward and lens in one program --------------------------------------------------------------


def _positions(mask, positions):
    """-> (index [B, P] into the T axis, valid [B, P]). 'last': each row's last real token; 'all':
    every position; an int array [B, P]: those positions (negative = none, masked)."""
    B, T = mask.shape
    real = mask.astype(bool)
    if isinstance(positions, str):
        if positions == "last":
            index = (T - 1 - jnp.argmax(real[:, ::-1], axis=1))[:, None]  # left or right padding
        else:  # "all"
            index = jnp.broadcast_to(jnp.arange(T), (B, T))
    else:
        index = jnp.asarray(positions, jnp.int32)
    valid = (index >= 0) & jnp.take_along_axis(real, jnp.clip(index, 0, T - 1), axis=1)
    return jnp.clip(index, 0, T - 1), valid


def lens_from_tokens(params, tokens, mask=None, *, config: ModelConfig, layers=None, positions="last", k: int = 5,
                     targets=None, token_sets=None, translators=None, embedding: bool = False, chunk: int = 4096,
                     tile_rows: int = 256, mesh: Mesh | None = None) -> dict:
    """Forward pass and logit lens in ONE jitted program: tokens [B, T] -> the lens outputs at
    `layers` (default all; a sequence of block indices) and `positions` ('last', 'all', [B, P]
    int, or packed: a pair (rows, cols) of [G, M] ints from `runtime.batching.pack_positions`, the
    real tokens of G groups of rows, so padding costs the lens nothing; outputs then [L, G, M, ...]).
    The KL reference is always the model's last layer (appended internally when not asked).
    embedding: also read the embedding output (`embed`, HF's hidden_states[0]) as the FIRST row of
    every output (then [1 + len(layers), ...]).
    translators: the tuned lens in the reference's layout (`hidden_states`): {A [n_layers, D, D],
    b [n_layers, D]}, translator 0 for the embedding output and i for block i - 1's output; the last
    block's output is the model's own and reads no translator.
    Returns `logit_lens`'s dict plus "positions" [B, P] and "valid" [B, P]; the model's own logits
    are never computed (XLA drops the unused head of the forward)."""
    from jaxlens.core.forward import check_tokens

    tokens = jnp.asarray(tokens, jnp.int32)
    check_tokens(config, tokens)
    mask = jnp.ones(tokens.shape, jnp.int32) if mask is None else jnp.asarray(mask)
    n = config.n_layers
    layers = tuple(range(n)) if layers is None else tuple(int(i) % n for i in layers)
    if isinstance(positions, str) and positions not in ("last", "all"):
        raise ValueError(f"positions={positions!r}: use 'last', 'all' or a [batch, positions] int array")
    if isinstance(positions, tuple):
        rows, cols = (jnp.asarray(a, jnp.int32) for a in positions)
        if rows.ndim != 2 or rows.shape != cols.shape or tokens.shape[0] % rows.shape[0]:
            raise ValueError(f"packed positions must be (rows, cols) of one shape [groups, M], the groups dividing the "
                             f"batch of {tokens.shape[0]}; got {tuple(rows.shape)} and {tuple(cols.shape)}")
        positions = (rows, cols)
    elif not isinstance(positions, str):
        positions = jnp.asarray(positions, jnp.int32)
        if positions.ndim != 2 or positions.shape[0] != tokens.shape[0]:
            raise ValueError(f"positions must be 'last', 'all' or [batch, positions] ints; got shape {tuple(positions.shape)}")
    if targets is not None:
        targets = jnp.asarray(targets, jnp.int32)
    D = config.d_model
    if translators is not None and (tuple(translators["A"].shape) != (n, D, D) or tuple(translators["b"].shape) != (n, D)):
        raise ValueError(
            f"translators must hold A [{n}, {D}, {D}] and b [{n}, {D}]: one per hidden state the tuned lens reads (the "
            f"embedding output and blocks 0..{n - 2}); got A {tuple(translators['A'].shape)}, b {tuple(translators['b'].shape)}"
        )
    if mesh is None:
        mesh = params_mesh(params)
    return _lens_from_tokens(params, tokens, mask, None if isinstance(positions, str) else positions, targets, token_sets,
                             translators, config=config, layers=layers, mode=positions if isinstance(positions, str) else None,
                             embedding=bool(embedding), k=k, chunk=chunk, tile_rows=tile_rows, mesh=mesh)


def hidden_states(sites):
    """HF's output_hidden_states[:-1] from captured `embed` and `resid_post`: [L, B, T, D], row 0 the
    embedding output and row i block i - 1's output. These are the L states the tuned lens translates
    (the reference's index i); the last block's output, the model's own, is left out."""
    return jnp.concatenate([sites["embed"][None], sites["resid_post"][:-1]], axis=0)


def translators_at_blocks(translators):
    """Tuned-lens translators (index 0 the embedding output, i block i - 1) re-indexed by block output:
    block l reads translator l + 1; the last block, the model's own output, the identity (zeros)."""
    return jax.tree.map(lambda a: jnp.concatenate([a[1:], jnp.zeros_like(a[:1])], axis=0), translators)


@partial(jax.jit, static_argnames=("config", "layers", "mode", "embedding", "k", "chunk", "tile_rows", "mesh"))
def _lens_from_tokens(params, tokens, mask, positions, targets, token_sets, translators, *, config, layers, mode, embedding,
                      k, chunk, tile_rows, mesh):
    from jaxlens.core.forward import forward
    from jaxlens.core.reducers import Take, TakePacked
    from jaxlens.core.sharding import constrain_batch, weights_mesh

    tokens, mask = constrain_batch(mesh, tokens, mask)  # host arrays in: the batch still splits
    if isinstance(positions, tuple):  # packed: the groups' real tokens, [G, M]
        take = TakePacked("resid_post", *positions)
        index = positions[1]
        valid = (index >= 0) & take(mask.astype(bool), None)
    else:
        index, valid = _positions(mask, mode if mode is not None else positions)
        take = Take("resid_post", index)
    # Each layer keeps only the read positions ([L, B, P, D]), never the whole [L, B, T, D].
    with weights_mesh(mesh):  # traced params: the forward gathers each layer over fsdp as it goes
        _, sites = forward(params, tokens, mask, config=config, capture=("embed",) if embedding else (),
                           reducers={"read": take})
    read = layers if layers[-1] == config.n_layers - 1 else layers + (config.n_layers - 1,)  # + the reference
    resid = sites["read"][jnp.asarray(read)]  # [L', B, P, D]
    if translators is not None:
        at_blocks = jax.tree.map(lambda a: a[jnp.asarray(read)], translators_at_blocks(translators))
        translators = jax.tree.map(lambda e, a: jnp.concatenate([e[:1], a]), translators, at_blocks) if embedding else at_blocks
    if embedding:  # [B, T, D] (no layer axis): read at the same positions
        resid = jnp.concatenate([take(sites["embed"], None)[None], resid], axis=0)
    if targets is not None and targets.ndim == 3 and targets.shape[1] != index.shape[1]:
        raise ValueError(f"targets [B, P, n] must have P = {index.shape[1]} positions; got {tuple(targets.shape)}")
    out = _lens(params, resid, valid, targets, token_sets, None, translators, config=config, k=k, chunk=chunk,
                tile_rows=tile_rows, mesh=mesh)
    out = {name: v[: embedding + len(layers)] for name, v in out.items()}  # drop the appended reference
    return {**out, "positions": index, "valid": valid}


# ---- full logits, for small inputs (the tuned lens's training loss, references) -------------------


def logits_of(params, resid, *, config: ModelConfig):
    """Full logits [..., V] float32 of residuals (for small inputs and references only)."""
    normed = final_norm(params, resid, config)
    w, tied = unembedding(params, config)
    spec = "...d,vd->...v" if tied else "...d,dv->...v"
    return final_softcap(jnp.einsum(spec, normed, w.astype(normed.dtype), preferred_element_type=jnp.float32), config)


# ---- log-probabilities of given tokens: teacher-forced phrases (Lim et al., METHODS.md §1) ----------


def _lse_local(x, w, *, tied, config, chunk):
    """Running (max m, s = Σ exp(z - m)) of the lens logits of x [L, M, D] over this device's
    vocabulary slice, in chunks (the [L, M, V] logits never exist): -> (m, s) [L, M]."""
    v_local = w.shape[0] if tied else w.shape[1]
    C = min(chunk, v_local)

    def fold(carry, start, size):
        m, s = carry
        z = final_softcap(_chunk_logits(x, w, start, size, tied), config)  # [L, M, C]
        m_new = jnp.maximum(m, z.max(-1))
        return m_new, s * jnp.exp(m - m_new) + jnp.exp(z - m_new[..., None]).sum(-1)  # exp(-inf) = 0 at the start

    L, M, _ = x.shape
    carry = (jnp.full((L, M), -jnp.inf, jnp.float32), jnp.zeros((L, M), jnp.float32))
    n_full, tail = divmod(v_local, C)
    carry, _ = lax.scan(lambda c, i: (fold(c, i * C, C), None), carry, jnp.arange(n_full))
    if tail:  # the remainder as one smaller chunk, as in `_scan_vocab`
        carry = fold(carry, n_full * C, tail)
    return carry


def _logprobs_local(x, w, targets, *, tied, config, chunk, axis):
    """One device's share: x [L, B, P, D] normed, targets [B, P, n] -> log-probs [L, B, P, n]."""
    L, B, Pn, D = x.shape
    x = x.reshape(L, B * Pn, D)
    v_local = w.shape[0] if tied else w.shape[1]
    offset = lax.axis_index(axis) * v_local if axis is not None else 0
    zt = _target_logits(x, w, targets.reshape(B * Pn, -1), offset, tied, config)  # [L, M, n]
    m, s = _lse_local(x, w, tied=tied, config=config, chunk=chunk)
    if axis is not None:  # merge the vocabulary slices: each slice's sum rescaled to the global max
        zt = lax.psum(zt, axis)
        m_all = lax.pmax(m, axis)
        s, m = lax.psum(s * jnp.exp(m - m_all), axis), m_all
    return (zt - (m + jnp.log(s))[..., None]).reshape(L, B, Pn, -1)


def _logprobs(params, resid, targets, translators, *, config, chunk, mesh):
    """Traceable body of `target_logprobs`: resid [L, B, P, D], targets [B, P, n] int32."""
    B = resid.shape[1]
    if translators is not None:
        resid = apply_translators(resid, translators)
    x = final_norm(params, resid, config)
    w, tied = unembedding(params, config)
    body = partial(_logprobs_local, tied=tied, config=config, chunk=chunk)
    if mesh is None:
        return body(x, w, targets, axis=None)
    data = "data" if B % mesh.shape["data"] == 0 else None
    vocab = "model" if mesh.shape["model"] > 1 and config.vocab_size % mesh.shape["model"] == 0 else None
    specs = (P(None, data), P(vocab, None) if tied else P(None, vocab), P(data))
    fn = jax.shard_map(lambda a, b, c: body(a, b, c, axis=vocab), mesh=mesh, in_specs=specs, out_specs=P(None, data),
                       check_vma=False)
    return fn(x, w, targets)


def target_logprobs(params, resid, targets, *, config: ModelConfig, valid=None, translators=None, chunk: int = 4096,
                    mesh: Mesh | None = None):
    """log softmax(lens_l(h))[target] of residuals resid [L, B, P, D] at ids targets [B, P, n] (or
    [n]) -> [L, B, P, n] float32, in log space (no underflow where a layer puts ~0 on the token).

    Only the logsumexp runs over the vocabulary (chunked, as `logit_lens`; vocabulary split over
    `model` on a mesh) and the target logits are gathered once, so it costs less than `logit_lens`
    with targets (no top-k, entropy or KL). valid [B, P] bool: False rows come back as 0."""
    _check(resid, config, 1, valid, targets, None, None, translators)
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be a positive number of vocabulary ids")
    if mesh is None:
        mesh = params_mesh(params)
    L, B, Pn, _ = resid.shape
    targets = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), (B, Pn, np.shape(targets)[-1]))
    out = _target_logprobs(params, resid, targets, translators, config=config, chunk=chunk, mesh=mesh)
    return out if valid is None else jnp.where(jnp.asarray(valid, bool)[None, :, :, None], out, 0.0)


@partial(jax.jit, static_argnames=("config", "chunk", "mesh"))
def _target_logprobs(params, resid, targets, translators, *, config, chunk, mesh):
    return _logprobs(params, resid, targets, translators, config=config, chunk=chunk, mesh=mesh)


def phrase_logprobs(params, tokens, mask, target, *, config: ModelConfig, width: int | None = None, chunk: int = 4096,
                    translators=None, mesh: Mesh | None = None):
    """Latent log-probability of a teacher-forced phrase at every layer, forward and lens in ONE program.

    tokens, mask [B, T]: prefix + phrase, left-padded (`runtime.batching.make_batches`); target
    [B, T] bool: the phrase's tokens x_t..x_T (the last columns of their row). Returns [L, B]
    float32: log p^l(phrase) = Σ_τ log softmax(lens_l(h_{τ-1}))[x_τ], h_{τ-1} being the block-l
    state at the position before x_τ (the one predicting it). At the last layer it is the model's
    own teacher-forced log-probability of the phrase.

    Only the `width` last positions are read (default: the longest phrase; a static shape, so
    pass a rounded value to compile fewer programs), taken inside the scanned layers by a `Take`
    reducer: neither [L, B, T, D] nor any [.., V] array is formed."""
    tokens = np.asarray(tokens, np.int32) if not isinstance(tokens, jax.Array) else tokens
    B, T = tokens.shape
    if np.shape(mask) != (B, T) or np.shape(target) != (B, T):
        raise ValueError(f"mask and target must be [batch, tokens] = {(B, T)}; got {np.shape(mask)}, {np.shape(target)}")
    if width is None:
        width = int(np.asarray(target).sum(-1).max())
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be a positive number of vocabulary ids")
    if not 1 <= width <= T - 1:
        raise ValueError(f"width={width} must be between 1 and T - 1 = {T - 1} (the first token has no state predicting it)")
    if not isinstance(target, jax.Array) and np.asarray(target)[:, : T - width].any():
        raise ValueError(f"target marks tokens before the last width={width} columns: phrases must end their row "
                         "(left padding) and fit in width")
    if mesh is None:
        mesh = params_mesh(params)
    return _phrase_logprobs(params, tokens, jnp.asarray(mask), jnp.asarray(target, bool), translators, config=config,
                            width=int(width), chunk=chunk, mesh=mesh)


@partial(jax.jit, static_argnames=("config", "width", "chunk", "mesh"))
def _phrase_logprobs(params, tokens, mask, target, translators, *, config, width, chunk, mesh):
    from jaxlens.core.forward import forward
    from jaxlens.core.reducers import Take
    from jaxlens.core.sharding import constrain_batch

    tokens, mask, target = constrain_batch(mesh, tokens, mask, target)
    B, T = tokens.shape
    read = jnp.broadcast_to(jnp.arange(T - 1 - width, T - 1, dtype=jnp.int32), (B, width))  # the predicting states
    _, sites = forward(params, tokens, mask, config=config, reducers={"read": Take("resid_post", read)})
    lp = _logprobs(params, sites["read"], tokens[:, T - width :, None], translators, config=config, chunk=chunk,
                   mesh=mesh)[..., 0]  # [L, B, width]
    return jnp.where(target[None, :, T - width :], lp, 0.0).sum(-1)
