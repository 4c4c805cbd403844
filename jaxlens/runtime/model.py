"""`Model`: a loaded checkpoint (config, params, tokenizer, mesh) with text-in conveniences.

Everything here is a thin layer over the pure `jaxlens.core.forward.forward`; probes that need full
control call that directly with `model.params` and `model.config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from jax.sharding import Mesh

from jaxlens.core import validate
from jaxlens.core.config import ModelConfig
from jaxlens.core.forward import forward
from jaxlens.core.sharding import default_mesh
from jaxlens.runtime.batching import encode_texts, pad_left
from jaxlens.runtime.placement import put


@dataclasses.dataclass
class Model:
    config: ModelConfig
    params: Any
    tokenizer: Any = None
    mesh: Mesh = dataclasses.field(default_factory=default_mesh)

    def encode(self, texts: Sequence[str], padding_side: str = "left", add_special_tokens: bool = True):
        """Texts -> (tokens [B, T] int32, attention_mask [B, T]) numpy, padded to the longest.
        (The methods batch with `runtime.batching.text_batches`: bucketed lengths, fixed rows.)"""
        texts = validate.texts(texts)
        validate.padding_side(padding_side)
        ids = encode_texts(self.tokenizer, texts, self.config.max_positions, add_special_tokens)
        tokens, mask = pad_left(ids, len(ids), max(map(len, ids)), self.config.pad_token_id or 0)
        if padding_side == "right":  # shift each row's tokens to the start
            for row, seq in enumerate(ids):
                tokens[row] = np.roll(tokens[row], len(seq))
                mask[row] = np.roll(mask[row], len(seq))
        return tokens, mask

    def __call__(self, tokens, attention_mask=None, capture=(), interventions=None, reducers=None):
        """(logits, sites) with the batch placed over the mesh's data axes (see `forward`)."""
        validate.tokens(self.config, tokens)  # values on the host copy; forward sees placed arrays
        tokens = np.asarray(tokens, dtype=np.int32)
        validate.mask(attention_mask, tokens.shape, empty_rows=True)  # filler rows pad fixed-size batches
        attention_mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask, np.int32)
        tokens, attention_mask = put(self.mesh, tokens, attention_mask)
        return forward(
            self.params, tokens, attention_mask, config=self.config, capture=capture,
            interventions=interventions, reducers=reducers,
        )
