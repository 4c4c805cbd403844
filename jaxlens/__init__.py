"""jaxlens: probe multilingual LLMs in JAX/Flax.

    import jaxlens
    model = jaxlens.load("path/to/checkpoint_or.gguf")
    tokens, mask = model.encode(["Le chat dort.", "猫在睡觉。"])
    logits, sites = model(tokens, mask, capture=("resid_post",))
"""

from jaxlens.config import ConfigError, ModelConfig
from jaxlens.loading import load
from jaxlens.model import Model
from jaxlens.models import forward
from jaxlens.sharding import make_mesh
from jaxlens.sites import SITES

__all__ = ["ConfigError", "Model", "ModelConfig", "SITES", "forward", "load", "make_mesh"]
