"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_sharding.py).

On a (data=2, fsdp=2, model=2) mesh: weights split over fsdp and model, the batch over data x
fsdp; the forward with captures, the fused lens and the neuron statistics give one device's
numbers (1e-5 relative to scale; counts exact), and the compiled forward all-gathers each
layer's weights inside the layer loop, one [1, ...] layer slice at a time (never the whole stack).
"""

import re
import sys
import warnings

import jax
import numpy as np

import jaxlens
from mesh_compare import assert_outputs_equal, rel
from jaxlens.core import sharding
from jaxlens.core.forward import _forward
from jaxlens.kernels.lens import lens_from_tokens
from jaxlens.methods import neurons as N

directory = sys.argv[1]
assert jax.device_count() == 8, jax.devices()


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [b % 100 + 2 for b in text.encode()]


mesh = jaxlens.make_mesh(data=2, fsdp=2, model=2)
assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
single = jaxlens.load(directory, tokenizer=ByteTokenizer(), mesh=jaxlens.make_mesh(1, 1, devices=jax.devices()[:1]))
split = jaxlens.load(directory, tokenizer=ByteTokenizer(), mesh=mesh)
q = split.params["layers"]["attn"]["q"]["kernel"]  # [L, D, N, H]
assert tuple(q.sharding.spec) == (None, "fsdp", "model", None), q.sharding.spec
assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2, q.shape[3])

tokens = np.random.default_rng(0).integers(0, 128, size=(8, 12)).astype(np.int32)
mask = np.ones_like(tokens)
mask[::2, :5] = 0  # left padding on half the rows




# 1. The forward with captures.
capture = ("resid_post", "mlp_act", "attn_out")
ref_logits, ref_sites = single(tokens, mask, capture=capture)
logits, sites = split(tokens, mask, capture=capture)
assert logits.sharding.spec[0] == ("data", "fsdp"), logits.sharding.spec
diff = max([rel(logits, ref_logits)] + [rel(sites[n], ref_sites[n]) for n in capture])
print(f"forward max diff 1 vs data=2,fsdp=2,model=2: {diff:.3g}")
assert diff < 1e-5, diff

# The compiled forward gathers per layer: every weight all-gather inside the loop reads one
# [1, ...] slice of the stacked [L, ...] params.
L = split.config.n_layers
text = _forward.lower(split.params, tokens, mask, split.config, (), mesh=mesh).compile().as_text()
gathers = [line for line in text.splitlines() if " all-gather(" in line and "dynamic-slice" in line]
assert gathers and all(re.search(r"= f32\[1,", line) for line in gathers), gathers
assert not any(re.search(rf"= f32\[{L},", line) for line in text.splitlines() if " all-gather(" in line)
print(f"per-layer weight all-gathers in the loop: {len(gathers)}")

# 2. The fused lens (forward + lens in one program).
kw = dict(config=single.config, positions="all", k=5, targets=np.array([1, 2], np.int32), chunk=24)
one, many = lens_from_tokens(single.params, tokens, mask, **kw), lens_from_tokens(split.params, tokens, mask, **kw)
assert_outputs_equal(one, many)
print("lens equal")

# 3. Neuron statistics through the method (forward + reducer + accumulation).
corpus = {"fr": N.Corpus(tuple(("", f"le chat {i} dort") for i in range(20))),
          "de": N.Corpus(tuple(("frage", f"die katze {i}") for i in range(20)))}
batches = N.corpus_batches(single, corpus, seq_len=16, batch_size=8)
a, b = N.collect(single, batches, progress=False), N.collect(split, batches, progress=False)
for k in ("active", "tokens"):
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
for k in ("sum", "m2"):
    assert rel(b[k], a[k]) < 1e-5, (k, rel(b[k], a[k]))
assert a["tokens"].sum() > 0 and a["active"].sum() > 0
print("neuron statistics equal")

# 4. What cannot split is said, not silently replicated.
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert sharding.batch_spec(mesh, 6) == jax.sharding.PartitionSpec()
assert any(issubclass(w.category, sharding.ReplicatedWarning) and "batch of 6" in str(w.message) for w in caught)
wide = jaxlens.make_mesh(data=1, fsdp=1, model=8)
lines = sharding.undivided("layers/attn/k/kernel", (L, 64, 2, 16), wide)
assert lines and "does not divide model=8" in lines[0], lines
print("fsdp check ok")
