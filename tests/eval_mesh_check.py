"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_evaluation.py).

Scores the same items with a checkpoint on one device and on a (data=4, model=2) mesh: the option
log-likelihoods and letter probabilities must agree.
"""

import sys

import jax
import numpy as np

import jaxlens
from jaxlens.data.items import Item
from jaxlens.data.templates import XCOPA_TEMPLATE
from jaxlens.methods.scoring import score_items

directory = sys.argv[1]
assert jax.device_count() == 8, jax.devices()
items = [Item(str(n), "en", "The man." + " a" * n, ("Water.", "The toilet.", "Milk."), n % 3, "cause") for n in range(6)]
runs = []
for mesh in (jaxlens.make_mesh(1, 1, devices=jax.devices()[:1]), jaxlens.make_mesh(data=4, model=2)):
    model = jaxlens.load(directory, mesh=mesh)
    runs.append(score_items(items, model.tokenizer, template=XCOPA_TEMPLATE, model=model, batch_rows=8, progress=False))
diff = max(float(np.nanmax(np.abs(runs[0].ll - runs[1].ll))), float(np.nanmax(np.abs(runs[0].letter - runs[1].letter))))
print(f"max abs diff 1 vs 8 devices: {diff:.3g}")
assert diff < 1e-5, diff
