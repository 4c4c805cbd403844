"""Gemma 3 text: (1+w) RMSNorm, four norms per block, q/k norm, sqrt(d) embedding scale,
alternating sliding/global layers with their own rope bases, query_pre_attn_scalar."""

from jaxlens.converters.families import Family
from jaxlens.converters.families.decoder import base_config, decoder_tensors, require, rope_from_hf


def config(hf):
    n_layers = require(hf, "num_hidden_layers")
    types = hf.get("layer_types")
    if types:
        sliding = tuple(t == "sliding_attention" for t in types)
    else:  # v4 configs: every `sliding_window_pattern`-th layer is global
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        sliding = tuple((i + 1) % pattern != 0 for i in range(n_layers))
    params = hf.get("rope_parameters") or {}
    if "sliding_attention" in params:  # v5: one rope dict per layer type
        local = rope_from_hf(params["sliding_attention"], 10000.0)
    else:  # v4: `rope_scaling` applies to global layers only; local layers use the plain base
        local = rope_from_hf(None, hf.get("rope_local_base_freq", 10000.0))
    return base_config(
        hf,
        "gemma3",
        qk_norm=True,
        norm_plus_one=True,
        norm_placement="sandwich",
        embed_scale=True,
        sliding_window=require(hf, "sliding_window"),
        sliding_layers=sliding,
        rope_local=local,
        query_scale=float(require(hf, "query_pre_attn_scalar")) ** -0.5,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


FAMILY = Family("gemma3", ("gemma3_text",), config, decoder_tensors)
