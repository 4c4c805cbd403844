"""Tuned lens (Belrose et al. 2303.08112): one affine translator per hidden state, trained on the KL
to the model's own output, read through the same fused kernel as the logit lens.

    translators, log = train(model, texts, steps=40, batch=4, length=64)
    save("out/tuned", translators, model_name="gemma3-270m", log=log)
    out = lens_from_tokens(model.params, tokens, mask, config=model.config, translators=load("out/tuned"))

Layout, as the reference (AlignmentResearch/tuned-lens, TunedLens.layer_translators): an L-layer
model has L translators, one per entry of HF's hidden_states[:-1]: index 0 the embedding output,
index i block i - 1's output (`kernels.lens.hidden_states`). The last block's output is the model's
own and has none. Translator i: h -> h + A_i h + b_i before the final norm, A [L, D, D] and b [L, D]
zero at the start (the logit lens). Loss (train_loop.Train.execute): per layer KL(final || lens)
averaged over the tokens, SUMMED over the layers (the reference back-propagates each layer's loss
separately, so their gradients add). Optimiser (ingredients.Optimizer): SGD with Nesterov momentum
0.9, lr 0.1 (its lr_scale x (1 - momentum)), weight decay 1e-3 added to the gradient as torch's SGD
does, the gradient's global norm clipped to 1 first, linear decay to 0. The paper's budget (250
steps of 2^18 tokens) is a parameter: on CPU a few thousand tokens already move the KL a lot.

On a mesh the translators live where the model's params do, split by core.sharding's rules for
`tuned_lens/A` (A [L, D_out over model, D_in over fsdp]; b replicated), and so does their momentum:
replicated, A alone is 80 x 8192^2 x 4 B = 20 GiB on every device at Llama-3.1-70B, twice that
with momentum; split over fsdp=16 x model=4 it is 320 MiB (benchmarks/README.md).
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlens.core.config import ModelConfig
from jaxlens.core.sharding import constrain_batch, params_shardings
from jaxlens.kernels.lens import hidden_states, logits_of

META_FILE = "tuned_lens.json"
# 2: L translators, index 0 the embedding output, i block i - 1 (the reference's), trained on the summed
# KL. Directories without it hold 1's: one per block output 0..L-1, so every index means another layer.
FORMAT_VERSION = 2
RETRAIN = "jaxlens tuned-lens --model MODEL --out DIR"


def translator_shapes(n_layers: int, d_model: int, dtype=jnp.float32) -> dict:
    """{A [L, D, D], b [L, D]} as ShapeDtypeStructs."""
    return {"A": jax.ShapeDtypeStruct((n_layers, d_model, d_model), dtype), "b": jax.ShapeDtypeStruct((n_layers, d_model), dtype)}


def translator_shardings(translators, mesh, warn: bool = True) -> dict:
    """The translators' NamedShardings on `mesh` (for a tree of arrays or ShapeDtypeStructs): the
    partition rules' `tuned_lens/A` and `tuned_lens/b`, a dimension the axis does not divide
    replicated with a ReplicatedWarning (`warn`), as the model's params."""
    return params_shardings({"tuned_lens": translators}, mesh, warn)["tuned_lens"]


def opt_shardings(opt, translators, mesh) -> dict:
    """The optimiser state's NamedShardings: the translators' for the leaves shaped like them (the
    momentum), replicated for the rest (the schedule's step count)."""
    state = jax.eval_shape(opt.init, translators)
    return optax.tree_map_params(opt, lambda _, sharding: sharding, state, translator_shardings(translators, mesh, warn=False),
                                 transform_non_params=lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def init_translators(config: ModelConfig, mesh=None, *, dtype=jnp.float32) -> dict:
    """Zero translators, one per hidden state read (the embedding output, blocks 0..L-2):
    {A [L, D, D], b [L, D]} (the logit lens). With `mesh` (the model's), made in place in their
    shardings: A is never whole on one device."""
    shapes = translator_shapes(config.n_layers, config.d_model, dtype)
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
    return zeros() if mesh is None else jax.jit(zeros, out_shardings=translator_shardings(shapes, mesh))()


def optimizer(steps: int, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-3, clip: float | None = 1.0):
    """SGD, Nesterov momentum, weight decay added to the (clipped) gradient, linear decay to 0, as the
    reference's train loop; the gradient's global norm is clipped to `clip` first (None: off)."""
    schedule = optax.linear_schedule(lr, 0.0, max(steps, 1))
    parts = [optax.clip_by_global_norm(clip)] if clip is not None else []
    parts += [optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum, nesterov=True)]
    return optax.chain(*parts)


def _layer_kl(params, config, h, A, b, logp_final, mesh=None):
    """KL(final || tuned lens) per token of one layer: h [N, D] residuals, logp_final [N, V]."""
    x = h + h @ A.T.astype(h.dtype) + b.astype(h.dtype)
    # The translated residual as the model holds one: rows over the data axes, D whole. Left to the
    # partitioner, with A's D_out over `model` and the unembedding's V over `model`, XLA (Shardy and
    # GSPMD, jax 0.10.2, CPU) returned a wrong gradient of A through the final norm (0.6 relative;
    # scripts/xla_sharded_grad_repro.py shows it in plain JAX).
    x = constrain_batch(mesh, x)[0]
    logits = logits_of(params, x, config=config)  # [N, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.exp(logp_final) * (logp_final - logp), axis=-1)  # [N]


def kl_per_layer(translators, params, hidden, logp_final, weights, *, config: ModelConfig, mesh=None):
    """Mean KL per layer [L] over weighted tokens. hidden [L, N, D] (`hidden_states`); logp_final
    [N, V]; weights [N] (the reference's plain mean over tokens when all are 1: it trains on packed
    text, no padding).

    The layers go one at a time (lax.map) and each is rematerialised in the backward pass, so the
    peak memory is a few [N, V] arrays, never [L, N, V]. mesh: the one the step runs on (traced
    arrays do not tell)."""
    layer = jax.checkpoint(partial(_layer_kl, params, config, logp_final=logp_final, mesh=mesh))
    kl = jax.lax.map(lambda a: layer(*a), (hidden, translators["A"], translators["b"]))  # [L, N]
    return (kl * weights).sum(-1) / jnp.maximum(weights.sum(), 1.0)


def loss(translators, params, hidden, logp_final, weights, *, config: ModelConfig, mesh=None):
    """The training loss: the SUM over layers of each layer's mean KL, as the reference (each layer's
    loss back-propagated on its own, so the gradients add). Returns (loss, per-layer KL [L])."""
    per_layer = kl_per_layer(translators, params, hidden, logp_final, weights, config=config, mesh=mesh)
    return per_layer.sum(), per_layer


@partial(jax.jit, static_argnames=("config", "opt", "mesh"), donate_argnames=("translators", "opt_state"))
def _step(params, translators, opt_state, tokens, mask, *, config: ModelConfig, opt, mesh):
    """One training step on `mesh` (the params' and the translators'; params first, as every probe
    `jaxlens plan` / `bench` compiles). The translators and optimiser state are donated: updated in
    place, not held twice."""
    from jaxlens.core.forward import _forward

    # _forward with the mesh: the batch split over the data axes, each layer gathered over fsdp in
    # the scan (`forward` cannot see the mesh of traced params).
    logits, sites = _forward(params, tokens, mask, config, ("embed", "resid_post"), mesh=mesh)
    hidden = hidden_states(sites)  # [L, B, T, D]
    L, B, T, D = hidden.shape
    hidden = jax.lax.stop_gradient(hidden.reshape(L, B * T, D))
    logp_final = jax.lax.stop_gradient(jax.nn.log_softmax(logits.reshape(B * T, -1).astype(jnp.float32), axis=-1))
    weights = mask.reshape(-1).astype(jnp.float32)
    (value, per_layer), grads = jax.value_and_grad(loss, has_aux=True)(translators, params, hidden, logp_final, weights,
                                                                        config=config, mesh=mesh)
    updates, opt_state = opt.update(grads, opt_state, translators)
    translators = optax.apply_updates(translators, updates)
    # Pinned: the outputs keep the inputs' shardings (left to propagation they could come back
    # replicated, 20 GiB a device at 70B, and the next step would recompile for them).
    translators = jax.lax.with_sharding_constraint(translators, translator_shardings(translators, mesh, warn=False))
    opt_state = jax.lax.with_sharding_constraint(opt_state, opt_shardings(opt, translators, mesh))
    return translators, opt_state, value, per_layer


def token_blocks(model, texts, batch: int, length: int, limit_tokens: int | None = None):
    """Texts -> [n, batch, length] int32 blocks of one token stream (each text with its BOS), as
    the tuned lens trains: no padding. Stops at limit_tokens."""
    stream = []
    for text in texts:
        stream.extend(model.tokenizer.encode(text, add_special_tokens=True))
        if limit_tokens is not None and len(stream) >= limit_tokens:
            break
    n = len(stream) // (batch * length)
    if n == 0:
        raise ValueError(f"{len(stream)} tokens of text are fewer than one batch of {batch}x{length}; give more text")
    return np.asarray(stream[: n * batch * length], np.int32).reshape(n, batch, length)


def default_texts(split: str = "test") -> list[str]:
    """XCOPA premises and both choices, all 11 languages, interleaved (one language after another)."""
    from jaxlens.data.xcopa import XCOPA_LANGS, xcopa

    per_lang = [[t for item in xcopa(lang, split) for t in (item["premise"], item["choice1"], item["choice2"])] for lang in XCOPA_LANGS]
    return [text for group in zip(*per_lang) for text in group]


@partial(jax.jit, static_argnames=("config",))
def _moments(params, tokens, weights, *, config: ModelConfig):
    """Sums for the least-squares fit of the last block's output from [h_i, 1], h_i the L hidden
    states the translators read: X^T X [L, D+1, D+1], X^T Y [L, D+1, D]."""
    from jaxlens.core.forward import forward

    _, sites = forward(params, tokens, jnp.ones_like(tokens), config=config, capture=("embed", "resid_post"))
    hidden = hidden_states(sites).astype(jnp.float32)  # [L, B, T, D]
    L, B, T, D = hidden.shape
    x = jnp.concatenate([hidden, jnp.ones((L, B, T, 1), jnp.float32)], -1).reshape(L, B * T, D + 1)
    x = x * weights.reshape(1, -1, 1)
    y = sites["resid_post"][-1].astype(jnp.float32).reshape(B * T, D)
    return jnp.einsum("lni,lnj->lij", x, x), jnp.einsum("lni,nj->lij", x, y)


def fit_shortcut(params, blocks, *, config: ModelConfig, ridge: float = 1e-3) -> dict:
    """Translators fitted in closed form so that h_i + A_i h_i + b_i best predicts the last block's
    output, for each of the L hidden states (least squares, ridge `ridge` x the mean diagonal; Din et
    al. 2023's linear shortcut). Costs only forward passes, so it uses far more tokens than SGD can
    on a CPU; a starting point for `fit` (ours: the reference starts from zero). BOS positions are
    left out: their residuals are orders of magnitude larger in some models and would dominate.
    Returns them on the params' mesh, in `translator_shardings`.

    Sized for small models: the sums are float64 on the host (and float32 on every device before
    that), X^T X [L, D+1, D+1] and X^T Y [L, D+1, D], each 80 x 8193^2 x 8 B = 40 GiB at
    Llama-3.1-70B; there, start `fit` from zero instead."""
    from jaxlens.runtime.loop import stream
    from jaxlens.runtime.placement import put_sharded

    blocks = np.asarray(blocks, np.int32)
    bos = config.bos_token_id if config.bos_token_id is not None else -1
    xtx, xty = 0.0, 0.0
    for _, (a, b) in stream(range(len(blocks)), lambda i, tokens, weights: _moments(params, tokens, weights, config=config),
                            mesh=_mesh(params), inputs=lambda i: (blocks[i], (blocks[i] != bos).astype(np.float32)),
                            progress=False, size=lambda i: 0):
        xtx, xty = xtx + np.asarray(a, np.float64), xty + np.asarray(b, np.float64)
    D = config.d_model
    reg = ridge * np.trace(xtx, axis1=1, axis2=2)[:, None, None] / (D + 1) * np.eye(D + 1)
    sol = np.linalg.solve(xtx + reg, xty)  # [L, D+1, D]: rows are M^T then b, with M = I + A
    A = sol[:, :D].transpose(0, 2, 1) - np.eye(D)
    translators = {"A": A.astype(np.float32), "b": sol[:, D].astype(np.float32)}
    return put_sharded(translators, translator_shardings(translators, _mesh(params)))


def fit(params, blocks, *, config: ModelConfig, steps: int = 40, lr: float = 0.1, momentum: float = 0.9,
        weight_decay: float = 1e-3, clip: float | None = 1.0, translators=None, progress: bool = True):
    """Train translators on token blocks [n, batch, length] for `steps` steps (cycling through the
    blocks). Returns (translators, log) with log = {"loss": [...] (the summed KL per step), "tokens": n,
    "seconds": s}. The translators (given ones are placed there) and the optimiser state live on the
    params' mesh in `translator_shardings` / `opt_shardings` throughout, and are returned there."""
    from jaxlens.runtime.loop import accumulate
    from jaxlens.runtime.placement import put_sharded, to_host

    blocks = np.asarray(blocks, np.int32)
    if blocks.ndim != 3:
        raise ValueError(f"blocks must be [n, batch, length] token ids; got shape {blocks.shape}")
    mesh = _mesh(params)
    if translators is None:
        translators = init_translators(config, mesh)
    else:
        # A copy: the steps update theirs in place (donated); the caller's stays valid.
        translators = jax.tree.map(jnp.copy, put_sharded(translators, translator_shardings(translators, mesh)))
    opt = optimizer(steps, lr, momentum, weight_decay, clip)
    per_step = blocks.shape[1] * blocks.shape[2]

    def one(i, state, tokens, mask):  # the losses stay on device until the end: no per-step sync
        translators, opt_state, losses = state
        translators, opt_state, value, _ = _step(params, translators, opt_state, tokens, mask, config=config, opt=opt, mesh=mesh)
        return translators, opt_state, losses.at[i].set(value)

    t0 = time.perf_counter()
    # The state made in the shardings `_step` returns it in: step 1 compiles once for every step.
    opt_state = jax.jit(opt.init, out_shardings=opt_shardings(opt, translators, mesh))(translators)
    state = (translators, opt_state, jnp.zeros(steps, jnp.float32))
    translators, _, losses = accumulate(list(range(steps)), one, state, mesh=mesh, progress=progress,
                                        inputs=lambda i: (blocks[i % len(blocks)], np.ones(blocks.shape[1:], np.int32)),
                                        desc="tuned lens", size=lambda i: per_step, host=False)
    return translators, {"loss": [float(x) for x in to_host(losses)], "tokens": steps * per_step,
                         "seconds": time.perf_counter() - t0}


def train(model, texts, *, steps: int = 40, batch: int = 4, length: int = 64, shortcut_tokens: int = 0, **kw):
    """`fit` on texts packed into batch x length blocks (the token budget is steps x batch x length).
    shortcut_tokens > 0: start from `fit_shortcut` on that many tokens instead of zero."""
    if shortcut_tokens:
        start = token_blocks(model, texts, batch, length, limit_tokens=shortcut_tokens)
        kw["translators"] = fit_shortcut(model.params, start, config=model.config)
    if not steps:
        return kw.get("translators", init_translators(model.config, _mesh(model.params))), {"loss": [], "tokens": 0, "seconds": 0.0}
    blocks = token_blocks(model, texts, batch, length, limit_tokens=steps * batch * length)
    return fit(model.params, blocks, config=model.config, steps=steps, **kw)


def kl_by_layer(params, blocks, translators=None, *, config: ModelConfig) -> np.ndarray:
    """Mean KL(final || lens) [L] over token blocks [n, batch, length] at the L hidden states the
    translators read (index 0 the embedding output, i block i - 1's output), through the fused
    kernel (translators=None: the logit lens)."""
    from jaxlens.kernels.lens import lens_from_tokens
    from jaxlens.runtime.loop import stream

    blocks = np.asarray(blocks, np.int32)
    blocks_read = tuple(range(config.n_layers - 1))
    step = lambda i, tokens: lens_from_tokens(params, tokens, None, config=config, layers=blocks_read, embedding=True,  # noqa: E731
                                              positions="all", k=1, translators=translators)["kl"].mean(axis=(1, 2))
    total = sum(kl for _, kl in stream(range(len(blocks)), step, mesh=_mesh(params), inputs=lambda i: (blocks[i],),
                                       progress=False, size=lambda i: 0))
    return total / len(blocks)


def _mesh(params):
    from jaxlens.core.sharding import default_mesh, params_mesh

    return params_mesh(params) or default_mesh()


def kl_on_texts(model, texts, translators=None, *, batch: int = 4, length: int = 64, max_batches: int = 4) -> np.ndarray:
    """`kl_by_layer` on held-out texts."""
    blocks = token_blocks(model, texts, batch, length, limit_tokens=max_batches * batch * length)[:max_batches]
    return kl_by_layer(model.params, blocks, translators, config=model.config)


def save(out, translators, *, model_name: str | None = None, config: ModelConfig | None = None, log: dict | None = None) -> Path:
    """Orbax checkpoint of the translators plus a JSON of their format and what they were trained on,
    written to OUT.partial and renamed into place (a failed save leaves nothing). With several
    processes, call it on every one: process 0 writes (`runtime.checkpoints`), and all return once
    OUT is in place. Sharded translators are saved as they lie in one process (orbax writes each
    shard), and gathered whole to process 0's host with several."""
    from jaxlens.report.io import output_dir, write_json
    from jaxlens.runtime.checkpoints import save_tree
    from jaxlens.runtime.distributed import barrier

    with output_dir(out) as tmp:
        save_tree(tmp / "translators", translators)
        L, D = int(translators["A"].shape[0]), int(translators["A"].shape[1])
        meta = {"format": FORMAT_VERSION, "layout": "translator 0: the embedding output (hidden_states[0]); i: block i-1's output",
                "model": model_name, "n_layers": L, "n_translators": L, "d_model": D,
                "config": json.loads(config.to_json()) if config is not None else None, "log": log}
        write_json(tmp / META_FILE, meta)
    barrier("tuned lens saved")  # the same name on every process (their paths may be spelled apart)
    return Path(out)


def check(directory, config: ModelConfig | None = None) -> tuple[Path, dict]:
    """(the translators' directory, their metadata), or a clear error: not a tuned lens, an old format
    (retrain), or (with `config`) trained for another model. Reads only the JSON: cheap enough to run
    before a model loads. A `jaxlens tuned-lens --out` directory is accepted for its translators/."""
    directory = Path(directory).absolute()
    if not (directory / META_FILE).exists() and (directory / "translators" / META_FILE).exists():
        directory = directory / "translators"
    if not (directory / META_FILE).exists():
        raise FileNotFoundError(f"{directory} is not a tuned lens (no {META_FILE}); train one: {RETRAIN}")
    meta = json.loads((directory / META_FILE).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"tuned lens {directory} has format {meta.get('format', 1)}; this jaxlens reads format {FORMAT_VERSION} "
            f"(one translator for the embedding output and one per block output 0..L-2, trained on the summed KL, as the "
            f"reference tuned-lens; format 1 had one per block output 0..L-1, so its indices mean other layers). "
            f"Retrain it: {RETRAIN}"
        )
    if config is not None and (meta["n_translators"], meta["d_model"]) != (config.n_layers, config.d_model):
        raise ValueError(
            f"tuned lens {directory} has {meta['n_translators']} translators of width {meta['d_model']}; the model "
            f"needs {config.n_layers} (one per layer) of width {config.d_model}: train one for this model ({RETRAIN})"
        )
    return directory, meta


def load(directory, config: ModelConfig | None = None, mesh=None) -> dict:
    """Translators saved by `save` (`check`ed first; with `config`, against the model's layers and
    width), restored straight into their shardings on `mesh` (the model's: `model.mesh`; default one
    device, or with several processes every device): each device reads only its shard."""
    from jaxlens.core.sharding import abstract, default_mesh, make_mesh
    from jaxlens.runtime.checkpoints import restore_tree

    directory, meta = check(directory, config)
    mesh = mesh or (default_mesh() if jax.process_count() == 1 else make_mesh())
    shapes = translator_shapes(meta["n_translators"], meta["d_model"])
    return restore_tree(directory / "translators", abstract(shapes, translator_shardings(shapes, mesh)))
