"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_shared_space.py).

Target log-probabilities and teacher-forced phrases on a (data=4, model=2) mesh, vocabulary split
over `model`, give the numbers of one device: the kernel on random inputs (tied and untied), the
fused forward + lens on tokens, and the text-level batch loop on a checkpoint placed on the mesh.
"""

import sys

import jax
import numpy as np

import jaxlens
from jaxlens.kernels.lens import phrase_logprobs, target_logprobs
from jaxlens.methods.answer_language import phrase_logprob
from test_lens_kernel import make_case

assert jax.device_count() == 8, jax.devices()
mesh = jaxlens.make_mesh(data=4, model=2)
diffs = []

for tied in (True, False):
    config, params, resid, _ = make_case(5, L=3, B=8, P=3, V=302, tied=tied)
    targets = np.random.default_rng(1).integers(0, 302, (8, 3, 2)).astype(np.int32)
    one = target_logprobs(params, resid, targets, config=config, chunk=40)
    many = target_logprobs(params, resid, targets, config=config, chunk=40, mesh=mesh)
    assert len(many.sharding.device_set) == 8, many.sharding
    diffs.append(float(np.abs(np.asarray(one) - np.asarray(many)).max()))

directory = sys.argv[1]
single = jaxlens.load(directory, mesh=jaxlens.make_mesh(1, 1, devices=jax.devices()[:1]))
split = jaxlens.load(directory, mesh=mesh)
assert split.params["embedding"].sharding.spec[0] == "model"
rng = np.random.default_rng(0)
tokens = rng.integers(3, 128, size=(8, 12)).astype(np.int32)
mask = np.ones_like(tokens)
mask[::2, :5] = 0
target = np.zeros(tokens.shape, bool)
target[:, -3:] = True
target[1::2, -5:] = True
a = phrase_logprobs(single.params, tokens, mask, target, config=single.config, chunk=24)
b = phrase_logprobs(split.params, tokens, mask, target, config=split.config, chunk=24)
diffs.append(float(np.abs(np.asarray(a) - np.asarray(b)).max()))

prefixes = ["The man turned on the tap.\nAnswer:", "She lost her appetite.\nAnswer:", "He poured.\nAnswer:"]
phrases = [" Water.", " The toilet filled with water.", " Milk."]
x, _ = phrase_logprob(single, prefixes, phrases, batch_rows=2, progress=False)
y, _ = phrase_logprob(split, prefixes, phrases, batch_rows=2, progress=False)  # rows rounded up to 4 (data axis)
# Other batch shapes (rows 2 vs 4, so other padded lengths): sums of float32 log-probs of up to 8
# tokens (|x| up to ~40) agree relatively, not to an absolute 1e-5.
diffs.append(float((np.abs(x - y) / np.maximum(1.0, np.abs(x))).max()))
print(f"phrase max diff 1 vs 8 devices (the text-level one relative): {max(diffs):.3g}")
assert max(diffs) < 1e-5, diffs
