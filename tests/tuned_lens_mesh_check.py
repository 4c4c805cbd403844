"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_tuned_lens.py).

Tuned lens on a (data=2, fsdp=2, model=2) mesh: the translators and their momentum are split as
the rule tuned_lens/A says (A [L, D_out over model, D_in over fsdp], b replicated) and stay split
step after step (one compile); `fit` gives one device's losses and translators (1e-5 relative),
as does `fit_shortcut`; save + `load` restore them split; the fused lens reads through them as
one device does.
"""

import sys
from pathlib import Path

import jax
import numpy as np

import jaxlens
from mesh_compare import assert_outputs_equal, rel
from jaxlens.kernels.lens import lens_from_tokens
from jaxlens.methods import tuned_lens as tl

directory, out = sys.argv[1], Path(sys.argv[2])
assert jax.device_count() == 8, jax.devices()

mesh = jaxlens.make_mesh(data=2, fsdp=2, model=2)
single = jaxlens.load(directory, mesh=jaxlens.make_mesh(1, 1, devices=jax.devices()[:1]))
split = jaxlens.load(directory, mesh=mesh)
for m in (single, split):  # peaked read-outs, so the layers disagree (as test_tuned_lens's fixture)
    m.params = {**m.params, "unembed": m.params["unembed"] * 30}
cfg = single.config
L, D = cfg.n_layers, cfg.d_model
blocks = np.random.default_rng(0).integers(0, 128, size=(3, 4, 16)).astype(np.int32)  # 4 rows: data x fsdp




def assert_split(tr):
    A, b = tr["A"], tr["b"]
    assert A.sharding.mesh == mesh and tuple(A.sharding.spec) == (None, "model", "fsdp"), A.sharding
    assert {s.data.shape for s in A.addressable_shards} == {(L, D // 2, D // 2)}
    assert tuple(b.sharding.spec) in ((), (None, None)) and b.addressable_shards[0].data.shape == (L, D), b.sharding


# 1. The step keeps the translators and the momentum split, and compiles once.
opt = tl.optimizer(4)
tr = tl.init_translators(cfg, mesh)
assert_split(tr)
state = jax.jit(opt.init, out_shardings=tl.opt_shardings(opt, tr, mesh))(tr)
tokens = jax.device_put(blocks[0], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
for _ in range(3):
    tr, state, value, _ = tl._step(split.params, tr, state, tokens, np.ones_like(blocks[0]), config=cfg, opt=opt, mesh=mesh)
    assert_split(tr)
    momentum = [a for a in jax.tree.leaves(state) if a.shape == (L, D, D)]
    assert len(momentum) == 1 and tuple(momentum[0].sharding.spec) == (None, "model", "fsdp"), jax.tree.leaves(state)
    assert {s.data.shape for s in momentum[0].addressable_shards} == {(L, D // 2, D // 2)}
assert tl._step._cache_size() == 1, tl._step._cache_size()
print("step keeps translators and momentum split")

# 2. fit: one device's losses and translators.
kw = dict(config=cfg, steps=5, lr=0.03, progress=False)
ref, ref_log = tl.fit(single.params, blocks, **kw)
got, log = tl.fit(split.params, blocks, **kw)
assert_split(got)
diff = max(rel(log["loss"], ref_log["loss"]), rel(got["A"], ref["A"]), rel(got["b"], ref["b"]))
print(f"fit max diff 1 vs data=2,fsdp=2,model=2: {diff:.3g}")
assert diff < 1e-5, diff

# Given translators (host arrays here) are placed split, and training continues from them.
more, _ = tl.fit(split.params, blocks, **{**kw, "steps": 1}, translators={k: np.asarray(v) for k, v in got.items()})
assert_split(more)

# 3. fit_shortcut: on the mesh, split, one device's numbers.
short_ref = tl.fit_shortcut(single.params, blocks, config=cfg)
short = tl.fit_shortcut(split.params, blocks, config=cfg)
assert_split(short)
diff = max(rel(short["A"], short_ref["A"]), rel(short["b"], short_ref["b"]))
print(f"fit_shortcut max diff: {diff:.3g}")
assert diff < 1e-4, diff

# 4. save in one process from split arrays; load restores split (and whole on one device).
tl.save(out / "tr", got, model_name="tiny", config=cfg)
back = tl.load(out / "tr", cfg, mesh=mesh)
assert_split(back)
whole = tl.load(out / "tr", cfg)
for name in ("A", "b"):
    np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(got[name]))
    np.testing.assert_array_equal(np.asarray(whole[name]), np.asarray(got[name]))
print("save/load round trip split")

# 5. The fused lens (forward + translators + lens) and kl_by_layer through split translators.
mask = np.ones((8, 12), np.int32)
mask[::2, :5] = 0
lens_tokens = np.random.default_rng(1).integers(0, 128, size=(8, 12)).astype(np.int32)
lkw = dict(config=cfg, positions="all", k=5, embedding=True, layers=tuple(range(L - 1)), chunk=24)
one = lens_from_tokens(single.params, lens_tokens, mask, translators=ref, **lkw)
many = lens_from_tokens(split.params, lens_tokens, mask, translators=back, **lkw)
assert_outputs_equal(one, many)
kl = rel(tl.kl_by_layer(split.params, blocks, back, config=cfg), tl.kl_by_layer(single.params, blocks, ref, config=cfg))
assert kl < 1e-5, kl
print("lens through split translators equal")

# The steps donate their translators: a caller's (device) translators stay valid after fit.
_ = tl.fit(split.params, blocks, **{**kw, "steps": 1}, translators=back)
assert not back["A"].is_deleted()
np.testing.assert_array_equal(np.asarray(back["A"]), np.asarray(got["A"]))
