"""Mistral: Llama with a sliding attention window on every layer (when `sliding_window` is set)."""

from jaxlens.converters.families import Family
from jaxlens.converters.families.decoder import base_config, decoder_tensors


def config(hf):
    window = hf.get("sliding_window")
    return base_config(hf, "mistral", sliding_window=window, sliding_layers=())


FAMILY = Family("mistral", ("mistral",), config, decoder_tensors)
