"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_subspace.py).

One Lens training step equals the same step on one device with the batch over a data=8 mesh, and
with the params split too (data=2,fsdp=2,model=2: gradients through model-split weights, where XLA
has been seen to get one wrong, scripts/xla_sharded_grad_repro.py)."""

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
meshes = {"one": jaxlens.make_mesh(1, 1, devices=jax.devices()[:1]), "data=8": jaxlens.make_mesh(data=8),
          "data=2,fsdp=2,model=2": jaxlens.make_mesh(data=2, fsdp=2, model=2)}
for name, mesh in meshes.items():
    model = jaxlens.load(directory, mesh=mesh)
    sub = ss.fit(ss.probe_prompts(model, prompts, batch_rows=8))
    result = st.train(model, sub, prompts, config=cfg, progress=False)
    out[name] = (jax.tree.map(np.asarray, result.trained), result.log)
moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out["one"][0]), jax.tree.leaves(st.split(model.params, (1, 2)))))
assert moved > 1e-4, moved
for name in list(meshes)[1:]:
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out["one"][0]), jax.tree.leaves(out[name][0])))
    print(f"train step: max abs diff 1 device vs {name} {diff:.3g} (params moved by {moved:.3g}); "
          f"loss {out['one'][1]['total']} vs {out[name][1]['total']}")
    assert diff < 1e-5, (name, diff)
print("train step equal on one device and on both meshes")
