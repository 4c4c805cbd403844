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
    """The site's value at each row's last real token, every layer: [L, B, D] (left or right padding)."""
    take = Take(site, iv.last_index(mask)[:, None])
    _, sites = forward(params, tokens, mask, config=config, reducers={"last": take})
    return sites["last"][:, :, 0]  # [L, B, 1, D] -> [L, B, D]


def last_token_states(model, texts: Sequence[str], *, site: str = "resid_post", batch_rows: int = 8,
                      progress: bool = False) -> np.ndarray:
    """[L, N, D] for texts (encoded with the tokenizer's special tokens), in fixed-size batches
    (`runtime.batching.text_batches`: bucketed lengths, so few programs compile) over the mesh."""
    from jaxlens.runtime.batching import text_batches
    from jaxlens.runtime.loop import stream
    from jaxlens.runtime.placement import batch_rows as rows_for

    batches = text_batches(model, texts, rows_for(model.mesh, batch_rows))
    step = lambda b, tokens, mask: last_states(model.params, tokens, mask, config=model.config, site=site)  # noqa: E731
    out = [states[:, : b.n_real] for b, states in stream(batches, step, mesh=model.mesh, inputs=lambda b: (b.tokens, b.mask),
                                                          desc="states", progress=progress)]
    return np.concatenate(out, axis=1)
