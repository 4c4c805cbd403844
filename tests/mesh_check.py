"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_sharding.py).

Loads a checkpoint on one device and on a (data=4, model=2) mesh, and checks the sharded run gives
the same logits and residuals, with params and batch really split across devices.
"""

import sys

import jax
import numpy as np

import jaxlens

directory = sys.argv[1]
assert jax.device_count() == 8, jax.devices()
tokens = np.random.default_rng(0).integers(0, 128, size=(8, 12)).astype(np.int32)
mask = np.ones_like(tokens)
mask[::2, :5] = 0  # left padding on half the rows

single = jaxlens.load(directory, mesh=jaxlens.make_mesh(1, 1, devices=jax.devices()[:1]))
mesh = jaxlens.make_mesh(data=4, model=2)
sharded = jaxlens.load(directory, mesh=mesh)

q = sharded.params["layers"]["attn"]["q"]["kernel"]
assert q.sharding.spec[2] == "model" and len(q.sharding.device_set) == 8, q.sharding
ref_logits, ref_sites = single(tokens, mask, capture=("resid_post",))
logits, sites = sharded(tokens, mask, capture=("resid_post",))
assert len(logits.sharding.device_set) == 8
# Relative to each array's scale: the tiny models with larger weights reach |x| ~ 10, where float32
# reductions split across devices (another summation order) differ by ~1e-6 relative.
diff = max(
    float(np.abs(np.asarray(out) - np.asarray(ref)).max() / max(1.0, np.abs(np.asarray(ref)).max()))
    for out, ref in ((logits, ref_logits), (sites["resid_post"], ref_sites["resid_post"]))
)
print(f"max abs diff 1 vs 8 devices (relative to scale): {diff:.3g}")
assert diff < 1e-5, diff

# Interventions, one and a vmapped stack of them, give the same numbers sharded as on one device.
from jaxlens.core import interventions as iv  # noqa: E402

D, F, L = sharded.config.d_model, sharded.config.d_ff, sharded.config.n_layers
rng = np.random.default_rng(1)
steer = [iv.add("resid_post", rng.standard_normal(D), alpha=2.0, layers=layer, positions=iv.last_token(mask)) for layer in range(L)]
knock = iv.ablate("mlp_act", rng.random((L, F)) < 0.2)
ref = np.asarray(single(tokens, mask, interventions=steer[0] | knock)[0])
got = np.asarray(sharded(tokens, mask, interventions=steer[0] | knock)[0])
sweep = lambda m: jax.jit(jax.vmap(lambda one: m(tokens, mask, interventions=one)[0]))(iv.stack(steer))  # noqa: E731
diff_iv = max(float(np.abs(got - ref).max()), float(np.abs(np.asarray(sweep(sharded)) - np.asarray(sweep(single))).max()))
print(f"max abs diff 1 vs 8 devices with interventions: {diff_iv:.3g}")
assert diff_iv < 1e-5, diff_iv
