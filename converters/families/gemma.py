"""Gemma 1: Llama with (1+w) RMSNorm, sqrt(d) embedding scale, GELU (tanh), tied embeddings."""

from jaxlens.converters.families import Family
from jaxlens.converters.families.decoder import base_config, decoder_tensors


def config(hf):
    return base_config(
        hf,
        "gemma",
        norm_plus_one=True,
        embed_scale=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


FAMILY = Family("gemma", ("gemma",), config, decoder_tensors)
