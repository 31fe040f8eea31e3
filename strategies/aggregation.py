"""Mask-aware weighted averaging that keeps each array's dtype."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def masked_average(arrays: Sequence[Mapping[str, np.ndarray]], coverage: Sequence[Mapping[str, np.ndarray]],
                   weights: Sequence[float], previous: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Average every coordinate over the clients that kept it.

    ``arrays[k]`` holds client k's tensors (a client may send only some names); ``coverage[k]``
    maps a name to the bool mask of coordinates client k kept (a name without a mask counts as
    fully kept). Per coordinate: ``sum_k w_k c_k a_k / sum_k w_k c_k``, accumulated in float64 in
    the given order; a coordinate nobody kept keeps its ``previous`` value. Integer arrays (e.g.
    BatchNorm's ``num_batches_tracked``) are rounded back to their dtype.
    """
    if len(arrays) != len(coverage) or len(arrays) != len(weights):
        raise ValueError(f"masked_average: {len(arrays)} arrays, {len(coverage)} coverages, {len(weights)} weights")
    if any(w <= 0 for w in weights):
        raise ValueError(f"masked_average: weights must be > 0, got {list(weights)}")
    out = {}
    for name, prev in previous.items():
        # the mean of finite values lies within their range, so it fits the dtype (up to rounding
        # at the float32 limit, which the caller checks)
        num = np.zeros(prev.shape, dtype=np.float64)
        den = np.zeros(prev.shape, dtype=np.float64)
        for client, cover, w in zip(arrays, coverage, weights):
            if name not in client:
                continue
            kept = cover.get(name)
            # float64 before the product: a float32 array times a Python float stays float32
            # (NEP 50) and can overflow to inf although every value is finite
            values = client[name].astype(np.float64)
            if kept is None:
                num += float(w) * values
                den += float(w)
            else:
                num += float(w) * np.where(kept, values, 0.0)
                den += float(w) * kept
        avg = np.where(den > 0, num / np.where(den > 0, den, 1.0), prev)
        if np.issubdtype(prev.dtype, np.integer):
            # int64's maximum is no float64 (2**63 - 1 rounds up to 2**63, which the cast would wrap
            # to -2**63): clip to the largest float64 inside the dtype's range first
            info = np.iinfo(prev.dtype)
            hi = np.nextafter(np.float64(info.max), 0) if int(np.float64(info.max)) > info.max else info.max
            avg = np.clip(np.rint(avg), info.min, hi)
        # np.asarray: np.rint of a 0-d array (num_batches_tracked) is a numpy scalar, not an array
        out[name] = np.asarray(avg.astype(prev.dtype) if np.issubdtype(prev.dtype, np.floating)
                               else np.rint(avg).astype(prev.dtype))
    return out
