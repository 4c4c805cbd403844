"""runtime.checkpoints: an orbax save of an array tree restores bit for bit, into the target's
dtypes and shardings (one device here; a mesh of 8 devices in a subprocess). Several processes:
tests/test_multihost.py (the tuned lens and trained layers saved by process 0, restored by all)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import run_on_8_devices


def tree():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    return {"A": jnp.asarray(rng.standard_normal((4, 8, 8)), jnp.float32),
            "nested": {"b": jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16),
                       "count": jnp.asarray(rng.integers(0, 1000, (8,)), jnp.int32)}}


def save(out, t):
    from jaxlens.report.io import output_dir
    from jaxlens.runtime.checkpoints import save_tree

    with output_dir(out) as tmp:
        save_tree(tmp / "tree", t)
    return out / "tree"


def check_restored(restored, t, target):
    import jax

    for (path, got), want, spec in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(t),
                                       jax.tree.leaves(target)):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.sharding == spec.sharding, (path, got.sharding, spec.sharding)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))


def test_save_then_restore_is_exact_in_the_targets_dtypes_and_sharding(tmp_path):
    import jax

    from jaxlens.runtime.checkpoints import restore_tree

    t = tree()
    directory = save(tmp_path / "out", t)
    assert not (tmp_path / "out.partial").exists()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), t)
    check_restored(restore_tree(directory, target), t, target)


def test_restore_of_a_missing_checkpoint_names_it_and_the_rule(tmp_path):
    import jax

    from jaxlens.runtime.checkpoints import restore_tree

    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere.*same path on every host"):
        restore_tree(tmp_path / "nowhere", {"A": jax.ShapeDtypeStruct((2,), np.float32)})


def test_restore_into_other_shardings_on_a_mesh_of_8(tmp_path):
    """Saved sharded one way on 8 devices, restored into another: each leaf lands in the target's sharding."""
    assert "restored" in run_on_8_devices("test_checkpoints.py", tmp_path / "out", timeout=180)


def _on_8_devices(out):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxlens.core.sharding import make_mesh
    from jaxlens.runtime.checkpoints import restore_tree

    mesh = make_mesh(data=2, model=4)
    assert mesh.devices.size == 8
    saved_as = {"A": P(None, "model"), "nested": {"b": P("data", "model"), "count": P("model")}}
    restore_as = {"A": P("data", None, "model"), "nested": {"b": P(), "count": P("data")}}
    t = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree(), saved_as)
    directory = save(out, t)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
                          t, restore_as)
    check_restored(restore_tree(directory, target), t, target)
    print("restored")


if __name__ == "__main__":
    from pathlib import Path

    _on_8_devices(Path(sys.argv[1]))
