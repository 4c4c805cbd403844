"""Tuned lens (Belrose et al. 2303.08112): one affine translator per layer, trained on the KL to the
model's own output, read through the same fused kernel as the logit lens.

    translators, log = train(model, texts, steps=40, batch=4, length=64)
    save("out/tuned", translators, model_name="gemma3-270m", log=log)
    out = lens_from_tokens(model.params, tokens, mask, config=model.config, translators=load("out/tuned"))

Translator of layer l: h -> h + A_l h + b_l before the final norm, A [L, D, D] and b [L, D] zero at
the start (so training starts from the logit lens). The last layer keeps A = b = 0: its lens is the
model. Loss: KL(final || lens) per position, averaged over real tokens and over the layers but the
last. Optimiser (METHODS.md §A): SGD with Nesterov momentum 0.9, lr 0.1, weight decay 1e-3 (added
to the gradient, as torch's SGD does), learning rate decayed linearly to 0; ours also clips the
gradient's global norm to 1 [inferred: without it SGD diverged on tiny and real models alike]. The paper's budget (250
steps of 2^18 tokens) is a parameter: on CPU a few thousand tokens already move the KL a lot.
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
from jaxlens.kernels.lens import logits_of

META_FILE = "tuned_lens.json"


def init_translators(config: ModelConfig, dtype=jnp.float32) -> dict:
    """Zero translators for every layer: {A [L, D, D], b [L, D]} (the logit lens)."""
    L, D = config.n_layers, config.d_model
    return {"A": jnp.zeros((L, D, D), dtype), "b": jnp.zeros((L, D), dtype)}


def optimizer(steps: int, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-3, clip: float | None = 1.0):
    """SGD, Nesterov momentum, weight decay added to the gradient, linear decay to 0; the gradient's
    global norm clipped to `clip` first (None: off): residual norms differ by orders of magnitude
    between models and layers, and unclipped SGD diverges on a budget of a few steps."""
    schedule = optax.linear_schedule(lr, 0.0, max(steps, 1))
    parts = [optax.clip_by_global_norm(clip)] if clip is not None else []
    parts += [optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum, nesterov=True)]
    return optax.chain(*parts)


def _layer_kl(params, config, h, A, b, logp_final):
    """KL(final || tuned lens) per token of one layer: h [N, D] residuals, logp_final [N, V]."""
    logits = logits_of(params, h + h @ A.T.astype(h.dtype) + b.astype(h.dtype), config=config)  # [N, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.exp(logp_final) * (logp_final - logp), axis=-1)  # [N]


def kl_per_layer(translators, params, resid, logp_final, weights, config: ModelConfig):
    """Mean KL per layer [L] over weighted tokens. resid [L, N, D]; logp_final [N, V]; weights [N].

    The layers go one at a time (lax.map) and each is rematerialised in the backward pass, so the
    peak memory is a few [N, V] arrays, never [L, N, V]."""
    layer = jax.checkpoint(partial(_layer_kl, params, config, logp_final=logp_final))
    kl = jax.lax.map(lambda a: layer(*a), (resid, translators["A"], translators["b"]))  # [L, N]
    return (kl * weights).sum(-1) / jnp.maximum(weights.sum(), 1.0)


@partial(jax.jit, static_argnames=("config", "opt"))
def _step(translators, opt_state, params, tokens, mask, *, config: ModelConfig, opt):
    from jaxlens.core.forward import forward

    logits, sites = forward(params, tokens, mask, config=config, capture=("resid_post",))
    L, B, T, D = sites["resid_post"].shape
    resid = jax.lax.stop_gradient(sites["resid_post"][:-1].reshape(L - 1, B * T, D))  # the last layer is fixed
    logp_final = jax.lax.stop_gradient(jax.nn.log_softmax(logits.reshape(B * T, -1), axis=-1))
    weights = mask.reshape(-1).astype(jnp.float32)

    def loss(tr):
        head = {"A": tr["A"][:-1], "b": tr["b"][:-1]}
        per_layer = kl_per_layer(head, params, resid, logp_final, weights, config)
        return per_layer.mean(), per_layer

    (value, per_layer), grads = jax.value_and_grad(loss, has_aux=True)(translators)
    updates, opt_state = opt.update(grads, opt_state, translators)
    translators = optax.apply_updates(translators, updates)
    # The last layer's translator stays the identity (weight decay of zeros is zero, but be exact).
    translators = {"A": translators["A"].at[-1].set(0), "b": translators["b"].at[-1].set(0)}
    return translators, opt_state, value, per_layer


def pack(model, texts, batch: int, length: int, limit_tokens: int | None = None):
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
    """Sums for the least-squares fit of h_L from [h_l, 1]: X^T X [L, D+1, D+1], X^T Y [L, D+1, D]."""
    from jaxlens.core.forward import forward

    _, sites = forward(params, tokens, jnp.ones_like(tokens), config=config, capture=("resid_post",))
    resid = sites["resid_post"].astype(jnp.float32)  # [L, B, T, D]
    L, B, T, D = resid.shape
    x = jnp.concatenate([resid, jnp.ones((L, B, T, 1), jnp.float32)], -1).reshape(L, B * T, D + 1)
    x = x * weights.reshape(1, -1, 1)
    y = resid[-1].reshape(B * T, D)
    return jnp.einsum("lni,lnj->lij", x, x), jnp.einsum("lni,nj->lij", x, y)


def fit_shortcut(params, config: ModelConfig, blocks, ridge: float = 1e-3) -> dict:
    """Translators fitted in closed form so that h + A h + b best predicts the last layer's residual
    (least squares, ridge `ridge` x the mean diagonal; Din et al. 2023's linear shortcut). Costs only
    forward passes, so it uses far more tokens than SGD can on a CPU; a starting point for `fit`.
    BOS positions are left out: their residuals are orders of magnitude larger in some models and
    would dominate the fit."""
    from jaxlens.runtime.loop import stream

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
    A[-1], b = 0.0, sol[:, D].copy()
    b[-1] = 0.0
    return {"A": jnp.asarray(A, jnp.float32), "b": jnp.asarray(b, jnp.float32)}


def fit(params, config: ModelConfig, blocks, *, steps: int = 40, lr: float = 0.1, momentum: float = 0.9,
        weight_decay: float = 1e-3, clip: float | None = 1.0, translators=None, progress: bool = True):
    """Train translators on token blocks [n, batch, length] for `steps` steps (cycling through the
    blocks). Returns (translators, log) with log = {"loss": [...], "tokens": n, "seconds": s}."""
    from jaxlens.runtime.loop import accumulate

    blocks = np.asarray(blocks, np.int32)
    if blocks.ndim != 3:
        raise ValueError(f"blocks must be [n, batch, length] token ids; got shape {blocks.shape}")
    translators = init_translators(config) if translators is None else translators
    opt = optimizer(steps, lr, momentum, weight_decay, clip)
    per_step = blocks.shape[1] * blocks.shape[2]

    def one(i, state, tokens, mask):  # the losses stay on device until the end: no per-step sync
        translators, opt_state, losses = state
        translators, opt_state, loss, _ = _step(translators, opt_state, params, tokens, mask, config=config, opt=opt)
        return translators, opt_state, losses.at[i].set(loss)

    t0 = time.perf_counter()
    state = (translators, opt.init(translators), jnp.zeros(steps, jnp.float32))
    translators, _, losses = accumulate(list(range(steps)), one, state, mesh=_mesh(params), progress=progress,
                                        inputs=lambda i: (blocks[i % len(blocks)], np.ones(blocks.shape[1:], np.int32)),
                                        desc="tuned lens", size=lambda i: per_step)
    return translators, {"loss": [float(x) for x in losses], "tokens": steps * per_step, "seconds": time.perf_counter() - t0}


def train(model, texts, *, steps: int = 40, batch: int = 4, length: int = 64, shortcut_tokens: int = 0, **kw):
    """`fit` on texts packed into batch x length blocks (the token budget is steps x batch x length).
    shortcut_tokens > 0: start from `fit_shortcut` on that many tokens instead of zero."""
    if shortcut_tokens:
        start = pack(model, texts, batch, length, limit_tokens=shortcut_tokens)
        kw["translators"] = fit_shortcut(model.params, model.config, start)
    blocks = pack(model, texts, batch, length, limit_tokens=steps * batch * length)
    if not steps:
        return kw.get("translators", init_translators(model.config)), {"loss": [], "tokens": 0, "seconds": 0.0}
    return fit(model.params, model.config, blocks, steps=steps, **kw)


def kl_by_layer(params, config: ModelConfig, blocks, translators=None) -> np.ndarray:
    """Mean KL(final || lens) per layer [L] over token blocks [n, batch, length], through the fused
    kernel (translators=None: the logit lens)."""
    from jaxlens.kernels.lens import lens_from_tokens
    from jaxlens.runtime.loop import stream

    blocks = np.asarray(blocks, np.int32)
    step = lambda i, tokens: lens_from_tokens(params, tokens, None, config=config, positions="all", k=1,  # noqa: E731
                                              translators=translators)["kl"].mean(axis=(1, 2))
    total = sum(kl for _, kl in stream(range(len(blocks)), step, mesh=_mesh(params), inputs=lambda i: (blocks[i],),
                                       progress=False, size=lambda i: 0))
    return total / len(blocks)


def _mesh(params):
    from jaxlens.core.sharding import default_mesh, params_mesh

    return params_mesh(params) or default_mesh()


def evaluate(model, texts, translators=None, *, batch: int = 4, length: int = 64, max_batches: int = 4) -> np.ndarray:
    """`kl_by_layer` on held-out texts."""
    blocks = pack(model, texts, batch, length, limit_tokens=max_batches * batch * length)[:max_batches]
    return kl_by_layer(model.params, model.config, blocks, translators)


def save(out, translators, *, model_name: str | None = None, config: ModelConfig | None = None, log: dict | None = None) -> Path:
    """Orbax checkpoint of the translators plus a JSON of what they were trained on, written to
    OUT.partial and renamed into place (a failed save leaves nothing)."""
    import orbax.checkpoint as ocp

    from jaxlens.report.io import output_dir

    with output_dir(out) as tmp:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / "translators", translators)
        meta = {"model": model_name, "n_layers": int(translators["A"].shape[0]), "d_model": int(translators["A"].shape[1]),
                "config": json.loads(config.to_json()) if config is not None else None, "log": log}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return Path(out)


def load(directory, config: ModelConfig | None = None) -> dict:
    """Translators saved by `save`; with `config`, checked against the model's layers and width."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not (directory / META_FILE).exists():
        raise FileNotFoundError(f"{directory} is not a tuned lens (no {META_FILE}); train one with jaxlens.methods.tuned_lens.train/save")
    meta = json.loads((directory / META_FILE).read_text())
    if config is not None and (meta["n_layers"], meta["d_model"]) != (config.n_layers, config.d_model):
        raise ValueError(
            f"tuned lens {directory} has {meta['n_layers']} layers of width {meta['d_model']}; the model has "
            f"{config.n_layers} of width {config.d_model}: train one for this model"
        )
    L, D = meta["n_layers"], meta["d_model"]
    target = {"A": jax.ShapeDtypeStruct((L, D, D), jnp.float32), "b": jax.ShapeDtypeStruct((L, D), jnp.float32)}
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(directory / "translators", target)


def main(argv=None) -> int:
    """python -m jaxlens.methods.tuned_lens --model gemma3-270m --out DIR: fit the linear shortcut, then SGD
    on the KL; print and save the per-layer KL on held-out XCOPA (val) text, logit vs tuned lens."""
    import argparse

    import jaxlens
    from jaxlens.report.io import write_json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--out", required=True, help="directory for the translators (orbax) and kl.json")
    p.add_argument("--shortcut-tokens", type=int, default=2048, help="tokens for the closed-form start (0: start from zero)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--eval-tokens", type=int, default=256)
    args = p.parse_args(argv)

    model = jaxlens.load(args.model)
    texts, held = default_texts("test"), default_texts("val")
    held_blocks = pack(model, held, 2, 64, limit_tokens=args.eval_tokens)[: max(1, args.eval_tokens // 128)]
    translators = init_translators(model.config)
    if args.shortcut_tokens:
        translators = fit_shortcut(model.params, model.config, pack(model, texts, 4, 64, limit_tokens=args.shortcut_tokens))
    shortcut_kl = kl_by_layer(model.params, model.config, held_blocks, translators)
    log = {"loss": [], "tokens": 0, "seconds": 0.0}
    if args.steps:  # SGD text from the other end of the corpus than the shortcut's
        blocks = pack(model, texts[::-1], args.batch, args.length, limit_tokens=args.steps * args.batch * args.length)
        translators, log = fit(model.params, model.config, blocks, steps=args.steps, lr=args.lr, translators=translators)
    logit = kl_by_layer(model.params, model.config, held_blocks)
    tuned = kl_by_layer(model.params, model.config, held_blocks, translators)
    save(Path(args.out) / "translators", translators, model_name=args.model, config=model.config, log=log)
    result = {"model": args.model, "args": vars(args), "held_out_tokens": int(held_blocks.size), "logit_lens": logit.tolist(),
              "shortcut_only": shortcut_kl.tolist(), "tuned_lens": tuned.tolist(), "sgd": log}
    write_json(Path(args.out) / "kl.json", result)
    print("layer  logit-lens  shortcut  tuned-lens   KL(final || lens), nats, held-out XCOPA val")
    for i, (a, b, c) in enumerate(zip(logit, shortcut_kl, tuned)):
        print(f"{i:>5}  {a:>10.3f}  {b:>8.3f}  {c:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
