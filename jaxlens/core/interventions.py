"""Interventions: pure pytrees of arrays, applied at sites inside the scanned layers.

    from jaxlens.core import interventions as iv
    steer = iv.add("resid_post", v, alpha=4.0, layers=[10, 11], positions=iv.last_token(mask))
    knock = iv.ablate("mlp_act", neurons=lang_mask)            # [L, F] bool: zero those neurons
    logits, _ = forward(params, tokens, mask, config=cfg, interventions=steer | knock)

An intervention says WHERE (a site of `jaxlens.core.sites.LAYER_SITES`, a set of layers, positions, and
optionally features = the last axis, e.g. neurons) and WHAT (an op on the site's value x [B, T, F]):

  add        x + alpha * vector                       vector [F], [B, F] or [B, T, F]
  scale      x * factor                               factor scalar or [F]
  set        value                                    value  [F], [B, F] or [B, T, F]
  project    x - P (x - mean)  ("out"), P x ("onto")  basis  [k, F] orthonormal rows, P = basisᵀ basis
  scale_along x + (alpha - 1) P x  (the component in span(basis) times alpha; alpha 0 = project out)

`ablate` (zero or mean, neurons or directions), `patch` (a captured cache) and `transplant` (another
pass's value, with a position map) are built from these. Any array may carry a leading [L] axis
(`per_layer=True`): layer l then uses its row l. The op's result replaces x only where the layer,
position and feature selections all hold.

Everything but the site, the op and the `per_layer` flag is an array, so new values (alpha,
vectors, positions, layers) reuse the compiled program, and a stack of interventions with a
leading batch axis runs as one program under `jax.vmap`.

Composition: `a | b` (= `compose(a, b)`) applies a, then b, at every site both touch; the result
is again a pytree. Interventions on different sites are independent of order.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlens.core.sites import LAYER_SITES

INTERVENABLE_SITES = tuple(s for s in LAYER_SITES if s != "attn_probs")
OPS = ("add", "scale", "set", "project_out", "project_onto", "scale_along")


@struct.dataclass
class Intervention:
    site: str = struct.field(pytree_node=False)
    op: str = struct.field(pytree_node=False)
    per_layer: bool = struct.field(pytree_node=False)
    value: jnp.ndarray  # what the op uses: vector / factor / value / basis (see the module doc)
    alpha: jnp.ndarray  # scalar weight of `add`, factor of `scale_along`; 1 elsewhere
    mean: jnp.ndarray | None  # `project_out`: the value the removed component is set to (None = 0)
    layers: jnp.ndarray | None  # [n] int32 layer indices; None = every layer
    positions: jnp.ndarray | None  # [B, T] or [T] bool; None = every position
    features: jnp.ndarray | None  # [F] bool, or [L, F] with per_layer; None = every feature

    def __or__(self, other) -> "Compose":
        return compose(self, other)

    def apply(self, x, layer):
        """x [B, T, F] at this intervention's site in layer `layer` (a traced int) -> new x."""
        row = (lambda a: a[layer]) if self.per_layer else (lambda a: a)
        value = row(self.value).astype(x.dtype)
        if self.op == "add":
            new = x + self.alpha.astype(x.dtype) * value
        elif self.op == "scale":
            new = x * value
        elif self.op == "set":
            new = jnp.broadcast_to(value, x.shape)
        elif self.op == "scale_along":  # alpha is an array, so a sweep over factors is one program
            new = x + (self.alpha.astype(x.dtype) - 1) * jnp.einsum("btf,kf,kg->btg", x, value, value)
        else:  # project: basis [k, F]
            centred = x if self.mean is None else x - row(self.mean).astype(x.dtype)
            component = jnp.einsum("btf,kf,kg->btg", centred, value, value)  # P (x - mean)
            new = component if self.op == "project_onto" else x - component
        keep = jnp.ones((), bool) if self.layers is None else jnp.any(self.layers == layer)
        if self.positions is not None:
            keep = keep & self.positions[..., None]  # [B, T, 1] or [T, 1]
        if self.features is not None:
            keep = keep & row(self.features)  # [F]
        return jnp.where(keep, new, x)


@struct.dataclass
class Compose:
    items: tuple[Intervention, ...]

    def __or__(self, other) -> "Compose":
        return compose(self, other)


def compose(*interventions) -> Compose:
    """One intervention applying each in order (left first); nested compositions are flattened."""
    items: list[Intervention] = []
    for item in interventions:
        if item is None:
            continue
        if isinstance(item, Compose):
            items.extend(item.items)
        elif isinstance(item, Intervention):
            items.append(item)
        else:
            raise TypeError(f"cannot compose {type(item).__name__}; expected an Intervention or Compose")
    return Compose(tuple(items))


def items(interventions) -> tuple[Intervention, ...]:
    """The interventions to apply in order, from None, one intervention, or a composition."""
    if interventions is None:
        return ()
    return compose(interventions).items


def apply_at(interventions, site: str, x, layer):
    """Apply, in order, every intervention at `site` to x (called from inside the scanned layer)."""
    for item in items(interventions):
        if item.site == site:
            x = item.apply(x, layer)
    return x


# ---- constructors -------------------------------------------------------------------------------


def _check_site(site: str) -> str:
    if site not in INTERVENABLE_SITES:
        raise ValueError(f"cannot intervene at site {site!r}; choose one of: {', '.join(INTERVENABLE_SITES)}")
    return site


def _layers(layers) -> jnp.ndarray | None:
    if layers is None:
        return None
    layers = jnp.atleast_1d(jnp.asarray(layers, jnp.int32))
    if layers.ndim != 1:
        raise ValueError(f"layers must be an int or a list of ints; got shape {layers.shape}")
    return layers


def _positions(positions) -> jnp.ndarray | None:
    if positions is None:
        return None
    positions = jnp.asarray(positions)
    if positions.dtype != bool or positions.ndim not in (1, 2):
        raise ValueError(
            f"positions must be a bool mask [B, T] or [T] (see last_token, at_positions, span); "
            f"got {positions.dtype} of shape {positions.shape}"
        )
    return positions


def _value(value, per_layer: bool) -> jnp.ndarray:
    """[F] -> [F]; [B, F] -> [B, 1, F]; [B, T, F] unchanged (after a leading [L] with per_layer)."""
    value = jnp.asarray(value)
    ndim = value.ndim - int(per_layer)
    if ndim == 2:
        value = value[..., :, None, :]
    elif ndim not in (0, 1, 3):
        raise ValueError(f"value must be [F], [B, F] or [B, T, F] (plus a leading [L] with per_layer); got {value.shape}")
    return value


def _make(site, op, value, *, alpha=1.0, mean=None, layers=None, positions=None, features=None, per_layer=False):
    return Intervention(
        site=_check_site(site),
        op=op,
        per_layer=per_layer,
        value=value,
        alpha=jnp.asarray(alpha, jnp.float32),
        mean=None if mean is None else jnp.asarray(mean),
        layers=_layers(layers),
        positions=_positions(positions),
        features=None if features is None else jnp.asarray(features, bool),
    )


def add(site, vector, alpha=1.0, *, layers=None, positions=None, per_layer=False) -> Intervention:
    """x + alpha * vector (steering). vector [F], [B, F] or [B, T, F]; [L, ...] with per_layer."""
    return _make(site, "add", _value(vector, per_layer), alpha=alpha, layers=layers, positions=positions, per_layer=per_layer)


def scale(site, factor, *, layers=None, positions=None, features=None, per_layer=False) -> Intervention:
    """x * factor; factor a scalar or [F] ([L, F] with per_layer)."""
    return _make(site, "scale", jnp.asarray(factor), layers=layers, positions=positions, features=features, per_layer=per_layer)


def set_to(site, value, *, layers=None, positions=None, features=None, per_layer=False) -> Intervention:
    """Replace x by value where selected; value [F], [B, F] or [B, T, F] ([L, ...] with per_layer)."""
    return _make(site, "set", _value(value, per_layer), layers=layers, positions=positions, features=features, per_layer=per_layer)


def ablate(site, neurons, mean=None, *, layers=None, positions=None) -> Intervention:
    """Zero-ablate (mean=None) or mean-ablate the selected neurons / features of a site.

    neurons: [F] bool, or [L, F] bool (a different set per layer, e.g. a language's neurons).
    mean: [F] or [L, F] values to set them to (e.g. their mean activation); None sets 0.
    """
    neurons = jnp.asarray(neurons, bool)
    per_layer = neurons.ndim == 2
    value = jnp.zeros(neurons.shape[-1:], jnp.float32) if mean is None else jnp.asarray(mean)
    if per_layer and value.ndim == 1:
        value = jnp.broadcast_to(value, neurons.shape)
    return _make(site, "set", value, layers=layers, positions=positions, features=neurons, per_layer=per_layer)


def project_out(site, basis, mean=None, *, layers=None, positions=None, per_layer=False) -> Intervention:
    """Remove the component in span(basis): x - P (x - mean). basis [k, F] with orthonormal rows;
    with `mean` the component is set to the mean's (direction mean-ablation) instead of 0."""
    basis = jnp.asarray(basis)
    if basis.ndim == 1 + int(per_layer):
        basis = basis[..., None, :]
    return _make(site, "project_out", basis, mean=mean, layers=layers, positions=positions, per_layer=per_layer)


def project_onto(site, basis, *, layers=None, positions=None, per_layer=False) -> Intervention:
    """Keep only the component in span(basis): P x. basis [k, F] with orthonormal rows."""
    basis = jnp.asarray(basis)
    if basis.ndim == 1 + int(per_layer):
        basis = basis[..., None, :]
    return _make(site, "project_onto", basis, layers=layers, positions=positions, per_layer=per_layer)


def scale_along(site, basis, factor, *, layers=None, positions=None, per_layer=False) -> Intervention:
    """Scale the component in span(basis) by `factor`: x + (factor - 1) P x. basis [k, F] (or [F])
    with orthonormal rows; factor 0 removes the component, 1 is the identity."""
    basis = jnp.asarray(basis)
    if basis.ndim == 1 + int(per_layer):
        basis = basis[..., None, :]
    return _make(site, "scale_along", basis, alpha=factor, layers=layers, positions=positions, per_layer=per_layer)


def patch(site, cache, *, layers=None, positions=None) -> Intervention:
    """Activation patching: the site's value from a captured cache [L, B, T, F] (same batch shape)."""
    return set_to(site, cache, layers=layers, positions=positions, per_layer=True)


def transplant(site, source, target_layer, target_positions) -> Intervention:
    """Put one value per sequence, taken from another pass (`source` [B, F], e.g. `gather(cache,
    source_positions)[source_layer]`), into this pass at `target_layer` and `target_positions`."""
    return set_to(site, source, layers=target_layer, positions=target_positions)


# ---- positions and position maps ----------------------------------------------------------------


def last_index(mask) -> jnp.ndarray:
    """[B] index of each row's last real token (left or right padding)."""
    mask = jnp.asarray(mask)
    T = mask.shape[-1]
    return jnp.max(jnp.where(mask.astype(bool), jnp.arange(T), -1), axis=-1)


def last_token(mask) -> jnp.ndarray:
    """[B, T] bool: each row's last real token."""
    mask = jnp.asarray(mask)
    return jnp.arange(mask.shape[-1]) == last_index(mask)[:, None]


def at_positions(indices, length: int) -> jnp.ndarray:
    """[B, T] bool from explicit indices [B] or [B, P] (negative values select nothing)."""
    indices = jnp.asarray(indices, jnp.int32)
    if indices.ndim == 1:
        indices = indices[:, None]
    return jnp.any(jnp.arange(length)[None, None, :] == indices[..., None], axis=1)


def span(start, end, length: int) -> jnp.ndarray:
    """[B, T] bool for the half-open spans [start, end) per row (start, end [B] or scalars)."""
    t = jnp.arange(length)
    return (t >= jnp.asarray(start)[..., None]) & (t < jnp.asarray(end)[..., None])


def gather(cache, positions) -> jnp.ndarray:
    """The mean of a captured cache [..., B, T, F] over each row's selected positions [B, T] bool
    -> [..., B, F]. One position: that token's value; a span: the span mean (a position map for
    transplanting between translations of different token lengths)."""
    weights = jnp.asarray(positions, jnp.float32)
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1.0)
    return jnp.einsum("...btf,bt->...bf", cache, weights.astype(cache.dtype))


def stack(interventions: Sequence[Intervention]) -> Intervention:
    """Interventions of one kind (same site, op and array shapes) -> one with a leading batch
    axis on every array, to run as one program with `jax.vmap`."""
    import jax

    first = interventions[0]
    for other in interventions[1:]:
        if jax.tree.structure(other) != jax.tree.structure(first):
            raise ValueError("stack needs interventions of one kind: same site, op, per_layer and fields set")
    return jax.tree.map(lambda *xs: jnp.stack([np.asarray(x) for x in xs]), *interventions)
