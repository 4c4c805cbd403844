"""Hidden states at each sequence's last token, every layer: the latents that steering vectors,
transplant sources and shared-space similarities are made of. Reduced inside the forward pass
(`reducers.Take`), so [L, B, T, D] is never stored."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxlens.core import interventions as iv
from jaxlens.core.config import ModelConfig
from jaxlens.core.forward import forward
from jaxlens.core.reducers import Take


def last_states(params, tokens, mask, *, config: ModelConfig, site: str = "resid_post") -> jnp.ndarray:
    """The site's value at each row's last real token, every layer: [B, L, D] (left or right padding)."""
    take = Take(site, iv.last_index(mask)[:, None])
    _, sites = forward(params, tokens, mask, config=config, reducers={"last": take})
    return jnp.swapaxes(sites["last"][:, :, 0], 0, 1)  # [L, B, 1, D] -> [B, L, D]


def last_token_states(model, texts: Sequence[str], *, site: str = "resid_post", batch_rows: int = 8) -> np.ndarray:
    """[N, L, D] for texts (encoded with the tokenizer's special tokens), in fixed-size batches with
    left padding to the batch's longest (padding rows: one token), so few programs compile."""
    if not texts:
        raise ValueError("no texts to read states from")
    out = []
    for start in range(0, len(texts), batch_rows):
        chunk = texts[start : start + batch_rows]
        tokens, mask = left_padded(model, chunk, batch_rows)
        out.append(np.asarray(last_states(model.params, tokens, mask, config=model.config, site=site))[: len(chunk)])
    return np.concatenate(out)


def left_padded(model, texts: Sequence[str], rows: int, room: int = 0):
    """(tokens, mask) [rows, T] int32: `model.encode` (left padding), widened on the left to a
    bucketed length T (`evaluation.bucket`; at most max_positions - room, where `room` tokens will
    follow) so batches of different prompt lengths share a few compiled programs, plus one-token
    padding rows up to `rows`."""
    from jaxlens.methods.evaluation import bucket

    tokens, mask = model.encode(list(texts))
    T = max(tokens.shape[1], min(bucket(tokens.shape[1]), model.config.max_positions - room))
    out_tokens, out_mask = np.zeros((rows, T), np.int32), np.zeros((rows, T), np.int32)
    out_tokens[: len(tokens), T - tokens.shape[1] :] = tokens
    out_mask[: len(mask), T - mask.shape[1] :] = mask
    out_mask[len(mask) :, -1] = 1
    return out_tokens, out_mask
