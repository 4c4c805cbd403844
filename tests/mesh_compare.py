"""What the 8-device check scripts compare with: a mesh run's outputs against one device's."""

import numpy as np


def rel(a, b) -> float:
    """Max abs difference of a from b, relative to b's scale (at least 1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def assert_outputs_equal(one: dict, many: dict, tol: float = 1e-5) -> None:
    """Every output of a dict (the lens's): integers (ids, ranks, masks) exact, floats within `tol`."""
    for name in one:
        x, y = np.asarray(one[name]), np.asarray(many[name])
        if x.dtype.kind in "iub":
            assert (x == y).all(), name
        else:
            assert rel(y, x) < tol, (name, rel(y, x))
