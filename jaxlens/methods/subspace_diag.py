"""Diagnostics of a Lens subspace, per layer (layer-first arrays):

- variance explained by each component of the centred language means (the LSAR spectrum);
- language ID on held-out prompts: nearest language mean inside M_s, against a linear probe
  (ridge classifier) and a nearest mean in its orthogonal complement: how much language identity
  the means' subspace holds, and how much lies outside it;
- cosine of parallel prompts to their English version, before and after projecting out M_s;
- principal angles between the subspaces of two layers, or of two artifacts (models, checkpoints);
- the top tokens of a and of each δ_k through the logit lens (final norm, then the unembedding).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxlens.methods.subspace import Subspace


def variance_explained(sub: Subspace) -> np.ndarray:
    """[L, K] share of the centred means' variance per component (the last is ~0: K means span K-1)."""
    s2 = sub.spectrum**2
    return s2 / np.maximum(s2.sum(-1, keepdims=True), 1e-30)


def _complement(h, basis):
    """h [N, D] minus its component in span(basis [r, D])."""
    return h - (h @ basis.T) @ basis


def ridge_probe(x_fit, y_fit, x_test, n_classes: int, lam: float = 1e-2) -> np.ndarray:
    """A linear classifier (one-hot ridge regression on standardised features, closed form in the
    dual so D > N is cheap): predictions for x_test."""
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    a, b = (x_fit - mu) / sd, (x_test - mu) / sd
    Y = np.eye(n_classes)[y_fit] - 1.0 / n_classes
    gram = a @ a.T
    alpha = np.linalg.solve(gram + lam * np.trace(gram) / len(a) * np.eye(len(a)), Y)
    return np.argmax(b @ (a.T @ alpha), axis=1)


def language_id(sub: Subspace, fit_states: dict[str, np.ndarray], test_states: dict[str, np.ndarray]) -> dict:
    """Accuracy per layer [L] of: nearest mean inside M_s ("subspace", means from the probe corpus,
    tested on every held-out prompt); nearest mean in the complement ("complement_nearest": at full
    rank the means coincide there, so this is chance by construction, a sanity check); a ridge
    probe in the complement ("complement_probe") and on the whole state ("full_probe").

    The probes are fitted on the first half of the held-out prompts and tested on the second:
    fitted on the probe corpus itself they would be blind by construction (its class means are
    equal in the complement, and a least-squares probe reads only class means). States {lang: [L, N, D]}."""
    langs = list(sub.langs)
    L = sub.basis.shape[0]
    y_test = np.concatenate([np.full(test_states[lang].shape[1], k) for k, lang in enumerate(langs)])
    half = {lang: test_states[lang].shape[1] // 2 for lang in langs}
    y_a = np.concatenate([np.full(half[lang], k) for k, lang in enumerate(langs)])
    y_b = np.concatenate([np.full(test_states[lang].shape[1] - half[lang], k) for k, lang in enumerate(langs)])
    out = {name: np.zeros(L) for name in ("subspace", "complement_nearest", "complement_probe", "full_probe")}
    for l in range(L):
        M, means = sub.basis[l], sub.means[l]
        test = np.concatenate([test_states[lang][l] for lang in langs]).astype(np.float64)
        dist = ((test @ M.T)[:, None] - (means @ M.T)[None]) ** 2
        out["subspace"][l] = np.mean(dist.sum(-1).argmin(1) == y_test)
        cm, ct = _complement(means, M), _complement(test, M)
        out["complement_nearest"][l] = np.mean(((ct[:, None] - cm[None]) ** 2).sum(-1).argmin(1) == y_test)
        a = np.concatenate([test_states[lang][l][: half[lang]] for lang in langs]).astype(np.float64)
        b = np.concatenate([test_states[lang][l][half[lang]:] for lang in langs]).astype(np.float64)
        out["complement_probe"][l] = np.mean(ridge_probe(_complement(a, M), y_a, _complement(b, M), len(langs)) == y_b)
        out["full_probe"][l] = np.mean(ridge_probe(a, y_a, b, len(langs)) == y_b)
    del fit_states  # the means come from the subspace itself
    return out


def english_cosine(sub: Subspace, parallel: dict[str, np.ndarray]) -> dict:
    """Mean cosine of each language's prompt to its parallel English prompt, per layer [L, K]
    ("before"), and after projecting M_s out of both ("after"). parallel {lang: [L, N, D]}, row i
    of every language the same item."""
    en = parallel[sub.english]
    before, after = np.zeros((en.shape[0], len(sub.langs))), np.zeros((en.shape[0], len(sub.langs)))
    cos = lambda x, y: np.mean(np.sum(x * y, -1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-30))  # noqa: E731
    for k, lang in enumerate(sub.langs):
        for l in range(en.shape[0]):
            h, e, M = parallel[lang][l].astype(np.float64), en[l].astype(np.float64), sub.basis[l]
            before[l, k] = cos(h, e)
            after[l, k] = cos(_complement(h, M), _complement(e, M))
    return {"before": before, "after": after}


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (degrees, ascending) between span(a [r, D]) and span(b [s, D]) (rows orthonormal)."""
    s = np.linalg.svd(a @ b.T, compute_uv=False)
    return np.degrees(np.arccos(np.clip(s, -1.0, 1.0)))


def layer_angles(sub: Subspace, other: Subspace | None = None) -> np.ndarray:
    """[L-1, r] angles between layers l and l+1 of `sub`, or [L, r] between `sub` and `other` layer by layer."""
    if other is None:
        return np.stack([principal_angles(sub.basis[l], sub.basis[l + 1]) for l in range(sub.basis.shape[0] - 1)])
    if other.basis.shape[0] != sub.basis.shape[0] or other.basis.shape[2] != sub.basis.shape[2]:
        raise ValueError(f"subspaces of different shapes: {sub.basis.shape} vs {other.basis.shape}")
    return np.stack([principal_angles(x, y) for x, y in zip(sub.basis, other.basis)])


def top_tokens(model, sub: Subspace, layers: Sequence[int], k: int = 8) -> dict:
    """{layer: {"agnostic": [tokens], lang: [tokens of δ_lang]}} through the logit lens."""
    import jax.numpy as jnp

    from jaxlens.kernels.lens import final_norm
    from jaxlens.core.modules import unembed
    from jaxlens.runtime.placement import to_host

    out = {}
    for l in layers:
        rows = {"agnostic": sub.agnostic[l]} | {lang: sub.delta[l, i] for i, lang in enumerate(sub.langs) if lang != sub.english}
        vectors = jnp.asarray(np.stack(list(rows.values())), jnp.float32)
        logits = to_host(unembed(model.params, final_norm(model.params, vectors, model.config), model.config))
        ids = np.argsort(-logits, axis=-1)[:, :k]
        out[int(l)] = {name: [model.tokenizer.decode([int(i)]) for i in row] for name, row in zip(rows, ids)}
    return out


@dataclasses.dataclass
class Diagnostics:
    """Everything the report shows; arrays layer first."""

    langs: tuple[str, ...]
    variance: np.ndarray  # [L, K]
    lid: dict  # name -> [L]
    cosine: dict  # before / after -> [L, K]
    angles: np.ndarray  # [L-1, r]
    tokens: dict

    def save(self, directory) -> Path:
        from jaxlens.report.io import write_arrays, write_json

        directory = Path(directory)
        write_arrays(directory / "diagnostics.npz", variance=self.variance, angles=self.angles,
                     **{f"lid_{k}": v for k, v in self.lid.items()}, **{f"cosine_{k}": v for k, v in self.cosine.items()})
        write_json(directory / "top_tokens.json", {str(k): v for k, v in self.tokens.items()})
        return directory


def diagnose(model, sub: Subspace, fit_states, test_states, *, token_layers=None, k: int = 8) -> Diagnostics:
    """All diagnostics; test_states must be parallel across languages for the cosines."""
    L = sub.basis.shape[0]
    token_layers = token_layers if token_layers is not None else sorted({L // 3, (2 * L) // 3, L - 1})
    n = min(v.shape[1] for v in test_states.values())
    parallel = {lang: v[:, :n] for lang, v in test_states.items()}
    return Diagnostics(sub.langs, variance_explained(sub), language_id(sub, fit_states, test_states),
                       english_cosine(sub, parallel), layer_angles(sub), top_tokens(model, sub, token_layers, k))


def write_figures(directory, diag: Diagnostics) -> list[str]:
    """lid.png (language ID per layer), variance.png, cosine.png, angles.png; returns their names."""
    from jaxlens.report.figures import _pyplot

    plt = _pyplot()
    directory = Path(directory)
    L = diag.variance.shape[0]
    x = np.arange(L)
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=110)
    w = 0.28
    for i, (name, label) in enumerate([("subspace", "nearest mean in M_s"), ("complement_probe", "linear probe, complement"),
                                       ("full_probe", "linear probe, whole state")]):
        ax.bar(x + (i - 1) * w, diag.lid[name], w, label=label)
    ax.axhline(1 / len(diag.langs), color="red", linestyle=":", linewidth=1, label="chance")
    ax.axhline(0.95, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="layer", ylabel="held-out accuracy", title="language identification", ylim=(0, 1.02))
    ax.set_xticks(x)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout(), fig.savefig(directory / "lid.png"), plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    bottom = np.zeros(L)
    for c in range(diag.variance.shape[1] - 1):
        ax.bar(x, diag.variance[:, c], bottom=bottom, label=f"component {c + 1}")
        bottom += diag.variance[:, c]
    ax.set(xlabel="layer", ylabel="share of variance", title="spectrum of the centred language means")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout(), fig.savefig(directory / "variance.png"), plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    for k, lang in enumerate(diag.langs):
        (line,) = ax.plot(x, diag.cosine["before"][:, k], label=lang)
        ax.plot(x, diag.cosine["after"][:, k], linestyle="--", color=line.get_color())
    ax.set(xlabel="layer", ylabel="cosine to English", title="parallel prompts: before (solid) / after removing M_s (dashed)")
    ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(directory / "cosine.png"), plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.plot(np.arange(1, L), diag.angles.mean(1), marker="o", label="mean angle")
    ax.plot(np.arange(1, L), diag.angles.min(1), linestyle="--", label="smallest angle")
    ax.set(xlabel="layer l (vs l-1)", ylabel="principal angle (deg)", title="M_s between consecutive layers", ylim=(0, 90))
    ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(directory / "angles.png"), plt.close(fig)
    return ["lid.png", "variance.png", "cosine.png", "angles.png"]
