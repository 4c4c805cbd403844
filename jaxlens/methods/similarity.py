"""Representation similarity of parallel prompts, per layer, each language against English
(Lim et al. 2505.13141, METHODS.md §1): linear CKA and cosine (raw and mean-centred), at the
last prompt token and mean-pooled over the prompt.

    states = prompt_states(model, texts)            # {"last": [N, L, D], "mean": [N, L, D]}
    sim = similarity(states_xx, states_en)          # per pooling: CKA [L] with bands, cosines

The pooling runs inside the scanned layers (`core.reducers.Take` at the last token,
`WeightedMean` over the prompt), so only [L, B, D] per batch leaves the device, never
[L, B, T, D]. The mean skips each prompt's first token: BOS where the tokenizer adds one (the
same token at the same position in every language), else the first word, and in either case
the attention sink whose state grows a norm orders above the rest in the middle layers
(SmolLM2 from about 40% depth), which would make every pair of prompts look alike.

CKA is computed from the items' Gram matrices (linear kernel, centred: HKH), which equals the
feature-space form ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) and makes the bootstrap over
items cheap (resample rows and columns of K, no new products of D-wide states).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.methods.bootstrap import bootstrap_mean

POOLINGS = ("last", "mean")


@partial(jax.jit, static_argnames=("config",))
def pooled_states(params, tokens, mask, weights, *, config):
    """{"last": [B, L, D], "mean": [B, L, D]} float32 at site resid_post (block outputs); weights
    [B, T] the positions the mean runs over."""
    from jaxlens.core import interventions as iv
    from jaxlens.core.forward import forward
    from jaxlens.core.reducers import Take, WeightedMean

    reducers = {"last": Take("resid_post", iv.last_index(mask)[:, None]), "mean": WeightedMean("resid_post", weights)}
    _, sites = forward(params, tokens, mask, config=config, reducers=reducers)
    return {"last": jnp.swapaxes(sites["last"][:, :, 0], 0, 1).astype(jnp.float32), "mean": jnp.swapaxes(sites["mean"], 0, 1)}


def prompt_states(model, texts: Sequence[str], *, batch_rows: int = 8, progress: bool = False) -> dict[str, np.ndarray]:
    """{"last": [N, L, D], "mean": [N, L, D]} of each text (encoded with the special tokens), in
    bucketed fixed-size batches over the mesh."""
    from jaxlens.runtime.batching import text_batches
    from jaxlens.runtime.loop import stream
    from jaxlens.runtime.placement import batch_rows as rows_for

    batches = text_batches(model, texts, rows_for(model.mesh, batch_rows))
    step = lambda b, tokens, mask, weights: pooled_states(model.params, tokens, mask, weights, config=model.config)  # noqa: E731

    def weights(b):  # the real tokens less each row's first (left padding: first = first nonzero mask column)
        w = b.mask.copy()
        w[np.arange(len(w)), np.argmax(b.mask, axis=1)] = 0
        return w
    parts: dict[str, list] = {"last": [], "mean": []}
    for b, out in stream(batches, step, mesh=model.mesh,
                         inputs=lambda b: (b.tokens, b.mask, weights(b)), desc="states", progress=progress):
        for key in parts:
            parts[key].append(out[key][: b.n_real])
    return {key: np.concatenate(v).astype(np.float64) for key, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# Linear CKA (Kornblith et al. 2019), from Gram matrices


def _centre_gram(K):
    """H K H over the last two axes (H = I - 11^T / n): double centring."""
    return K - K.mean(-1, keepdims=True) - K.mean(-2, keepdims=True) + K.mean((-2, -1), keepdims=True)


def cka_from_grams(K, G):
    """Linear CKA of two sets of n rows given their Gram matrices K, G [..., n, n] -> [...]
    (0 where either side is constant)."""
    Kc, Gc = _centre_gram(K), _centre_gram(G)
    num = (Kc * Gc).sum((-2, -1))
    den = np.sqrt((Kc * Kc).sum((-2, -1)) * (Gc * Gc).sum((-2, -1)))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def linear_cka(X, Y):
    """Linear CKA between X [..., n, d1] and Y [..., n, d2] (rows paired), float64 -> [...].
    1 for identical inputs; invariant to orthogonal maps and isotropic scaling of either side."""
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    if X.shape[:-1] != Y.shape[:-1] or X.shape[-2] < 2:
        raise ValueError(f"X and Y must pair at least 2 rows (shapes [..., n, d]); got {X.shape} and {Y.shape}")
    return cka_from_grams(X @ np.swapaxes(X, -1, -2), Y @ np.swapaxes(Y, -1, -2))


def cka_bootstrap(X, Y, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, block: int = 100):
    """CKA per layer of X, Y [N, L, D] (items paired) -> (cka [L], lo [L], hi [L]): the percentile
    interval over `n_boot` resamplings of the items (with replacement), like `bootstrap_mean`."""
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    if X.ndim != 3 or X.shape[:2] != Y.shape[:2]:
        raise ValueError(f"X and Y must be [items, layers, d] with the same items and layers; got {X.shape}, {Y.shape}")
    N = X.shape[0]
    K = np.einsum("ild,jld->lij", X, X)  # [L, N, N]
    G = np.einsum("ild,jld->lij", Y, Y)
    cka = cka_from_grams(K, G)
    idx = np.random.default_rng(seed).integers(0, N, size=(n_boot, N))
    draws = []
    for start in range(0, n_boot, block):  # [block, L, N, N] at a time
        i = idx[start : start + block]
        pick = lambda M: M[:, i[:, :, None], i[:, None, :]].transpose(1, 0, 2, 3)  # noqa: E731
        draws.append(cka_from_grams(pick(K), pick(G)))
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(np.concatenate(draws), [alpha, 1 - alpha], axis=0)
    return cka, np.minimum(lo, cka), np.maximum(hi, cka)


def cosines(X, Y):
    """Per item and layer, X, Y [N, L, D] -> (raw [N, L], centred [N, L]): the cosine of each
    pair, and the same after subtracting, per layer, the mean state of both sides together
    (raw states share a large common direction, so raw cosines sit near 1 at every layer)."""
    from jaxlens.methods.mc_lens import cosine

    centre = np.concatenate([X, Y]).mean(axis=0)  # [L, D]
    return cosine(X, Y), cosine(X - centre, Y - centre)


def similarity(X: dict[str, np.ndarray], Y: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0) -> dict:
    """X, Y: `prompt_states` of a language and of its parallel English prompts (rows paired).
    -> {pooling: {"cka": (mean, lo, hi), "cos": (...), "cos_centred": (...)}}, each [L]."""
    out = {}
    for pooling in POOLINGS:
        raw, centred = cosines(X[pooling], Y[pooling])
        out[pooling] = {"cka": cka_bootstrap(X[pooling], Y[pooling], n_boot=n_boot, seed=seed),
                        "cos": bootstrap_mean(raw, n_boot=n_boot, seed=seed),
                        "cos_centred": bootstrap_mean(centred, n_boot=n_boot, seed=seed)}
    return out
