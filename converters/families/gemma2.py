"""Gemma 2: Gemma 1 plus four norms per block, alternating sliding/global layers (one rope),
attention-logit and final-logit soft-capping, query_pre_attn_scalar."""

from jaxlens.converters.families import Family
from jaxlens.converters.families.decoder import base_config, decoder_tensors, require


def config(hf):
    n_layers = require(hf, "num_hidden_layers")
    types = hf.get("layer_types")  # absent in v4 configs: even layers (0, 2, ...) slide
    sliding = tuple(t == "sliding_attention" for t in types) if types else tuple(i % 2 == 0 for i in range(n_layers))
    return base_config(
        hf,
        "gemma2",
        norm_plus_one=True,
        norm_placement="sandwich",
        embed_scale=True,
        sliding_window=require(hf, "sliding_window"),
        sliding_layers=sliding,
        query_scale=float(require(hf, "query_pre_attn_scalar")) ** -0.5,
        attn_softcap=_cap(hf.get("attn_logit_softcapping")),
        final_softcap=_cap(hf.get("final_logit_softcapping")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _cap(value):
    return None if value is None else float(value)


FAMILY = Family("gemma2", ("gemma2",), config, decoder_tensors)
