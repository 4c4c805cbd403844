"""Logit lens, plain version: residuals at chosen positions -> final norm -> unembedding -> top-k.

The residuals come in already gathered at the positions asked for ([L, B, P, D], usually P=1),
so the [L, B, P, V] logits stay small. The fused, vocabulary-chunked kernel that never
materialises the vocabulary axis is the job of the logit-lens issue.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxlens.config import ModelConfig
from jaxlens.models.transformer import make_norm, softcap


@partial(jax.jit, static_argnames=("config", "k"))
def lens_topk(params, resid, *, config: ModelConfig, k: int = 5):
    """resid [L, B, P, D] (pre-norm block outputs, i.e. `resid_post`) -> (ids, probs) [L, B, P, k].

    Every layer gets the model's own final norm once; the last layer then equals the model's logits.
    """
    normed = make_norm(config).apply({"params": params["final_norm"]}, resid)
    unembed = params["embedding"].T if config.tie_embeddings else params["unembed"]  # [D, V]
    logits = jnp.einsum("lbpd,dv->lbpv", normed, unembed.astype(normed.dtype), preferred_element_type=jnp.float32)
    logits = softcap(logits, config.final_softcap)  # Gemma 2
    probs, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
    return ids, probs
