"""`jaxlens bench`: the plan's program run for real, its figures, and bad input refused before a load."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import jax
import pytest

import jaxlens
from jaxlens import cli
from jaxlens.commands.plan import load_config
from jaxlens.methods import bench as B, plan as PL

TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.mark.parametrize("probe", ["forward", "lens", "neurons"])
def test_bench_writes_sane_figures_beside_the_plan(tiny_config, tmp_path, probe, capsys):
    out = tmp_path / "out"
    rc = cli.main(["bench", "--model", str(tiny_config), "--probe", probe, "--batch", "2x16", "--warmup", "1",
                   "--steps", "3", "--languages", "2", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "MFU (measured)" in text and "plan predicts" in text
    r = json.loads((out / "bench.json").read_text())
    assert r["model"] == str(tiny_config) and r["random_weights"] and r["probe"] == probe and r["dtype"] == "float32"
    assert len(r["step_s"]) == 3 and all(s > 0 for s in r["step_s"])
    assert r["median_step_s"] == statistics.median(r["step_s"])
    assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["median_step_s"])
    assert r["flops_per_s"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"])
    assert 0 < r["mfu_measured"] <= 1 and r["matmul"]["flops_per_s"] > 1e8
    assert r["published_peak"] is None and r["mfu_published"] is None  # a CPU has no published bf16 peak
    # The prediction is `jaxlens plan`'s for the same probe and shape.
    config = load_config(str(tiny_config))
    plan = PL.plan(config, jaxlens.make_mesh(1, 1, devices=jax.devices()[:1]), probe=probe, dtype="float32", batch=2,
                   seq_len=16, n_groups=2)
    assert r["plan_per_device_bytes"] == plan.per_device and r["flops_per_token"] == plan.flops_per_token
    # Measured: the resident params at least, and a ratio that is the two figures' quotient.
    # At least (exactly, in a fresh process: the 4-device test) what is resident: live arrays that
    # other tests in this process still hold on the device count too.
    assert r["peak_parts"]["live_arrays"] >= plan.per_device["params"] + plan.per_device["inputs"]
    assert r["peak_bytes_per_device"] == r["peak_parts"]["live_arrays"] + r["peak_parts"]["rss_rise"]
    assert r["memory_ratio"] == pytest.approx(r["peak_bytes_per_device"] / plan.per_device["total"])


def test_bench_on_a_sharded_mesh_counts_per_device(tiny_config, tmp_path):
    """4 simulated devices, fsdp=2 x model=2: the params are split, and the measured resident part
    per device is this device's shards + inputs, as the plan counts them."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "jaxlens.cli", "bench", "--model", str(tiny_config), "--mesh", "fsdp=2,model=2",
                          "--probe", "lens", "--batch", "4x16", "--warmup", "1", "--steps", "2", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    r = json.loads((out / "bench.json").read_text())
    d = r["plan_per_device_bytes"]
    assert r["devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 2, "model": 2}
    assert d["params"] < PL.total_params_bytes(load_config(str(tiny_config)), "float32") / 2  # split, not replicated
    assert r["peak_parts"]["live_arrays"] == d["params"] + d["inputs"]
    assert r["tokens_per_s"] > 0 and 0 < r["mfu_measured"] <= 1


def test_bench_runs_a_loaded_checkpoint(tiny_checkpoint, capsys):
    _, directory = tiny_checkpoint("llama")
    assert cli.main(["bench", "--model", str(directory), "--probe", "forward", "--batch", "1x8", "--warmup", "0",
                     "--steps", "1"]) == 0
    text = capsys.readouterr().out
    assert "loaded" in text and "random weights" not in text and "tokens/s" in text


@pytest.mark.parametrize("argv, needle", [
    (["--batch", "8x"], "--batch '8x'"),
    (["--batch", "0x128"], "--batch '0x128'"),
    (["--probe", "logits"], "--probe 'logits': choose one of forward, lens, neurons, steer, transplant"),
    (["--points", "0"], "--points 0: a sweep needs at least one point"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--warmup", "-1"], "--warmup must be 0 or more"),
])
def test_bad_input_is_refused_before_any_model_load(tmp_path, argv, needle, capsys):
    """A model that does not exist: had it been loaded first, the error would name it instead."""
    out = tmp_path / "out"
    rc = cli.main(["bench", "--model", str(tmp_path / "no-such-model"), "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "no-such-model" not in err, err
    assert not out.exists()


def test_published_peaks_name_the_chip_from_the_device_kind():
    assert B.published_peak("TPU v5 lite") == ("v5e", 197e12)
    assert B.published_peak("TPU v5p")[0] == "v5p"
    assert B.published_peak("TPU v6 lite")[0] == "v6e"
    assert B.published_peak("NVIDIA H100 80GB HBM3") == ("h100", 989e12)
    assert B.published_peak("NVIDIA H100 PCIe")[0] == "h100-pcie"
    assert B.published_peak("NVIDIA A100-SXM4-80GB")[0] == "a100"
    assert B.published_peak("cpu") is None


def test_cpu_peak_is_what_a_step_touches():
    """A step that makes a 64 MiB array, after a warm-up that made and freed one: the measured
    rise of a step is that array (within 5%)."""
    import jax.numpy as jnp

    from jaxlens.runtime.bench import run_steps

    make = jax.jit(lambda x: jnp.full((16 * 2**20,), x, jnp.float32))
    seconds, peak = run_steps(lambda: make(1.0), jax.devices()[:1], warmup=1, steps=3)
    assert len(seconds) == 3 and peak.how.startswith("CPU")
    assert 0.95 <= peak.parts["rss_rise"] / (64 * 2**20) <= 1.15, peak.parts
