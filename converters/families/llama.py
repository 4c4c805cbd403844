"""Llama 2 / 3 / 3.1 / 3.2 (rope scaling 'llama3'), SmolLM2: the plain decoder."""

from jaxlens.converters.families import Family
from jaxlens.converters.families.decoder import base_config, decoder_tensors


def config(hf):
    bias = bool(hf.get("attention_bias", False))
    return base_config(hf, "llama", qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


FAMILY = Family("llama", ("llama",), config, decoder_tensors)
