"""Weighted averaging of client arrays that keeps each array's dtype."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def weighted_average(arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Per key, sum_k w_k a_k / sum_k w_k, accumulated in float64 in the given order.

    Integer arrays (e.g. BatchNorm's ``num_batches_tracked``) are rounded back to their dtype.
    """
    if not arrays or len(arrays) != len(weights):
        raise ValueError(f"weighted_average: {len(arrays)} arrays for {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weighted_average: weights must sum to > 0, got {total}")
    out = {}
    for key, first in arrays[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for arr, w in zip(arrays, weights):
            acc += float(w) * arr[key]
        acc /= total
        out[key] = acc.astype(first.dtype) if np.issubdtype(first.dtype, np.floating) else np.rint(acc).astype(first.dtype)
    return out
