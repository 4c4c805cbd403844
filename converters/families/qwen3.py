"""Qwen3: Llama with RMSNorm on q and k per head (before rope), optional attention bias."""

from jaxlens.converters.families import Family
from jaxlens.converters.families.decoder import base_config, decoder_tensors, sliding_layers


def config(hf):
    layers = sliding_layers(hf, hf.get("num_hidden_layers", 0), default=False)
    bias = bool(hf.get("attention_bias", False))
    return base_config(
        hf,
        "qwen3",
        qk_norm=True,
        qkv_bias=bias,
        o_bias=bias,
        sliding_window=hf.get("sliding_window") if any(layers) else None,
        sliding_layers=layers,
    )


FAMILY = Family("qwen3", ("qwen3",), config, decoder_tensors)
