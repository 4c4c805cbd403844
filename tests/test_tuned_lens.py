"""Tuned lens: training lowers the KL to the model's output at every layer; save/load round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens.methods import tuned_lens
from jaxlens.kernels.lens import lens_from_tokens
from conftest import random_tokens, run_on_8_devices


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    _, directory = tiny_checkpoint("llama")
    model = jaxlens.load(directory)
    # A random init reads out near-uniform distributions (KL ~0.01 everywhere); a larger
    # unembedding gives peaked ones, so the layers genuinely disagree.
    model.params = {**model.params, "unembed": model.params["unembed"] * 30}
    blocks = random_tokens(0, (8, 4, 16))
    translators, log = tuned_lens.fit(model.params, blocks, config=model.config, steps=30, lr=0.03, progress=False)
    return model, translators, log, blocks


def test_training_lowers_kl_at_every_layer(trained):
    model, translators, log, blocks = trained
    L = model.config.n_layers
    held_out = random_tokens(1, (2, 4, 16))
    logit = tuned_lens.kl_by_layer(model.params, held_out, config=model.config)
    tuned = tuned_lens.kl_by_layer(model.params, held_out, translators, config=model.config)
    assert logit.shape == tuned.shape == (L,)  # the embedding output and blocks 0..L-2
    assert (tuned < logit).all(), (logit, tuned)
    # the closed-form linear shortcut, a starting point for SGD, already lowers it a lot at the block
    # outputs; not at the embedding output of this random model, where 512 tokens of 128 random
    # embeddings cannot predict a context-dependent last residual (it fits the residual, not the KL)
    shortcut = tuned_lens.fit_shortcut(model.params, blocks, config=model.config)
    assert shortcut["A"].shape[0] == L
    assert (tuned_lens.kl_by_layer(model.params, held_out, shortcut, config=model.config)[1:] < 0.8 * logit[1:]).all()
    assert log["loss"][-1] < log["loss"][0]


def test_an_l_layer_model_gets_l_translators(trained):
    model, translators, _, _ = trained
    L, D = model.config.n_layers, model.config.d_model
    assert translators["A"].shape == (L, D, D) and translators["b"].shape == (L, D)
    assert tuned_lens.init_translators(model.config)["A"].shape == (L, D, D)
    # every one is trained, the embedding output's (index 0) and the last (block L-2's) included
    assert all(np.abs(np.asarray(translators["A"][i])).max() > 0 for i in range(L))


def reference_loss_and_grad(translators, params, hidden, labels):
    """AlignmentResearch/tuned-lens, scripts/train_loop.py Train.execute, transcribed for a Llama
    head (RMSNorm, untied unembedding): for each hidden state i, logits = unembed(final_norm(h +
    W_i h + b_i)); loss_i = sum(labels.exp() * (labels - logits.log_softmax(-1)), -1).mean(); each
    loss_i.backward() on its own, so the gradients add. Returns (sum of loss_i, summed grads)."""
    import jax

    scale, eps, W_U = params["final_norm"]["scale"], 1e-6, params["unembed"]

    def layer_loss(tr, i):
        h = hidden[i]
        h = h + h @ tr["A"][i].T + tr["b"][i]  # TunedLens.transform_hidden: h + Linear(h)
        normed = h / jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps) * scale  # LlamaRMSNorm
        logits = normed @ W_U
        return jnp.sum(jnp.exp(labels) * (labels - jax.nn.log_softmax(logits, axis=-1)), axis=-1).mean()

    losses, grads = zip(*(jax.value_and_grad(layer_loss)(translators, i) for i in range(hidden.shape[0])))
    return sum(losses), jax.tree.map(lambda *g: sum(g), *grads)


def test_loss_and_gradient_are_the_references_summed_kl(trained):
    import jax

    model, _, _, _ = trained
    cfg = model.config
    assert cfg.norm == "rms" and not cfg.norm_plus_one and not cfg.tie_embeddings and cfg.norm_eps == 1e-6
    L, D, V, N = cfg.n_layers, cfg.d_model, cfg.vocab_size, 24
    rng = np.random.default_rng(7)
    translators = {"A": jnp.asarray(0.1 * rng.standard_normal((L, D, D)), jnp.float32),
                   "b": jnp.asarray(0.3 * rng.standard_normal((L, D)), jnp.float32)}
    hidden = jnp.asarray(rng.standard_normal((L, N, D)), jnp.float32)
    labels = jax.nn.log_softmax(jnp.asarray(3 * rng.standard_normal((N, V)), jnp.float32), axis=-1)
    (value, per_layer), grads = jax.value_and_grad(tuned_lens.loss, has_aux=True)(
        translators, model.params, hidden, labels, jnp.ones(N, jnp.float32), config=cfg)
    ref_value, ref_grads = reference_loss_and_grad(translators, model.params, hidden, labels)
    assert per_layer.shape == (L,)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    for name in ("A", "b"):
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(ref_grads[name]), rtol=1e-6, atol=1e-6)


def test_training_loss_matches_the_kernel(trained):
    """The per-layer KL the optimiser sees (full softmax) equals the fused kernel's KL on the same
    tokens, hidden state by hidden state (index 0 the embedding output), and the loss is their sum."""
    model, translators, _, _ = trained
    tokens = jnp.asarray(random_tokens(2, (4, 16)))
    opt = tuned_lens.optimizer(1, lr=0.0, weight_decay=0.0)
    copy = jax.tree.map(jnp.copy, translators)  # the step consumes (donates) its translators
    _, _, value, per_layer = tuned_lens._step(model.params, copy, opt.init(copy), tokens,
                                              jnp.ones((4, 16), jnp.int32), config=model.config, opt=opt,
                                              mesh=model.mesh)
    kernel = tuned_lens.kl_by_layer(model.params, np.asarray(tokens)[None], translators, config=model.config)
    np.testing.assert_allclose(np.asarray(per_layer), kernel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(value), kernel.sum(), rtol=1e-4)


def test_translator_i_reads_hidden_state_i(trained):
    """lens_from_tokens applies translator i to HF's hidden_states[i] (0 the embedding output) and
    none to the last block's output; with zero translators it is the logit lens at every one."""
    from jaxlens.core.forward import forward
    from jaxlens.kernels.lens import hidden_states, logits_of

    model, _, _, _ = trained
    cfg, L, D = model.config, model.config.n_layers, model.config.d_model
    tokens = random_tokens(4, (2, 8))
    rng = np.random.default_rng(1)
    random_tr = {"A": jnp.asarray(0.2 * rng.standard_normal((L, D, D)), jnp.float32),
                 "b": jnp.asarray(rng.standard_normal((L, D)), jnp.float32)}
    _, sites = forward(model.params, jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32), config=cfg,
                       capture=("embed", "resid_post"))
    states = np.concatenate([np.asarray(hidden_states(sites)), np.asarray(sites["resid_post"][-1:])])  # [L + 1, B, T, D]
    for tr in (None, tuned_lens.init_translators(cfg), random_tr):
        out = lens_from_tokens(model.params, tokens, config=cfg, positions="all", k=3, embedding=True, translators=tr)
        assert out["top_probs"].shape[0] == L + 1  # the embedding output, then blocks 0..L-1
        for i, h in enumerate(states):
            if tr is not None and i < L:
                h = h + h @ np.asarray(tr["A"][i]).T + np.asarray(tr["b"][i])
            probs = np.asarray(jax.nn.softmax(logits_of(model.params, jnp.asarray(h), config=cfg), axis=-1))
            np.testing.assert_allclose(np.asarray(out["top_probs"][i]), -np.sort(-probs, axis=-1)[..., :3], rtol=1e-4, atol=1e-6)
        if tr is not None and tr is not random_tr:  # zero translators: the logit lens, embedding output included
            plain = lens_from_tokens(model.params, tokens, config=cfg, positions="all", k=3, embedding=True)
            np.testing.assert_allclose(np.asarray(out["kl"]), np.asarray(plain["kl"]), atol=1e-6)
            np.testing.assert_array_equal(np.asarray(out["top_ids"]), np.asarray(plain["top_ids"]))
    old_count = {"A": random_tr["A"][1:], "b": random_tr["b"][1:]}  # one short: the old per-block layout minus one
    with pytest.raises(ValueError, match="one per hidden state the tuned lens reads"):
        lens_from_tokens(model.params, tokens, config=cfg, translators=old_count)


def test_save_load_round_trip(trained, tmp_path):
    model, translators, log, _ = trained
    out = tmp_path / "tuned"
    tuned_lens.save(out, translators, model_name="tiny-llama", config=model.config, log=log)
    assert not (tmp_path / "tuned.partial").exists()
    loaded = tuned_lens.load(out, model.config)
    for name in ("A", "b"):
        np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(translators[name]))
    tokens = random_tokens(3, (2, 8))
    a = lens_from_tokens(model.params, tokens, config=model.config, translators=translators)
    b = lens_from_tokens(model.params, tokens, config=model.config, translators=loaded)
    np.testing.assert_array_equal(np.asarray(a["top_probs"]), np.asarray(b["top_probs"]))
    with pytest.raises(FileExistsError):
        tuned_lens.save(out, translators)
    with pytest.raises(FileNotFoundError, match="not a tuned lens"):
        tuned_lens.load(tmp_path)
    with pytest.raises(ValueError, match="train one for this model"):
        tuned_lens.load(out, model.config.__class__(**{**model.config.__dict__, "d_model": 32}))


def test_translators_split_over_the_mesh_match_one_device(tiny_checkpoint, tmp_path):
    """data=2, fsdp=2, model=2: translators and momentum split by the tuned_lens/A rule, and fit,
    fit_shortcut, save/load and the lens give one device's numbers (tests/tuned_lens_mesh_check.py)."""
    _, directory = tiny_checkpoint("llama")
    run = run_on_8_devices("tuned_lens_mesh_check.py", directory, tmp_path, timeout=600)
    assert "step keeps translators and momentum split" in run and "lens through split translators equal" in run


def test_an_old_format_directory_is_refused(trained, tmp_path):
    """Format 1 (no "format" key: one translator per block output 0..L-1) reads other layers under
    today's layout: load refuses it and says how to retrain, rather than shift every index by one."""
    import json

    model, translators, _, _ = trained
    out = tuned_lens.save(tmp_path / "old", translators, config=model.config)
    meta = json.loads((out / tuned_lens.META_FILE).read_text())
    old = {k: meta[k] for k in ("model", "n_layers", "d_model", "config", "log")}  # what format 1 wrote
    (out / tuned_lens.META_FILE).write_text(json.dumps(old))
    for call in (lambda: tuned_lens.load(out, model.config), lambda: tuned_lens.check(out)):
        with pytest.raises(ValueError, match=r"format 1; this jaxlens reads format 2.*Retrain it: jaxlens tuned-lens --model"):
            call()


def test_lens_command_reads_through_saved_translators(tiny, tmp_path):
    """`jaxlens lens --lens tuned --translators DIR` applies the saved translators in the kernel."""
    import json

    from jaxlens.cli import main
    from jaxlens.kernels.lens import lens_from_tokens

    model, _, directory = tiny
    L, D = model.config.n_layers, model.config.d_model
    rng = np.random.default_rng(0)
    translators = {"A": jnp.asarray(0.3 * rng.standard_normal((L, D, D)), jnp.float32), "b": jnp.zeros((L, D), jnp.float32)}
    tuned_lens.save(tmp_path / "tl", translators, config=model.config)
    prompt = "The man turned on the tap."
    for lens, extra in (("logit", []), ("tuned", ["--translators", str(tmp_path / "tl")])):
        out = tmp_path / f"{lens}.json"
        assert main(["lens", "--model", str(directory), "--prompt", prompt, "--lens", lens, *extra, "--out", str(out)]) == 0
        tokens, mask = model.encode([prompt])
        ref = lens_from_tokens(model.params, tokens, mask, config=model.config, k=5,
                               translators=translators if lens == "tuned" else None)
        got = [[t["id"] for t in row["top"]] for row in json.loads(out.read_text())["layers"]]
        np.testing.assert_array_equal(got, np.asarray(ref["top_ids"])[:, 0, 0])
    assert main(["lens", "--model", str(directory), "--prompt", prompt, "--lens", "tuned"]) == 2  # no translators


def test_tuned_lens_command_trains_and_lens_reads_it(tiny, tmp_path):
    """`jaxlens tuned-lens` trains translators on XCOPA text (a few steps) and `jaxlens lens --lens
    tuned --translators OUT --embedding` reads them: the embedding output through translator 0,
    block l through translator l + 1, the last block as the model's own output."""
    import json

    from jaxlens.cli import main

    model, _, directory = tiny
    out = tmp_path / "tl"
    assert main(["tuned-lens", "--model", str(directory), "--out", str(out), "--steps", "2", "--batch", "2",
                 "--length", "16", "--shortcut-tokens", "256", "--eval-tokens", "128"]) == 0
    kl = json.loads((out / "kl.json").read_text())
    L = model.config.n_layers
    assert kl["format"] == 2 and len(kl["tuned_lens"]) == len(kl["logit_lens"]) == L and kl["hidden_states"][0] == "embedding"
    assert len(kl["sgd"]["loss"]) == 2
    translators = tuned_lens.load(out, model.config)
    prompt = "The man turned on the tap."
    assert main(["lens", "--model", str(directory), "--prompt", prompt, "--lens", "tuned", "--translators", str(out),
                 "--embedding", "--out", str(tmp_path / "lens.json")]) == 0
    tokens, mask = model.encode([prompt])
    ref = lens_from_tokens(model.params, tokens, mask, config=model.config, k=5, translators=translators, embedding=True)
    rows = json.loads((tmp_path / "lens.json").read_text())["layers"]
    assert [row["layer"] for row in rows] == ["emb", *range(L)]  # the embedding output, through translator 0
    np.testing.assert_array_equal([[t["id"] for t in row["top"]] for row in rows], np.asarray(ref["top_ids"])[:, 0, 0])


def test_tuned_lens_command_refuses_before_load(tmp_path, capsys):
    from jaxlens.cli import main

    no_model = "/nonexistent/model.gguf"
    for argv, message in ((["--steps", "-1"], "--steps must be >= 0"), (["--length", "0"], "--length must be a positive"),
                          (["--lr", "0"], "--lr must be > 0"), (["--batch", "0"], "--batch must be a positive"),
                          (["--steps", "0", "--shortcut-tokens", "0"], "trains nothing")):
        assert main(["tuned-lens", "--model", no_model, "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "nonexistent" not in err, err
    assert main(["lens", "--model", no_model, "--lens", "tuned", "--translators", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a tuned lens" in err and "jaxlens tuned-lens" in err and "nonexistent" not in err
