"""`Model`: a loaded checkpoint (config, params, tokenizer, mesh) with text-in conveniences.

Everything here is a thin layer over the pure `jaxlens.core.forward.forward`; probes that need full
control call that directly with `model.params` and `model.config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxlens.core.config import ModelConfig
from jaxlens.core.forward import forward
from jaxlens.core.sharding import batch_sharding, default_mesh


@dataclasses.dataclass
class Model:
    config: ModelConfig
    params: Any
    tokenizer: Any = None
    mesh: Mesh = dataclasses.field(default_factory=default_mesh)

    def encode(self, texts: Sequence[str], padding_side: str = "left", add_special_tokens: bool = True):
        """Texts -> (tokens [B, T] int32, attention_mask [B, T]) numpy, padded to the longest."""
        if self.tokenizer is None:
            raise ValueError("this model was loaded without a tokenizer; pass tokenizer= to jaxlens.load")
        if isinstance(texts, str):
            texts = [texts]
        ids = [self.tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        for text, seq in zip(texts, ids):
            if not seq:
                raise ValueError(f"empty prompt: {text!r} encodes to no tokens")
            if len(seq) > self.config.max_positions:
                raise ValueError(
                    f"prompt of {len(seq)} tokens is longer than max_positions={self.config.max_positions}; truncate it"
                )
        length = max(len(s) for s in ids)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        tokens = np.full((len(ids), length), pad, dtype=np.int32)
        mask = np.zeros((len(ids), length), dtype=np.int32)
        for row, seq in enumerate(ids):
            span = slice(length - len(seq), length) if padding_side == "left" else slice(0, len(seq))
            tokens[row, span] = seq
            mask[row, span] = 1
        return tokens, mask

    def __call__(self, tokens, attention_mask=None, capture=(), interventions=None, reducers=None):
        """(logits, sites) with the batch placed over the mesh's `data` axis (see `forward`)."""
        tokens = np.asarray(tokens, dtype=np.int32)
        if attention_mask is None:
            attention_mask = np.ones_like(tokens)
        sharding = batch_sharding(self.mesh, tokens.shape[0])
        tokens, attention_mask = jax.device_put((tokens, np.asarray(attention_mask, np.int32)), sharding)
        return forward(
            self.params, tokens, attention_mask, config=self.config, capture=capture,
            interventions=interventions, reducers=reducers,
        )
