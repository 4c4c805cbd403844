"""OLMo 2: Llama with its norms after attention and MLP (none before), and RMSNorm on q and k
over the whole projection (all heads at once, before rope)."""

from jaxlens.converters.families import Family
from jaxlens.converters.families.decoder import base_config, decoder_tensors


def config(hf):
    bias = bool(hf.get("attention_bias", False))
    return base_config(
        hf, "olmo2", norm_placement="post", qk_norm=True, qk_norm_all_heads=True, qkv_bias=bias, o_bias=bias
    )


FAMILY = Family("olmo2", ("olmo2",), config, decoder_tensors)
