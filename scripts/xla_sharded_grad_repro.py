"""A wrong gradient from XLA's SPMD partitioner, without jaxlens' model code: why
`tuned_lens._layer_kl` pins its translated residual to "rows over the data axes, D whole".

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python scripts/xla_sharded_grad_repro.py

f(A, h, W) = sum((rmsnorm(h + h A^T) W)^2) with A [D, D] split (model, None), h [N, D] rows over
(data, fsdp) and W [D, V] split (fsdp, model): the value is right, the gradient of A is not (relative
error ~1 on jax 0.10.2, CPU, Shardy and GSPMD alike). Constraining x = h + h A^T to rows over the
data axes fixes it. Possibly openxla/xla#40034 (a reshard of unreduced axes that drops an
all-reduce); checked on CPU only. Prints the relative error of the value and gradient per layout.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxlens

mesh = jaxlens.make_mesh(data=2, fsdp=2, model=2)
rng = np.random.default_rng(0)
N, D, V = 64, 64, 128
h = rng.normal(size=(N, D)).astype(np.float32)
W = rng.normal(size=(D, V)).astype(np.float32)
A = (0.1 * rng.normal(size=(D, D))).astype(np.float32)


def f(A, h, W, pin: bool):
    x = h + h @ A.T
    if pin:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(("data", "fsdp"), None)))
    x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
    return jnp.sum((x @ W) ** 2)


def put(a, *spec):
    return jax.device_put(a, NamedSharding(mesh, P(*spec)))


value = jax.jit(f, static_argnames="pin")
grad = jax.jit(jax.grad(f), static_argnames="pin")
reference_value, reference_grad = float(value(A, h, W, pin=False)), np.asarray(grad(A, h, W, pin=False))
for pin in (False, True):
    for w_spec in (("fsdp", "model"), (None, "model"), ()):
        args = (put(A, "model", None), put(h, ("data", "fsdp")), put(W, *w_spec))
        v_err = abs(float(value(*args, pin=pin)) - reference_value) / abs(reference_value)
        g_err = np.abs(np.asarray(grad(*args, pin=pin)) - reference_grad).max() / np.abs(reference_grad).max()
        print(f"pin={pin!s:5} W {str(w_spec):20} value {v_err:.1e}  grad {g_err:.1e}" + ("   <- wrong" if g_err > 1e-3 else ""))
