"""Lens training (2410.04407 §3, METHODS.md §2): move target languages toward English in the
agnostic direction and away from it inside the specific subspace, keeping English where it was.

Losses on the last-position state at the loss layer (default: the last, after the final norm),
θ0 the frozen model (one reference pass per batch, shared by every loss):

    retain    MSE(mean_t h_en(θ), mean_t h_en(θ0))          mean over real tokens (θ0's = target)
    separate  Σ_k MSE(P_s h_k(θ) - P_s h_k(θ0), c_k δ_k)    push k further from English inside M_s
    align     Σ_k MSE(P_a h_en(θ), P_a h_k(θ))              P_a: projection on the unit agnostic direction
    total     w_retain retain + w_separate separate + w_align align   (a weight 0 switches a loss off)

(The authors' code calls separate "pull" and align "push"; the names here follow the meaning.)
Only the chosen layers train (default the top 2/32 of the depth, at least one); embeddings, final
norm and unembedding are frozen, and every other layer stays bitwise as it was: the trained rows
are gathered out of the stacked layer params and scattered back in the forward. AdamW with a
linear warm-up and cosine decay, gradient accumulation (optax.MultiSteps), the batch over the
mesh's `data` axis (XLA sums the per-device gradients). Only the trained layers are saved
(orbax); `apply_delta(model, DIR)` or `jaxlens.load(base, delta=DIR)` puts them back.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlens.core.config import ModelConfig
from jaxlens.core.forward import forward
from jaxlens.methods.subspace import Subspace, last_rows
from jaxlens.runtime.deltas import META_FILE, apply_delta, check_layers, merge, read_meta, split  # noqa: F401

LOSSES = ("retain", "separate", "align")


def default_layers(n_layers: int) -> list[int]:
    """The top 2/32 of the depth (the authors: layers 30, 31 of 32), at least one."""
    n = max(1, round(n_layers * 2 / 32))
    return list(range(n_layers - n, n_layers))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    layers: tuple[int, ...] | None = None  # trained decoder layers; None = default_layers
    loss_layer: int = -1  # -1: the last layer, after the final norm (the subspace's last entry)
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # retain, separate, align
    separation: float = 1.0  # c_k, the same for every target language [inferred: the authors' default]
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup: float = 0.05  # share of the optimiser steps
    batch: int = 8  # parallel prompts per micro-batch (each in every language)
    accumulate: int = 1  # micro-batches per optimiser step
    epochs: int = 1
    max_length: int = 128


# ---- params: gather the trained layers, scatter them back ----------------------------------------


# ---- losses --------------------------------------------------------------------------------------


def readout(params, tokens, mask, *, config: ModelConfig, loss_layer: int):
    """(last-token state at the loss layer [N, D], mean over real tokens of the final-normed state [N, D])."""
    from jaxlens.core import interventions as iv
    from jaxlens.core.reducers import Take

    index = iv.last_index(mask)
    reducers = {} if loss_layer < 0 else {"h": Take("resid_post", index[:, None])}
    _, sites = forward(params, tokens, mask, config=config, capture=("final_norm",), reducers=reducers)
    normed = sites["final_norm"].astype(jnp.float32)
    w = mask.astype(jnp.float32)[..., None]
    mean_t = (normed * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    h = last_rows(normed, index) if loss_layer < 0 else sites["h"][loss_layer, :, 0].astype(jnp.float32)
    return h, mean_t


def losses(h, mean_t, ref_h, ref_mean_t, space, weights, separation):
    """The three losses from states [K, B, D] (language 0 = English); space = (basis [r, D],
    unit agnostic [D], delta [K, D]). Returns (total, {name: value})."""
    basis, a, delta = space
    Ps = lambda x: (x @ basis.T) @ basis  # noqa: E731
    Pa = lambda x: (x @ a)[..., None] * a  # noqa: E731
    mse = lambda x, y: jnp.mean((x - y) ** 2)  # noqa: E731
    retain = mse(mean_t[0], ref_mean_t[0])
    separate = sum(mse(Ps(h[k]) - Ps(ref_h[k]), separation * delta[k]) for k in range(1, h.shape[0]))
    align = sum(mse(Pa(h[0]), Pa(h[k])) for k in range(1, h.shape[0]))
    parts = {"retain": retain, "separate": separate, "align": align}
    return sum(w * parts[n] for w, n in zip(weights, LOSSES)), parts


def loss_fn(trained, params, tokens, mask, ref, space, *, config, layers, loss_layer, weights, separation):
    """tokens, mask [K, B, T] (language-major); ref: θ0's (h, mean_t) [K, B, D]."""
    K, B, T = tokens.shape
    h, mean_t = readout(merge(params, trained, layers), tokens.reshape(K * B, T), mask.reshape(K * B, T),
                        config=config, loss_layer=loss_layer)
    h, mean_t = h.reshape(K, B, -1), mean_t.reshape(K, B, -1)
    return losses(h, mean_t, ref[0], ref[1], space, weights, separation)


@partial(jax.jit, static_argnames=("config", "layers", "loss_layer", "weights", "separation", "opt"), donate_argnums=(0, 1))
def train_step(trained, opt_state, params, tokens, mask, space, *, config: ModelConfig, layers: tuple, loss_layer: int,
               weights: tuple, separation: float, opt):
    """One micro-batch: the frozen reference pass once, then loss, gradient and (accumulated) update."""
    K, B, T = tokens.shape
    ref = readout(params, tokens.reshape(K * B, T), mask.reshape(K * B, T), config=config, loss_layer=loss_layer)
    ref = jax.tree.map(lambda x: jax.lax.stop_gradient(x.reshape(K, B, -1)), ref)
    (total, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trained, params, tokens, mask, ref, space, config=config, layers=layers, loss_layer=loss_layer, weights=weights,
        separation=separation)
    updates, opt_state = opt.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, {"total": total, **parts}


def optimizer(cfg: TrainConfig, steps: int):
    """AdamW, linear warm-up over cfg.warmup of the steps then cosine decay to 0; accumulation by MultiSteps."""
    warm = int(round(cfg.warmup * steps))
    # As transformers' cosine schedule: the warm-up starts at 0 (so its first step does not move).
    schedule = (optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warm, max(steps, warm + 1), 0.0) if warm
                else optax.cosine_decay_schedule(cfg.lr, max(steps, 1)))
    opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    return optax.MultiSteps(opt, every_k_schedule=cfg.accumulate) if cfg.accumulate > 1 else opt


# ---- data ----------------------------------------------------------------------------------------


def check_parallel(prompts: dict[str, Sequence[str]], sub: Subspace) -> list[str]:
    """Languages to train (English first), all in the subspace, all with the same number of prompts."""
    if sub.english not in prompts:
        raise ValueError(f"training needs the parallel {sub.english!r} prompts (the retain and align losses)")
    langs = [sub.english] + [l for l in prompts if l != sub.english]
    if len(langs) < 2:
        raise ValueError("training needs at least one target language besides English")
    missing = [l for l in langs if l not in sub.langs]
    if missing:
        raise ValueError(f"language(s) {missing} are not in the subspace ({', '.join(sub.langs)}); probe them first")
    sizes = {l: len(prompts[l]) for l in langs}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"training prompts must be parallel (the same count per language); got {sizes}")
    return langs


def batches(model, prompts, langs, batch: int, max_length: int):
    """[K, batch, T] left-padded token and mask arrays per micro-batch (parallel rows), truncated to
    the last max_length tokens; the last partial batch is dropped (fixed shapes, one compile)."""
    n = len(prompts[langs[0]])
    pad = model.config.pad_token_id or 0
    for start in range(0, n - batch + 1, batch):
        ids = [[model.tokenizer.encode(prompts[l][i])[-max_length:] for i in range(start, start + batch)] for l in langs]
        T = max(len(s) for rows in ids for s in rows)
        T = min(max_length, max(T, 8 * -(-T // 8)))  # a few lengths compile, not one per batch
        tokens = np.full((len(langs), batch, T), pad, np.int32)
        mask = np.zeros((len(langs), batch, T), np.int32)
        for k, rows in enumerate(ids):
            for b, s in enumerate(rows):
                tokens[k, b, T - len(s):] = s
                mask[k, b, T - len(s):] = 1
        yield tokens, mask


def space_of(sub: Subspace, langs, layer: int):
    """(basis [r, D], unit agnostic [D], delta [K, D] in training order) at one layer, float32."""
    idx = [sub.langs.index(l) for l in langs]
    return (jnp.asarray(sub.basis[layer], jnp.float32), jnp.asarray(sub.unit_agnostic()[layer], jnp.float32),
            jnp.asarray(sub.delta[layer, idx], jnp.float32))


@dataclasses.dataclass
class TrainResult:
    trained: dict  # {"layers": stacked [n, ...] params of the trained layers}
    layers: tuple[int, ...]
    log: dict  # per micro-batch: total, retain, separate, align (lists); seconds


def train(model, sub: Subspace, prompts: dict[str, Sequence[str]], *, config: TrainConfig = TrainConfig(),
          progress: bool = True) -> TrainResult:
    """Train `config.layers` of `model` on parallel prompts with the Lens losses."""
    from jaxlens.runtime.loop import stream

    L = model.config.n_layers
    layers = tuple(check_layers(config.layers if config.layers is not None else default_layers(L), L))
    langs = check_parallel(prompts, sub)
    if sub.basis.shape[0] != L or sub.basis.shape[2] != model.config.d_model:
        raise ValueError(f"subspace of shape {sub.basis.shape} does not fit this model ({L} layers, width {model.config.d_model})")
    loss_layer = config.loss_layer
    if loss_layer >= 0 and loss_layer == L - 1 and sub.meta.get("last_norm", True):
        loss_layer = -1  # the subspace's last entry is post-norm: read the final norm there
    space = space_of(sub, langs, L - 1 if loss_layer < 0 else loss_layer)
    n_batches = config.epochs * (len(prompts[langs[0]]) // config.batch)
    if n_batches == 0:
        raise ValueError(f"fewer prompts ({len(prompts[langs[0]])}) than one batch ({config.batch}); lower batch")
    opt = optimizer(config, max(1, n_batches // config.accumulate))
    trained = split(model.params, layers)
    opt_state = opt.init(trained)
    log = {name: [] for name in ("total",) + LOSSES}
    t0 = time.perf_counter()
    state = {"trained": trained, "opt": opt_state}

    def step(_, tokens, mask):  # the parameters stay on device; the losses come back one step behind
        state["trained"], state["opt"], out = train_step(
            state["trained"], state["opt"], model.params, tokens, mask, space, config=model.config, layers=layers,
            loss_layer=loss_layer, weights=tuple(config.weights), separation=float(config.separation), opt=opt)
        return out

    micro = [b for _ in range(config.epochs) for b in batches(model, prompts, langs, config.batch, config.max_length)]
    for _, out in stream(micro, step, mesh=model.mesh, inputs=lambda b: b, batch_axis=1, desc="train", progress=progress,
                         size=lambda b: int(b[1].sum())):
        for k, v in out.items():
            log[k].append(float(v))
    trained = state["trained"]
    log["seconds"] = time.perf_counter() - t0
    return TrainResult(trained, layers, log)


# ---- save / load ---------------------------------------------------------------------------------


def save(out, result: TrainResult, *, model_name: str | None = None, config: ModelConfig | None = None,
         train_config: TrainConfig | None = None, overwrite: bool = False) -> Path:
    """Only the trained layers (orbax) + a JSON of what they are: written whole or not at all. With
    several processes, call it on every one: process 0 writes (`runtime.checkpoints`), and all return
    once OUT is in place."""
    from jaxlens.report.io import output_dir, write_json
    from jaxlens.runtime.checkpoints import save_tree
    from jaxlens.runtime.distributed import barrier

    with output_dir(out, overwrite=overwrite) as tmp:
        save_tree(tmp / "layers", result.trained)
        meta = {"model": model_name, "layers": list(result.layers),
                "n_layers": config.n_layers if config else None, "d_model": config.d_model if config else None,
                "train": dataclasses.asdict(train_config) if train_config else None, "log": result.log}
        write_json(tmp / META_FILE, meta)
    barrier("trained layers saved")  # the same name on every process (their paths may be spelled apart)
    return Path(out)
