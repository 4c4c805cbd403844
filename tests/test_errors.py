"""Bad input gets an error that names what was wrong (and how to fix it)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import jaxlens
from jaxlens.core.config import ConfigError
from jaxlens.converters import CheckpointError, load_checkpoint
from jaxlens.converters.safetensors_io import SafetensorsFile


@pytest.fixture
def llama_dir(tiny_checkpoint, tmp_path):
    """A private copy of the tiny llama checkpoint, free to break."""
    _, directory = tiny_checkpoint("llama")
    copy = tmp_path / "ckpt"
    shutil.copytree(directory, copy)
    return copy


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def rewrite_tensors(directory, edit):
    from safetensors.numpy import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_unknown_model_type_lists_supported(llama_dir):
    edit_config(llama_dir, model_type="falcon_mamba")
    with pytest.raises(ConfigError, match=r"'falcon_mamba' is not supported; supported: .*gemma3_text.*llama"):
        load_checkpoint(llama_dir)


def test_config_missing_required_field(llama_dir):
    edit_config(llama_dir, hidden_size=None)
    with pytest.raises(ConfigError, match="missing the required field 'hidden_size'"):
        load_checkpoint(llama_dir)


def test_missing_tensor(llama_dir):
    rewrite_tensors(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(llama_dir)


def test_unexpected_tensor(llama_dir):
    rewrite_tensors(llama_dir, lambda t: t.update({"model.layers.0.mystery.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"does not use.*model\.layers\.0\.mystery\.weight"):
        load_checkpoint(llama_dir)


def test_wrong_shape(llama_dir):
    def shrink(t):
        t["model.layers.2.self_attn.k_proj.weight"] = t["model.layers.2.self_attn.k_proj.weight"][:16]

    rewrite_tensors(llama_dir, shrink)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.self_attn\.k_proj\.weight' has shape \(16, 64\)"):
        load_checkpoint(llama_dir)


@pytest.mark.parametrize("keep", [4, 100, 0.5])
def test_truncated_safetensors(llama_dir, keep):
    path = llama_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(llama_dir)


def test_corrupt_safetensors_header(llama_dir):
    path = llama_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12  # garbage where the JSON header starts
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        SafetensorsFile(path)


def test_pickle_needs_opt_in(tiny_checkpoint, tmp_path):
    import torch

    hf_model, source = tiny_checkpoint("llama")
    directory = tmp_path / "bin"
    directory.mkdir()
    shutil.copy(source / "config.json", directory)
    torch.save(hf_model.state_dict(), directory / "pytorch_model.bin")  # the legacy pickle format
    with pytest.raises(CheckpointError, match="pickle.*allow_pickle=True"):
        load_checkpoint(directory)
    config, params = load_checkpoint(directory, allow_pickle=True)
    assert config.family == "llama"


def test_unknown_dtype(llama_dir):
    with pytest.raises(ValueError, match=r"unknown dtype 'float8'; choose one of"):
        jaxlens.load(llama_dir, dtype="float8")


def test_empty_and_too_long_prompts(tiny_checkpoint):
    _, directory = tiny_checkpoint("llama")
    model = jaxlens.load(directory)
    with pytest.raises(ValueError, match="empty prompt"):
        model(np.zeros((1, 0), np.int32))
    with pytest.raises(ValueError, match=r"longer than the model's max_positions=64"):
        model(np.zeros((1, 65), np.int32))


def test_unknown_capture_site_lists_valid_ones(tiny_checkpoint):
    _, directory = tiny_checkpoint("llama")
    model = jaxlens.load(directory)
    with pytest.raises(ValueError, match=r"unknown capture site\(s\) \['resid'\]; valid sites are: embed, resid_pre"):
        model(np.zeros((1, 4), np.int32), capture=("resid",))


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere.gguf")


def saved_config(tiny_checkpoint, model_type) -> dict:
    _, directory = tiny_checkpoint(model_type)
    return json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize(
    "model_type, changes, message",
    [
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true .* not supported"),
        ("bloom", {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
        ("phi3", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}},
         "rope scaling 'longrope' is not supported"),
        ("gpt2", {"n_embd": None}, "missing the required field 'n_embd'"),  # GPT-2's own key is named
        ("bloom", {"n_head": None}, "missing the required field 'n_head'"),
    ],
)
def test_family_options_we_cannot_run_are_refused(tiny_checkpoint, model_type, changes, message):
    from jaxlens.converters.families import config_from_hf

    config = saved_config(tiny_checkpoint, model_type)
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        config_from_hf(config)


def test_unknown_switch_value_is_refused():
    from jaxlens.core.config import ModelConfig

    sizes = dict(family="x", vocab_size=8, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4, d_ff=8,
                 max_positions=8)
    with pytest.raises(ConfigError, match=r"norm_placement='middle' is not supported; choose one of \('pre'"):
        ModelConfig(**sizes, norm_placement="middle")
    with pytest.raises(ConfigError, match="rotary_dim=3 must be even"):
        ModelConfig(**sizes, rotary_dim=3)


@pytest.mark.parametrize("model_type, name", [("bloom", "transformer.h.1.self_attention.query_key_value.weight"),
                                              ("phi3", "model.layers.1.self_attn.qkv_proj.weight")])
def test_fused_tensor_of_wrong_shape(tiny_checkpoint, tmp_path, model_type, name):
    _, directory = tiny_checkpoint(model_type)
    shutil.copytree(directory, tmp_path / "ckpt")
    rewrite_tensors(tmp_path / "ckpt", lambda t: t.update({name: np.concatenate([t[name], t[name][:32]])}))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \(\d+, 64\), which does not fit the config"):
        load_checkpoint(tmp_path / "ckpt")


def test_bad_activation_dtype_is_refused_before_anything_is_read(tmp_path):
    """The checkpoint does not exist: the activation_dtype error comes first, naming the choices."""
    with pytest.raises(ValueError, match=r"activation_dtype='bf16'.*float32, params"):
        jaxlens.load(tmp_path / "missing", activation_dtype="bf16")
