"""Model families as data: HF config -> `ModelConfig`, and HF tensor name -> params path + transform.

A family is one `Family` value registered here. The decoder families in this package share
`decoder_tensors` and `base_config`; what differs is a handful of switches. To add a family, write
one module that builds a `Family` and add it to `_MODULES` below (see docs/families.md).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import numpy as np

from jaxlens.core.config import ConfigError, ModelConfig

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One checkpoint tensor (per layer when `hf` contains '{i}') and where it lands in params."""

    hf: str
    path: tuple[str, ...]
    transform: Transform
    # For fused params (gate_up [D, 2, F]): (axis, index) of the per-layer param this tensor fills.
    slot: tuple[int, int] | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    config: Callable[[dict], ModelConfig]  # HF config.json dict -> ModelConfig
    tensors: Callable[[ModelConfig], list[TensorRule]]
    # Checkpoint tensors that are allowed but not used (regexes), e.g. rotary buffers.
    ignored: tuple[str, ...] = (r".*rotary_emb\.inv_freq",)
    # The causal-LM wrapper's prefix of the table's names ("transformer."): checkpoints saved from
    # the bare base model (the hub's GPT-2 and BLOOM files) lack it, and get it added back.
    prefix: str = ""


_MODULES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2", "gpt_neox", "bloom", "olmo2", "phi3",
)


def families() -> list[Family]:
    return [importlib.import_module(f"{__name__}.{module}").FAMILY for module in _MODULES]


def _registry() -> dict[str, Family]:
    return {model_type: family for family in families() for model_type in family.model_types}


def supported_model_types() -> list[str]:
    return sorted(_registry())


def family_for(hf_config: dict) -> Family:
    model_type = hf_config.get("model_type")
    if model_type is None:
        raise ConfigError("config.json has no 'model_type'; it is required to pick the model family")
    registry = _registry()
    if model_type not in registry:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(registry))}"
        )
    return registry[model_type]


def config_from_hf(hf_config: dict) -> ModelConfig:
    return family_for(hf_config).config(hf_config)
