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

if len(sys.argv) > 1:  # the whole collection, through the forward pass, on a checkpoint
    from jaxlens.methods import neurons as N

    class ByteTokenizer:
        def encode(self, text, add_special_tokens=False):
            return [b % 100 + 2 for b in text.encode()]

    directory = sys.argv[1]
    single = jaxlens.load(directory, tokenizer=ByteTokenizer(), mesh=jaxlens.make_mesh(1, 1, devices=jax.devices()[:1]))
    sharded = jaxlens.load(directory, tokenizer=ByteTokenizer(), mesh=mesh)
    corpus = {"fr": N.Corpus(tuple(("", f"le chat {i} dort") for i in range(20))),
              "de": N.Corpus(tuple(("frage", f"die katze {i}") for i in range(20)))}
    batches = N.corpus_batches(single, corpus, seq_len=16, batch_size=8)
    one = N.collect(single, batches, progress=False)
    eight = N.collect(sharded, batches, progress=False)
    for k in ("active", "tokens"):
        np.testing.assert_array_equal(one[k], eight[k], err_msg=k)
    np.testing.assert_allclose(one["sum"], eight["sum"], rtol=1e-4, atol=1e-4)
    assert one["tokens"].sum() > 0 and one["active"].sum() > 0
    print("collect: counts equal on 1 and 8 devices")
