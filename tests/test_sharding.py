"""The same program on 8 forced host devices gives the same numbers as on one; orbax round trip."""

from __future__ import annotations


import numpy as np
import pytest
from conftest import run_on_8_devices

import jaxlens
from jaxlens import cli


# Llama and Gemma 3 (sliding layers), Gemma 2 (soft-capping), BLOOM (ALiBi, LayerNorm, fused qkv),
# GPT-NeoX (parallel residual, partial rotary).
# ~20 s each: the three added families run as slow tests (CI runs them).
@pytest.mark.parametrize(
    "model_type",
    ["llama", "gemma3_text", *(pytest.param(m, marks=pytest.mark.slow) for m in ("gemma2", "bloom", "gpt_neox"))],
)
def test_eight_devices_match_one(tiny_checkpoint, model_type):
    _, directory = tiny_checkpoint(model_type)
    run = run_on_8_devices("mesh_check.py", directory, timeout=300)
    assert "max abs diff 1 vs 8 devices" in run
    assert "with interventions" in run


def test_convert_then_restore_equals_direct_load(tiny_checkpoint, tmp_path):
    _, directory = tiny_checkpoint("qwen3")
    out = tmp_path / "converted"
    assert cli.main(["convert", str(directory), str(out)]) == 0
    assert not (tmp_path / "converted.partial").exists()
    direct = jaxlens.load(directory)
    restored = jaxlens.load(out)
    assert restored.config == direct.config
    tokens = np.random.default_rng(3).integers(0, 128, size=(2, 9))
    np.testing.assert_array_equal(np.asarray(restored(tokens)[0]), np.asarray(direct(tokens)[0]))
    # Converting onto an existing directory is refused, not merged.
    assert cli.main(["convert", str(directory), str(out)]) == 2


def test_every_family_config_round_trips_through_json(tiny_checkpoint):
    """What `jaxlens convert` stores restores to the same config, for every family's switches."""
    import json

    from conftest import TINY_CONFIGS

    from jaxlens.core.config import ModelConfig
    from jaxlens.converters.families import config_from_hf

    for model_type in TINY_CONFIGS:
        _, directory = tiny_checkpoint(model_type)
        config = config_from_hf(json.loads((directory / "config.json").read_text()))
        assert ModelConfig.from_json(config.to_json()) == config, model_type
    # Configs stored before norm_placement existed said sandwich_norms.
    legacy = json.loads(config.to_json())
    legacy.pop("norm_placement")
    legacy["sandwich_norms"] = True
    assert ModelConfig.from_json(json.dumps(legacy)).norm_placement == "sandwich"


@pytest.mark.slow  # ~40-80 s: a subprocess with 8 host devices compiling three probes twice (one device, the mesh)
def test_fsdp_mesh_matches_one_device(tiny):
    """data=2 x fsdp=2 x model=2: forward with captures, fused lens, neuron statistics equal one
    device's; weights split over fsdp and model and gathered one layer at a time (fsdp_mesh_check.py)."""
    _, _, directory = tiny
    run = run_on_8_devices("fsdp_mesh_check.py", directory, timeout=600)
    assert "fsdp check ok" in run, run


def test_make_mesh_refuses_bad_axes():
    with pytest.raises(ValueError, match="fsdp=0"):
        jaxlens.make_mesh(data=1, fsdp=0)
    with pytest.raises(ValueError, match="does not use the 1 devices"):
        jaxlens.make_mesh(data=1, fsdp=2, model=1)
    mesh = jaxlens.make_mesh(1, 1)
    assert mesh.axis_names == ("data", "fsdp", "model")
