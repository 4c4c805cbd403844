"""Qwen2 / Qwen2.5: Llama with biases on q, k, v; sliding window only where `layer_types` says."""

from jaxlens.converters.families import Family
from jaxlens.converters.families.decoder import base_config, decoder_tensors, sliding_layers


def config(hf):
    n_layers = hf.get("num_hidden_layers", 0)
    use_window = bool(hf.get("use_sliding_window", False))
    layers = sliding_layers(hf, n_layers, default=False)
    if use_window and not hf.get("layer_types"):  # v4 configs: window from max_window_layers on
        first = hf.get("max_window_layers", n_layers)
        layers = tuple(i >= first for i in range(n_layers))
    return base_config(
        hf,
        "qwen2",
        qkv_bias=True,
        sliding_window=hf.get("sliding_window") if any(layers) else None,
        sliding_layers=layers,
    )


FAMILY = Family("qwen2", ("qwen2",), config, decoder_tensors)
