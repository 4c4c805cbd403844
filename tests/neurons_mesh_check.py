"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_neurons.py).

Neuron statistics with the batch over `data` and d_ff over `model` (mesh data=4, model=2) give
exactly the integer counts of one device: first the kernel on sharded arrays, then (given a
checkpoint directory) the whole collection through the forward pass.
"""

import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxlens
from jaxlens.kernels.neurons import batch_stats

assert jax.device_count() == 8, jax.devices()
mesh = jaxlens.make_mesh(data=4, model=2)
rng = np.random.default_rng(0)
B, T, F, K = 8, 12, 32, 3
x = rng.standard_normal((B, T, F)).astype(np.float32)
groups = (rng.integers(0, K, B)[:, None] == np.arange(K)).astype(np.float32)
weights = (rng.random((B, T)) < 0.8).astype(np.int32)
fn = jax.jit(batch_stats, static_argnames="with_max")
one = fn(x, groups, weights, with_max=True)
sharded = jax.device_put((x, groups, weights), (NamedSharding(mesh, P("data", None, "model")),
                                                NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data"))))
assert len(sharded[0].sharding.device_set) == 8
eight = fn(*sharded, with_max=True)
for k in ("active", "tokens", "max"):
    np.testing.assert_array_equal(np.asarray(one[k]), np.asarray(eight[k]), err_msg=k)
print("kernel: counts equal on 1 and 8 devices")
