"""Tuned lens: training lowers the KL to the model's output at every layer; save/load round trip."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens.methods import tuned_lens
from jaxlens.kernels.lens import lens_from_tokens
from conftest import random_tokens


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    _, directory = tiny_checkpoint("llama")
    model = jaxlens.load(directory)
    # A random init reads out near-uniform distributions (KL ~0.01 everywhere); a larger
    # unembedding gives peaked ones, so the layers genuinely disagree.
    model.params = {**model.params, "unembed": model.params["unembed"] * 30}
    blocks = random_tokens(0, (8, 4, 16))
    translators, log = tuned_lens.fit(model.params, model.config, blocks, steps=30, lr=0.03, progress=False)
    return model, translators, log, blocks


def test_training_lowers_kl_at_every_layer(trained):
    model, translators, log, blocks = trained
    held_out = random_tokens(1, (2, 4, 16))
    logit = tuned_lens.kl_by_layer(model.params, model.config, held_out)
    tuned = tuned_lens.kl_by_layer(model.params, model.config, held_out, translators)
    assert (tuned[:-1] < logit[:-1]).all(), (logit, tuned)
    # the closed-form linear shortcut, a starting point for SGD, already lowers it a lot
    shortcut = tuned_lens.fit_shortcut(model.params, model.config, blocks)
    assert (tuned_lens.kl_by_layer(model.params, model.config, held_out, shortcut)[:-1] < 0.8 * logit[:-1]).all()
    assert abs(tuned[-1]) < 1e-5 and abs(logit[-1]) < 1e-5  # the last layer is the model itself
    assert log["loss"][-1] < log["loss"][0]
    assert np.abs(np.asarray(translators["A"][-1])).max() == 0  # its translator stays the identity


def test_training_loss_matches_the_kernel(trained):
    """The loss the optimiser sees (full softmax) equals the fused kernel's KL on the same tokens."""
    import jax.numpy as jnp

    model, translators, _, _ = trained
    tokens = jnp.asarray(random_tokens(2, (4, 16)))
    opt = tuned_lens.optimizer(1, lr=0.0, weight_decay=0.0)
    _, _, _, per_layer = tuned_lens._step(translators, opt.init(translators), model.params, tokens,
                                          jnp.ones((4, 16), jnp.int32), config=model.config, opt=opt)
    kernel = tuned_lens.kl_by_layer(model.params, model.config, np.asarray(tokens)[None], translators)
    np.testing.assert_allclose(np.asarray(per_layer), kernel[:-1], rtol=1e-4, atol=1e-5)


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
