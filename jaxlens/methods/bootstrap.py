"""Bootstrap confidence bands for per-item measurements averaged over items."""

from __future__ import annotations

import numpy as np


def bootstrap_mean(values, n_boot: int = 1000, ci: float = 0.95, seed: int = 0):
    """values [N, ...] (one row per item) -> (mean, lo, hi), each [...].

    Items are resampled with replacement `n_boot` times; the band is the central `ci` percentile
    interval of the resampled means (percentile bootstrap). One item gives a zero-width band.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError("bootstrap_mean needs at least one item (values of shape [N, ...], N >= 1)")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), not {ci}")
    n = values.shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # [n_boot, N]
    means = values[idx].mean(axis=1)  # [n_boot, ...]
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha], axis=0)
    mean = values.mean(axis=0)
    # The percentile interval of a skewed statistic can miss the plain mean by a hair; widen to it.
    return mean, np.minimum(lo, mean), np.maximum(hi, mean)
