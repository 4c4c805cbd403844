"""jaxlens: probe multilingual LLMs in JAX/Flax.

    import jaxlens
    model = jaxlens.load("path/to/checkpoint_or.gguf")
    tokens, mask = model.encode(["Le chat dort.", "猫在睡觉。"])
    logits, sites = model(tokens, mask, capture=("resid_post",))
"""

from jaxlens.core import interventions, reducers
from jaxlens.core.config import ConfigError, ModelConfig
from jaxlens.core.forward import forward
from jaxlens.core.sharding import make_mesh
from jaxlens.core.sites import SITES
from jaxlens.runtime import distributed
from jaxlens.runtime.loading import load
from jaxlens.runtime.model import Model

__all__ = ["ConfigError", "Model", "ModelConfig", "SITES", "distributed", "forward", "interventions", "load", "make_mesh", "reducers"]
