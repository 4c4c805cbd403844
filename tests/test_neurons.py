"""Neuron statistics through the forward pass on tiny checkpoints: exact counts, no [L, B, T, F]
buffer, 1 vs 8 devices, kill-and-resume, deactivation, and the CLI end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_8_devices

import jaxlens
from jaxlens import cli
from jaxlens.methods import neurons as N

HERE = Path(__file__).parent


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [b % 100 + 2 for b in text.encode()]


CORPUS = {
    "fr": N.Corpus(tuple(("", f"le chat {i} dort sur le tapis") for i in range(12))),
    "de": N.Corpus(tuple(("frage", f"die katze {i}") for i in range(9))),
    "zh": N.Corpus(tuple(("", "猫在睡觉" * (i % 3 + 1)) for i in range(10))),
}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    def make(model_type):
        _, directory = tiny_checkpoint(model_type)
        return jaxlens.load(directory, tokenizer=ByteTokenizer()), directory

    return make


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_collected_counts_equal_counts_from_captured_activations(tiny, model_type):
    model, _ = tiny(model_type)
    batches = N.corpus_batches(model, CORPUS, seq_len=16, batch_size=4)
    state = N.collect(model, batches, with_max=True, progress=False)
    R = batches.tokens.shape[0] * batches.tokens.shape[1]
    tokens, mask = batches.tokens.reshape(R, -1), batches.mask.reshape(R, -1)
    _, sites = model(tokens, mask, capture=("mlp_act",))
    x = np.asarray(sites["mlp_act"], np.float64)  # [L, R, T, F]
    counted = (batches.weights.reshape(R, -1) > 0) & (mask > 0)
    lang = batches.lang.reshape(R)
    for k, name in enumerate(batches.languages):
        sel = counted & (lang[:, None] == k)  # [R, T]
        assert sel.sum() == batches.counted[name] and (state["tokens"][:, k] == sel.sum()).all()
        np.testing.assert_array_equal(state["active"][:, k], (x[:, sel] > 0).sum(axis=1))
        np.testing.assert_allclose(state["sum"][:, k], x[:, sel].sum(axis=1), rtol=1e-4, atol=1e-4)
        dev = x[:, sel] - x[:, sel].mean(axis=1, keepdims=True)  # [L, n, F]
        np.testing.assert_allclose(state["m2"][:, k], (dev**2).sum(axis=1), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(state["max"][:, k], x[:, sel].max(axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_statistics_never_store_layers_by_tokens_by_neurons():
    from jaxlens.converters.families import config_from_hf
    from jaxlens.kernels.neurons import empty_state
    from jaxlens.core.forward import init_params

    cfg = config_from_hf(dict(model_type="llama", hidden_size=32, intermediate_size=128, num_hidden_layers=12,
                              num_attention_heads=2, num_key_value_heads=1, vocab_size=64, max_position_embeddings=64))
    params = init_params(cfg, jax.random.key(0))
    B, T, K, L, F = 4, 32, 3, cfg.n_layers, cfg.d_ff
    tokens, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.int32)
    state = empty_state(L, K, F)
    stats = N._stats_step(cfg, False).lower(params, state, tokens, mask, mask, jnp.ones((B, K))).compile().memory_analysis()
    plain = jax.jit(lambda p, t, m: jaxlens.forward(p, t, m, config=cfg)[0]).lower(params, tokens, mask).compile().memory_analysis()
    total = lambda m: m.temp_size_in_bytes + m.output_size_in_bytes  # noqa: E731
    state_bytes = sum(v.size * 4 for v in state.values())
    # Only the state comes back (plus the output tuple's 8-byte buffer pointers) ...
    assert state_bytes <= stats.output_size_in_bytes <= state_bytes + 8 * len(state)
    # ... and the reduction costs a few per-layer [B, T, F] buffers, far from the [L, B, T, F] that
    # capturing mlp_act costs (tests/test_capture.py: a capture costs exactly its array).
    acts = L * B * T * F * 4
    assert total(stats) - total(plain) < acts / 2


@pytest.mark.slow
def test_eight_devices_give_the_same_counts(tiny):
    _, directory = tiny("llama")
    run = run_on_8_devices("neurons_mesh_check.py", directory, timeout=300)
    assert "collect: counts equal on 1 and 8 devices" in run


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(tiny, tmp_path):
    _, directory = tiny("llama")
    script = str(HERE / "neurons_resume_check.py")
    run = lambda *a: subprocess.run([sys.executable, script, str(directory), *map(str, a)], capture_output=True, text=True, timeout=300)  # noqa: E731
    ckpt = tmp_path / "ckpt"
    killed = run(ckpt, tmp_path / "resumed.npz", 7)  # dies after batch 7; last save after batch 6 (every 3)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert not (tmp_path / "resumed.npz").exists()
    resumed = run(ckpt, tmp_path / "resumed.npz")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout and ": 6 of" in resumed.stdout
    whole = run("-", tmp_path / "whole.npz")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    a, b = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "whole.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # floats too: bit-identical


def test_resume_refuses_a_different_run(tiny, tmp_path):
    model, _ = tiny("llama")
    batches = N.corpus_batches(model, CORPUS, seq_len=16, batch_size=4)
    N.collect(model, batches, checkpoint_dir=tmp_path, save_every=100, progress=False)
    other = N.corpus_batches(model, CORPUS, seq_len=16, batch_size=4, budget=20)
    with pytest.raises(ValueError, match="different run"):
        N.collect(model, other, checkpoint_dir=tmp_path, progress=False)


def test_deactivating_neurons_changes_perplexity_only_when_they_fire(tiny):
    model, _ = tiny("llama")
    batches = N.corpus_batches(model, CORPUS, seq_len=16, batch_size=4)
    cfg = model.config
    base = N.perplexity(model, batches)
    assert set(base) == set(CORPUS) and all(1 < v < 1e4 for v in base.values())
    # Reference: plain forward, exp(mean NLL) of counted next tokens per language.
    R = batches.tokens.shape[0] * batches.tokens.shape[1]
    tokens, mask, w = (a.reshape(R, -1) for a in (batches.tokens, batches.mask, batches.weights))
    logits = np.asarray(model(tokens, mask)[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    use = (w[:, 1:] > 0) & (mask[:, :-1] > 0)
    lang = batches.lang.reshape(R)
    for k, name in enumerate(batches.languages):
        sel = use & (lang[:, None] == k)
        assert base[name] == pytest.approx(np.exp(nll[sel].mean()), rel=1e-4)
    everything = N.perplexity(model, batches, ablate=np.ones((cfg.n_layers, cfg.d_ff), bool))
    assert all(abs(everything[k] - base[k]) > 1e-3 for k in base)
    with pytest.raises(ValueError, match="neuron mask shape"):
        N.perplexity(model, batches, ablate=np.ones((1, 2), bool))


def test_perplexity_matrix_is_each_ablation_run_alone(tiny):
    """The stacked deactivation program (chunks of 2 over 3 masks, so one chunk is padded) equals a
    plain forward with each mask's ablation, NLL computed in numpy."""
    from jaxlens.core import interventions as iv

    model, _ = tiny("llama")
    cfg = model.config
    batches = N.corpus_batches(model, CORPUS, seq_len=16, batch_size=4)
    masks = np.random.default_rng(3).random((3, cfg.n_layers, cfg.d_ff)) < np.array([0.0, 0.3, 0.9])[:, None, None]
    got = N.perplexity_matrix(model, batches, masks, chunk=2)
    R = batches.tokens.shape[0] * batches.tokens.shape[1]
    tokens, mask, w = (a.reshape(R, -1) for a in (batches.tokens, batches.mask, batches.weights))
    use = (w[:, 1:] > 0) & (mask[:, :-1] > 0)
    lang = batches.lang.reshape(R)
    for p, m in enumerate(masks):
        logits = np.asarray(model(tokens, mask, interventions=iv.ablate("mlp_act", neurons=m))[0], np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
        for k in range(len(batches.languages)):
            assert got[p, k] == pytest.approx(np.exp(nll[use & (lang[:, None] == k)].mean()), rel=1e-4)
    assert not np.allclose(got[0], got[2])  # the ablations matter
    with pytest.raises(ValueError, match=r"\[P, n_layers, d_ff\]"):
        N.perplexity_matrix(model, batches, masks[0])


def test_cli_stats_lape_classify_deactivate_compare(tiny, tmp_path, monkeypatch):
    _, directory = tiny("llama")
    load = jaxlens.load
    monkeypatch.setattr(jaxlens, "load", lambda src, **kw: load(src, **{**kw, "tokenizer": ByteTokenizer()}))
    files = []
    for lang, corpus in CORPUS.items():
        path = tmp_path / f"{lang}.jsonl"
        path.write_text("\n".join(f'{{"prompt": "{p}", "response": "{t}"}}' for p, t in corpus.docs), encoding="utf-8")
        files.append(f"{lang}={path}")
    common = ["--model", str(directory), "--seq-len", "16", "--batch", "4", "--corpus", *files]
    assert cli.main(["neurons", "stats", *common, "--out", str(tmp_path / "stats"), "--save-every", "2"]) == 0
    assert not (tmp_path / "stats.ckpt").exists()  # spent checkpoints are removed
    state, meta = N.load_stats(tmp_path / "stats")
    assert meta["languages"] == list(CORPUS) and len(meta["corpus"]["fr"]["files"][0]["sha256"]) == 64
    assert state["active"].shape == (3, 3, 96)
    assert cli.main(["neurons", "lape", str(tmp_path / "stats"), "--out", str(tmp_path / "lape"), "--top-rate", "0.05"]) == 0
    assert cli.main(["neurons", "classify", str(tmp_path / "stats"), "--out", str(tmp_path / "cls"), "--top-rate", "0.05"]) == 0
    assert cli.main(["neurons", "deactivate", str(tmp_path / "lape"), *common, "--out", str(tmp_path / "deact")]) == 0
    assert cli.main(["neurons", "compare", str(tmp_path / "lape"), str(tmp_path / "cls"), "--out", str(tmp_path / "cmp")]) == 0
    for sub, files_ in {"stats": ["stats.npz", "activation.png"], "lape": ["neurons.npz", "neurons_per_layer.png"],
                        "cls": ["classes.npz", "classes_per_layer.png"], "deact": ["ppl.npz", "ppl_matrix.png"], "cmp": []}.items():
        for name in files_ + ["summary.json", "index.html"]:
            assert (tmp_path / sub / name).is_file(), (sub, name)
    # Bad input: a clear error, exit code 2.
    assert cli.main(["neurons", "lape", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["neurons", "stats", "--model", str(directory), "--corpus", "fr", "--out", str(tmp_path / "y")]) == 2
