"""Hidden states at each sequence's last token, every layer: the latents that steering vectors,
transplant sources and shared-space similarities are made of. Reduced inside the forward pass
(`reducers.Take`), so [L, B, T, D] is never stored."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxlens import interventions as iv
from jaxlens.config import ModelConfig
from jaxlens.models import forward
from jaxlens.reducers import Take


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
        ids = [model.tokenizer.encode(t, add_special_tokens=True) for t in texts[start : start + batch_rows]]
        T = max(map(len, ids))
        tokens = np.zeros((batch_rows, T), np.int32)
        mask = np.zeros((batch_rows, T), np.int32)
        mask[:, -1] = 1
        for r, seq in enumerate(ids):
            tokens[r, T - len(seq) :], mask[r, T - len(seq) :] = seq, 1
        out.append(np.asarray(last_states(model.params, tokens, mask, config=model.config, site=site))[: len(ids)])
    return np.concatenate(out)
