"""`jaxlens plan`: bundled configs, the compiled program's per-device memory, fit and batch search."""

from __future__ import annotations

import json

import jax
import pytest

import jaxlens
from jaxlens import cli
from jaxlens.commands.options import parse_mesh
from jaxlens.commands.plan import load_config, parse_batch
from jaxlens.methods import plan as PL

# Published parameter counts (model cards): what the bundled configs must build.
PUBLISHED = {"llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.55e9, "qwen2.5-72b": 72.7e9, "gemma-2-27b": 27.2e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bundled_configs_have_the_published_sizes(name):
    config = load_config(name)
    n = PL.total_params_bytes(config, "float32") / 4
    assert abs(n / PUBLISHED[name] - 1) < 0.005, (name, n)
    assert load_config({"llama-3.1-8b": "meta-llama/Llama-3.1-8B"}.get(name, name)) == config


def test_forward_plan_counts_what_the_program_holds(tiny_checkpoint):
    """One device, float32: outputs are exactly logits + the captured residuals; params exactly the
    params' bytes; more rows cost more temporaries."""
    _, directory = tiny_checkpoint("llama")
    config = load_config(str(directory))
    mesh = jaxlens.make_mesh(1, 1, devices=jax.devices()[:1])
    B, T = 4, 32
    p = PL.plan(config, mesh, probe="forward", dtype="float32", batch=B, seq_len=T, capture=("resid_post",))
    L, D, V = config.n_layers, config.d_model, config.vocab_size
    assert 0 <= p.per_device["outputs"] - 4 * (B * T * V + L * B * T * D) <= 64  # + the output tuple's pointers
    assert p.per_device["params"] == PL.total_params_bytes(config, "float32")
    assert p.per_device["arguments"] == p.per_device["params"] + 2 * B * T * 4  # + tokens and mask
    assert p.per_device["inputs"] == 2 * B * T * 4
    assert p.per_device["total"] == p.per_device["arguments"] + p.per_device["outputs"] + p.per_device["temps"]
    bigger = PL.plan(config, mesh, probe="forward", dtype="float32", batch=2 * B, seq_len=T, capture=("resid_post",))
    assert bigger.per_device["temps"] > p.per_device["temps"]
    # A forward's FLOPs: 2 x (layer kernels + unembedding) + attention, per token.
    kernels = PL.total_params_bytes(config, "float32") / 4 - 2 * V * D - (2 * L + 1) * D  # minus embed/unembed, norms
    expected = 2 * (kernels + D * V) + 4 * T * config.n_heads * config.head_dim * L
    assert abs(p.flops_per_token / expected - 1) < 1e-6


def test_largest_batch_fits_and_the_next_does_not(tiny_checkpoint):
    _, directory = tiny_checkpoint("llama")
    config = load_config(str(directory))
    mesh = jaxlens.make_mesh(1, 1, devices=jax.devices()[:1])
    kw = dict(probe="neurons", dtype="float32", seq_len=32, n_groups=2, capture=())
    first = PL.plan(config, mesh, batch=2, **kw)
    budget = first.per_device["total"] + 5 * (PL.plan(config, mesh, batch=3, **kw).per_device["total"] - first.per_device["total"])
    best = PL.largest_batch(config, mesh, budget, first=first, **kw)
    assert best >= 2 and PL.plan(config, mesh, batch=best, **kw).fits(budget)
    assert not PL.plan(config, mesh, batch=best + 2, **kw).fits(budget)


def test_plan_command_on_a_simulated_mesh(tiny_checkpoint, tmp_path, capsys):
    """8 simulated devices in a re-executed child: params split ~8 ways, k/v heads that do not
    divide model=4 reported, a too-small device refused (exit 1)."""
    _, directory = tiny_checkpoint("llama")
    out = tmp_path / "plan.json"
    code = cli.main(["plan", "--model", str(directory), "--mesh", "fsdp=2,model=4", "--batch", "4x16", "--probe", "lens",
                     "--dtype", "float32", "--device-memory", "1GB", "--no-search", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["fits"] and result["mesh"] == {"data": 1, "fsdp": 2, "model": 4}
    per_device = result["per_device_bytes"]["params"]
    assert result["params_bytes"] / 8 <= per_device < result["params_bytes"] / 4  # k/v only split 2 ways
    assert any("attn/k/kernel" in w and "model=4" in w for w in result["warnings"])
    code = cli.main(["plan", "--model", str(directory), "--mesh", "fsdp=2", "--batch", "4x16", "--device-memory", "10kB",
                     "--no-search"])
    assert code == 2  # not a size it understands: refused before compiling


def test_tuned_lens_probe_splits_the_translators(tiny_checkpoint, tmp_path):
    """One training step of the tuned lens on 8 simulated devices (fsdp=2, model=4): A and its
    momentum take 1/(fsdp x model) of a device each (b [L, D] replicated); before, both whole."""
    _, directory = tiny_checkpoint("llama")
    config = load_config(str(directory))
    out = tmp_path / "plan.json"
    code = cli.main(["plan", "--model", str(directory), "--mesh", "fsdp=2,model=4", "--batch", "4x16", "--probe",
                     "tuned-lens", "--dtype", "float32", "--device-memory", "1GB", "--no-search", "--json", str(out)])
    assert code == 0
    d = json.loads(out.read_text())["per_device_bytes"]
    L, D = config.n_layers, config.d_model
    assert d["translators"] == 4 * L * D * D // 8 + 4 * L * D, d
    assert d["optimizer"] == d["translators"] + 4  # the momentum, and the schedule's int32 step count
    assert d["inputs"] >= d["translators"] + d["optimizer"]
    assert PL.flops_per_token(config, 16, "tuned-lens") > PL.flops_per_token(config, 16, "forward")


def test_options_are_checked():
    assert parse_mesh("data=2,fsdp=8,model=4") == {"data": 2, "fsdp": 8, "model": 4}
    assert parse_mesh("fsdp=16") == {"fsdp": 16}
    assert parse_batch("16x2048") == (16, 2048)
    assert PL.parse_memory("16GB") == 16 * 10**9 and PL.parse_memory("v5e") == 16 * 2**30
    assert PL.parse_memory("h200") == 141 * 2**30 and PL.parse_memory("512MiB") == 512 * 2**20
    for bad in ("tensor=2", "data=0", "data=x"):
        with pytest.raises(ValueError, match="--mesh"):
            parse_mesh(bad)
    with pytest.raises(ValueError, match="--batch"):
        parse_batch("16")
    with pytest.raises(ValueError, match="--device-memory"):
        PL.parse_memory("lots")
    with pytest.raises(ValueError, match="--model"):
        load_config("no-such-model")


def test_lens_keeps_only_the_read_positions():
    """The fused lens reduces each layer to the read position (the Take reducer): its program's
    temporaries stay far below the [L, B, T, D] residuals a capture would hold."""
    from jaxlens.core.config import ModelConfig

    config = ModelConfig(family="test", vocab_size=128, d_model=64, n_layers=32, n_heads=4, n_kv_heads=2, head_dim=16,
                         d_ff=96, max_positions=512, attn_block=32)
    mesh = jaxlens.make_mesh(1, 1, devices=jax.devices()[:1])
    B, T = 4, 256
    p = PL.plan(config, mesh, probe="lens", dtype="float32", batch=B, seq_len=T)
    full_capture = config.n_layers * B * T * config.d_model * 4
    assert p.per_device["temps"] < full_capture / 2, (p.per_device, full_capture)


@pytest.mark.parametrize("probe", ["steer", "transplant"])
def test_sweep_probes_compile_the_real_step(probe):
    """The steer / transplant probes lower `run_stack` with the methods' own stacks: more points
    add 8 bytes of inputs each (their layer and alpha, or their pair; vectors and sources are shared)."""
    from jaxlens.core.config import ModelConfig

    config = ModelConfig(family="test", vocab_size=128, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                         d_ff=96, max_positions=512)
    mesh = jaxlens.make_mesh(1, 1, devices=jax.devices()[:1])
    B, T = 4, 64
    small, big = (PL.plan(config, mesh, probe=probe, dtype="float32", batch=B, seq_len=T, points=g) for g in (8, 40))
    per_point = (big.per_device["inputs"] - small.per_device["inputs"]) / 32
    assert per_point == 8, (small.per_device, big.per_device)  # int32 + float32, or two int32 (was 4 KiB, 1 KiB)
    assert big.flops_per_token > small.flops_per_token
    with pytest.raises(ValueError, match="points"):
        PL.plan(config, mesh, probe=probe, dtype="float32", batch=B, seq_len=T, points=0)
