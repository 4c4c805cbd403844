"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_subspace.py).

One Lens training step with the batch over a data=8 mesh equals the same step on one device."""

import sys

import jax
import numpy as np

import jaxlens
from jaxlens.methods import subspace as ss
from jaxlens.methods import subspace_train as st

directory = sys.argv[1]
assert jax.device_count() == 8, jax.devices()
rng = np.random.default_rng(0)
words = ["man", "home", "rain", "keys", "day", "went", "lost", "she", "it", "all"]
prompts = {lang: [" ".join(rng.choice(words, 2 + i % 4)) + f" {lang}" for i in range(8)] for lang in ("en", "xx", "yy")}
cfg = st.TrainConfig(batch=8, lr=1e-3, layers=(1, 2), warmup=0.0)
out = {}
for name, mesh in (("one", jaxlens.make_mesh(1, 1, devices=jax.devices()[:1])), ("eight", jaxlens.make_mesh(data=8))):
    model = jaxlens.load(directory, mesh=mesh)
    sub = ss.fit(ss.probe_prompts(model, prompts, batch_rows=8))
    result = st.train(model, sub, prompts, config=cfg, progress=False)
    out[name] = (jax.tree.map(np.asarray, result.trained), result.log)
diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out["one"][0]), jax.tree.leaves(out["eight"][0])))
moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out["one"][0]), jax.tree.leaves(st.split(model.params, (1, 2)))))
print(f"train step: max abs diff 1 vs 8 devices {diff:.3g} (params moved by {moved:.3g}); loss {out['one'][1]['total']} vs {out['eight'][1]['total']}")
assert moved > 1e-4, moved
assert diff < 1e-5, diff
print("train step equal on 1 and 8 devices")
