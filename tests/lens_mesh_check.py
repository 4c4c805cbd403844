"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_lens_kernel.py).

The fused lens on a (data=4, model=2) mesh, vocabulary split over `model`, gives the numbers of one
device: the kernel on random inputs (untied and tied unembedding) and forward + lens from tokens
on a real checkpoint.
"""

import sys

import jax
import numpy as np

import jaxlens
from jaxlens.kernels.lens import lens_from_tokens, logit_lens
from test_lens_kernel import make_case

assert jax.device_count() == 8, jax.devices()
mesh = jaxlens.make_mesh(data=4, model=2)
diffs = []


def compare(a, b):
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.dtype.kind in "iu" or x.dtype == bool:
            assert (x == y).all(), name
        else:
            diffs.append(float(np.abs(x - y).max()))


for tied in (True, False):
    config, params, resid, tr = make_case(5, L=3, B=8, P=3, V=302, tied=tied, translators=True)
    rng = np.random.default_rng(1)
    kw = dict(config=config, k=7, chunk=40, tile_rows=7, targets=rng.integers(0, 302, (8, 3, 2)).astype(np.int32),
              token_sets=rng.random((3, 302)) < 0.2, valid=rng.random((8, 3)) < 0.8, translators=tr)
    one = logit_lens(params, resid, **kw)
    sharded = jax.jit(lambda p, r: logit_lens(p, r, mesh=mesh, **kw))  # traced: the explicit mesh is used
    many = logit_lens(params, resid, mesh=mesh, **kw)
    assert len(many["kl"].sharding.device_set) == 8, many["kl"].sharding
    compare(one, many)
    compare(one, sharded(params, resid))

directory = sys.argv[1]
tokens = np.random.default_rng(0).integers(0, 128, size=(8, 12)).astype(np.int32)
mask = np.ones_like(tokens)
mask[::2, :5] = 0
single = jaxlens.load(directory, mesh=jaxlens.make_mesh(1, 1, devices=jax.devices()[:1]))
split = jaxlens.load(directory, mesh=mesh)
assert split.params["embedding"].sharding.spec[0] == "model"
kw = dict(config=single.config, positions="all", k=5, targets=np.array([1, 2], np.int32), chunk=24)
compare(lens_from_tokens(single.params, tokens, mask, **kw), lens_from_tokens(split.params, tokens, mask, **kw))
print(f"lens max abs diff 1 vs 8 devices: {max(diffs):.3g}")
assert max(diffs) < 1e-5, diffs
