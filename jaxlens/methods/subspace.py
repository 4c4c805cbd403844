"""Lens (arXiv 2410.04407, METHODS.md §2): a language-agnostic direction and a language-specific
subspace per layer, from per-language mean hidden states.

Per layer l the language means m_k (the state at each prompt's last token) are the rows of
W [K, D]. LSAR (Xie et al. 2022) with rank r (default K - 1):

    wc = mean_k m_k;  W' = wc + rank-r SVD fit of (W - wc)
    a  = pinv(W'ᵀ)ᵀ 1 / ||.||²         the agnostic direction (not unit length)
    M_s = top-r right singular vectors of (W' - a)   [r, D] orthonormal rows
    δ_k = mean P_s h_k - mean P_s h_en = P_s (m_k - m_en)

With r = K - 1 the fit is exact: M_s spans {m_k - m_en}, and a is the point of the means' affine
hull nearest the origin (so a ⊥ M_s). The last layer is read after the final norm (what the
authors and the training losses use), the others before any norm (the residual stream).

    probe = probe_prompts(model, {"en": [...], "zh": [...]})      # means by a reducer in the scan
    sub = fit(probe.means, probe.langs, rank=None)                # Subspace [L, ...]
    sub.save("space/"); Subspace.load("space/")
"""

from __future__ import annotations

import dataclasses
from functools import partial
import hashlib
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlens.core import interventions as iv
from jaxlens.core.config import ModelConfig
from jaxlens.report.io import read_arrays, write_arrays, write_json
from jaxlens.core.forward import forward

SITE = "resid_post"


# ---- per-language means inside the scan --------------------------------------------------------


@struct.dataclass
class LanguageSums:
    """Reducer: per layer, the sum and count of the last-token state per language (group).

    groups [B, K] one-hot (all-zero rows: padding, not counted), index [B] each row's last real
    token. Returns {"sum": [K, D] float32, "count": [K] float32}: [L, K, D] leaves the program,
    never [L, B, T, D]."""

    groups: jax.Array
    index: jax.Array
    site: str = struct.field(pytree_node=False, default=SITE)

    def __call__(self, x, ctx):
        return group_sums(last_rows(x, self.index), self.groups)


def last_rows(x, index):
    """x [B, T, D], index [B] -> [B, D] float32."""
    return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def group_sums(h, groups):
    """h [B, D], groups [B, K] -> {"sum": [K, D], "count": [K]}."""
    g = groups.astype(jnp.float32)
    return {"sum": jnp.einsum("bk,bd->kd", g, h, preferred_element_type=jnp.float32), "count": g.sum(0)}


@partial(jax.jit, static_argnames=("config", "last_norm"))
def batch_sums(params, tokens, mask, groups, *, config: ModelConfig, last_norm: bool = True):
    """One batch's per-language sums and counts, every layer: {"sum": [L, K, D], "count": [L, K]};
    with last_norm the last layer's entry is the final-normed state."""
    index = iv.last_index(mask)
    capture = ("final_norm",) if last_norm else ()
    _, sites = forward(params, tokens, mask, config=config, capture=capture,
                       reducers={"lang": LanguageSums(groups, index)})
    out = sites["lang"]
    if last_norm:
        top = group_sums(last_rows(sites["final_norm"], index), groups)
        out = {k: v.at[-1].set(top[k]) for k, v in out.items()}
    return out


@partial(jax.jit, static_argnames=("config", "last_norm"))
def batch_states(params, tokens, mask, *, config: ModelConfig, last_norm: bool = True):
    """Each row's last-token state at every layer: [L, B, D] float32 (diagnostics need per-prompt
    states; still never [L, B, T, D])."""
    from jaxlens.core.reducers import Take

    index = iv.last_index(mask)
    capture = ("final_norm",) if last_norm else ()
    _, sites = forward(params, tokens, mask, config=config, capture=capture, reducers={"last": Take(SITE, index[:, None])})
    states = sites["last"][:, :, 0].astype(jnp.float32)
    if last_norm:
        states = states.at[-1].set(last_rows(sites["final_norm"], index))
    return states


@dataclasses.dataclass
class Probe:
    """Per-language means of the last-token state: means [L, K, D], counts [K]."""

    langs: tuple[str, ...]
    means: np.ndarray
    counts: np.ndarray
    meta: dict


def _batches(model, prompts: dict[str, Sequence[str]], batch_rows: int):
    """(batches, language index of every prompt) for {lang: [text]} in the runtime's fixed-size,
    bucketed, left-padded batches over the mesh."""
    from jaxlens.runtime.batching import text_batches
    from jaxlens.runtime.placement import batch_rows as rows_for

    flat = [(k, text) for k, lang in enumerate(prompts) for text in prompts[lang]]
    lang = np.array([k for k, _ in flat])
    return text_batches(model, [t for _, t in flat], rows_for(model.mesh, batch_rows)), lang


def check_prompts(prompts: dict[str, Sequence[str]], english: str = "en") -> None:
    """Clear errors before any model work: at least 2 languages, English among them, no empty one."""
    if len(prompts) < 2:
        raise ValueError(f"need prompts in at least 2 languages; got {sorted(prompts)}")
    if english not in prompts:
        raise ValueError(f"no {english!r} prompts: the language vectors δ_k are taken relative to {english!r}; "
                         f"add them or name another reference language (english=)")
    empty = [lang for lang, texts in prompts.items() if not texts]
    if empty:
        raise ValueError(f"no prompts for language(s) {empty}")


def probe_prompts(model, prompts: dict[str, Sequence[str]], *, english: str = "en", last_norm: bool = True,
                  batch_rows: int = 8, progress: bool = False, meta: dict | None = None) -> Probe:
    """Per-language means at every layer from {lang: [text]} (any prompts, not necessarily parallel)."""
    from jaxlens.runtime.loop import accumulate

    check_prompts(prompts, english)
    langs = tuple(prompts)
    L, K, D = model.config.n_layers, len(langs), model.config.d_model
    batches, lang = _batches(model, prompts, batch_rows)

    def groups(b):  # [B, K] one-hot language of each row (padding rows: none)
        row_lang = np.where(b.index >= 0, lang[np.maximum(b.index, 0)], -1)
        return (row_lang[:, None] == np.arange(K)[None]).astype(np.float32)

    def step(b, total, tokens, mask, g):
        out = batch_sums(model.params, tokens, mask, g, config=model.config, last_norm=last_norm)
        return jax.tree.map(jnp.add, total, out)

    total = {"sum": jnp.zeros((L, K, D), jnp.float32), "count": jnp.zeros((L, K), jnp.float32)}
    total = accumulate(batches, step, total, mesh=model.mesh, inputs=lambda b: (b.tokens, b.mask, groups(b)),
                       desc="probe", progress=progress)
    sums, counts = np.asarray(total["sum"], np.float64), np.asarray(total["count"][0], np.float64)
    meta = {"english": english, "last_norm": last_norm, "position": "last prompt token", "site": SITE,
            "corpus_sha256": corpus_sha256(prompts), **(meta or {})}
    return Probe(langs, sums / counts[None, :, None], counts.astype(np.int64), meta)


def prompt_states(model, texts: Sequence[str], *, last_norm: bool = True, batch_rows: int = 8) -> np.ndarray:
    """[L, N, D] last-token states of texts (layer first)."""
    from jaxlens.runtime.loop import stream

    batches, _ = _batches(model, {"_": list(texts)}, batch_rows)
    step = lambda b, tokens, mask: batch_states(model.params, tokens, mask, config=model.config, last_norm=last_norm)  # noqa: E731
    out = [states[:, : b.n_real] for b, states in stream(batches, step, mesh=model.mesh, inputs=lambda b: (b.tokens, b.mask),
                                                         progress=False)]
    return np.concatenate(out, axis=1)


def corpus_sha256(prompts: dict[str, Sequence[str]]) -> str:
    """A digest of the prompts (language order and text), recorded with every artifact."""
    return hashlib.sha256(json.dumps({k: list(v) for k, v in prompts.items()}, ensure_ascii=False).encode()).hexdigest()


# ---- LSAR --------------------------------------------------------------------------------------


def lsar(means: np.ndarray, rank: int | None = None):
    """means [K, D] (one row per language) -> (a [D] agnostic direction, M_s [r, D] orthonormal
    rows, singular values [K] of the centred means). float64."""
    W = np.asarray(means, np.float64)
    K = W.shape[0]
    rank = K - 1 if rank is None else rank
    check_rank(rank, K)
    wc = W.mean(0)
    u, s, vt = np.linalg.svd(W - wc, full_matrices=False)  # rows: languages
    fit = wc + (u[:, :rank] * s[:rank]) @ vt[:rank]  # [K, D] the rank-r best fit W'
    # a = pinv(W'ᵀ)ᵀ 1 (in row form: pinv(fit) 1), scaled by 1/||.||² so that a·m'_k = 1 -> a on the hull.
    a = np.linalg.pinv(fit) @ np.ones(K)
    a = a / (a @ a)
    _, _, vt2 = np.linalg.svd(fit - a, full_matrices=False)
    return a, vt2[:rank], s


def check_rank(rank: int, n_langs: int) -> None:
    if not 1 <= rank < n_langs:
        raise ValueError(f"rank={rank} must be at least 1 and below the number of languages ({n_langs}); "
                         f"the default is {n_langs - 1}")


@dataclasses.dataclass
class Subspace:
    """Per layer (layer first): agnostic [L, D], basis [L, r, D] (M_s, orthonormal rows),
    delta [L, K, D] (δ_k, English row 0), means [L, K, D], spectrum [L, K] (singular values of
    the centred means). meta: model, layers, position, last_norm, template, corpus_sha256, rank."""

    langs: tuple[str, ...]
    english: str
    agnostic: np.ndarray
    basis: np.ndarray
    delta: np.ndarray
    means: np.ndarray
    spectrum: np.ndarray
    counts: np.ndarray
    meta: dict

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def unit_agnostic(self) -> np.ndarray:
        """[L, D] a / ||a|| (the projection direction)."""
        return self.agnostic / np.linalg.norm(self.agnostic, axis=-1, keepdims=True)

    def save(self, directory) -> Path:
        directory = Path(directory)
        write_arrays(directory / "subspace.npz", agnostic=self.agnostic, basis=self.basis, delta=self.delta,
                     means=self.means, spectrum=self.spectrum, counts=self.counts)
        write_json(directory / "subspace.json", {"langs": list(self.langs), "english": self.english,
                                                 "rank": self.rank, **self.meta})
        return directory

    @classmethod
    def load(cls, directory) -> "Subspace":
        directory = Path(directory)
        if not (directory / "subspace.json").exists():
            raise FileNotFoundError(f"{directory} has no subspace.json; make one with `jaxlens subspace probe`")
        meta = json.loads((directory / "subspace.json").read_text(encoding="utf-8"))
        arrays = read_arrays(directory / "subspace.npz")
        langs, english = tuple(meta.pop("langs")), meta.pop("english")
        meta.pop("rank")
        return cls(langs, english, meta=meta, **arrays)


def fit(probe: Probe, *, rank: int | None = None) -> Subspace:
    """LSAR at every layer of a probe's means."""
    langs, english = probe.langs, probe.meta["english"]
    K = len(langs)
    rank = K - 1 if rank is None else rank
    check_rank(rank, K)
    e = langs.index(english)
    agnostic, basis, spectrum, delta = [], [], [], []
    for W in probe.means:
        a, M, s = lsar(W, rank)
        diff = W - W[e]
        agnostic.append(a), basis.append(M), spectrum.append(s), delta.append(diff @ M.T @ M)
    return Subspace(langs, english, np.stack(agnostic), np.stack(basis), np.stack(delta), probe.means,
                    np.stack(spectrum), probe.counts, {**probe.meta, "layers": int(probe.means.shape[0])})


# ---- training-free interventions ---------------------------------------------------------------

KINDS = ("shift", "project", "scale")


def check_layers(sub: Subspace, layers, n_layers: int) -> None:
    """Intervention layers exist, and are not the last one when it was read after the final norm
    (its subspace lives in normed space, the residual stream there does not)."""
    layers = [int(l) for l in np.atleast_1d(layers)]
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range 0..{n_layers - 1}")
    if sub.meta.get("last_norm", True) and n_layers - 1 in layers:
        raise ValueError(f"layer {n_layers - 1} was probed after the final norm, so its subspace is not the residual "
                         f"stream's; intervene at layers 0..{n_layers - 2} (or probe with last_norm=False)")


def project_specific(sub: Subspace, strength=1.0, *, layers=None, positions=None) -> iv.Intervention:
    """Remove `strength` of the language-specific component: x - strength P_s x (1 = project out M_s)."""
    return iv.scale_along(SITE, jnp.asarray(sub.basis, jnp.float32), 1.0 - jnp.asarray(strength, jnp.float32),
                          layers=layers, positions=positions, per_layer=True)


def scale_agnostic(sub: Subspace, factor, *, layers=None, positions=None) -> iv.Intervention:
    """Scale the component along the unit agnostic direction by `factor`."""
    return iv.scale_along(SITE, jnp.asarray(sub.unit_agnostic(), jnp.float32), factor, layers=layers,
                          positions=positions, per_layer=True)


def shift(sub: Subspace, rows, alpha, *, layers=None, positions=None) -> iv.Intervention:
    """x + alpha δ_k with k each row's language: rows [B] language indices into sub.langs (-1: no
    shift). alpha < 0 moves a language toward English inside M_s, alpha > 0 away from it."""
    rows = np.asarray(rows)
    delta = np.where((rows >= 0)[None, :, None], sub.delta[:, np.maximum(rows, 0)], 0.0)  # [L, B, D]
    return iv.add(SITE, jnp.asarray(delta, jnp.float32), alpha, layers=layers, positions=positions, per_layer=True)


def intervention(sub: Subspace, kind: str, rows, layer, alpha, positions=None) -> iv.Intervention:
    """One of the three kinds at one (layer, alpha) point; alpha is the shift's weight, the
    projection's strength or the agnostic scale factor. Same pytree structure for every point."""
    if kind == "shift":
        return shift(sub, rows, alpha, layers=layer, positions=positions)
    if kind == "project":
        return project_specific(sub, alpha, layers=layer, positions=positions)
    if kind == "scale":
        return scale_agnostic(sub, alpha, layers=layer, positions=positions)
    raise ValueError(f"unknown intervention kind {kind!r}; choose one of {', '.join(KINDS)}")


def steer_scores(model, items, template, sub: Subspace, points, *, kind: str = "shift", positions: str = "all",
                 method: str = "letters", batch_rows: int = 8, chunk: int | None = None, progress: bool = True):
    """Scores [G, N, O] of every item at every (layer, alpha) point of `points` [G, 2], one program
    per batch (`jaxlens.sweep`): each row gets its own language's δ_k (English and unknown: none)."""
    from jaxlens.methods.sweep import layer_alpha_points, sweep_scores

    if kind not in KINDS:
        raise ValueError(f"unknown intervention kind {kind!r}; choose one of {', '.join(KINDS)}")
    if positions not in ("all", "last"):
        raise ValueError(f"positions must be 'all' or 'last', got {positions!r}")
    points = np.asarray(points, np.float64)
    check_layers(sub, points[:, 0], model.config.n_layers)
    lang_of = np.array([sub.langs.index(it.lang) if it.lang in sub.langs and it.lang != sub.english else -1 for it in items])

    def build(batch, tail):
        rows = np.where(batch.item >= 0, lang_of[np.maximum(batch.item, 0)], -1)
        if positions == "last":
            T = batch.tokens.shape[1]
            at = jnp.arange(T - tail, T)[None, :] == jnp.asarray(batch.prompt_last)[:, None]
        else:
            at = jnp.asarray(batch.mask, bool)
        # The subspace's arrays once for all points; a point sets its layer and its `alpha` field
        # (a projection of strength s scales the specific component by 1 - s).
        field = 1.0 - points[:, 1] if kind == "project" else points[:, 1]
        return layer_alpha_points(intervention(sub, kind, rows, 0, 0.0, at), np.stack([points[:, 0], field], -1))

    return sweep_scores(model, items, template, build, methods=(method,), tail_only=positions == "last",
                        batch_rows=batch_rows, chunk=chunk, progress=progress)
