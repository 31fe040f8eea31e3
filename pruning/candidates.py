"""A pool of candidate masks around a target density, for FedTiny's adaptive BatchNorm selection
(Huang et al., ICDCS 2023).

Every candidate keeps, in each tensor ``l``, the ``k_l`` highest-scoring positions (FedTiny scores
by ``|w|`` of the server's warmed-up model), at its own noisy density ``d_l = d * (1 + u_l)``,
``u_l ~ U(-noise, noise)`` (the authors' "noise-uniform-magnitude", ``noise = 0.5``). The
densities are drawn again until the realized global density ``sum_l k_l / sum_l n_l`` lies within
``tolerance`` (relative, 2% by default) of ``d``. Every tensor keeps at least one position, so no
candidate disconnects a layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .selection import layerwise_topk

__all__ = ["candidate_masks", "noisy_keep_counts"]

MAX_DRAWS = 100_000


def noisy_keep_counts(numels: Mapping[str, int], density: float, noise: float, rng: np.random.Generator,
                      tolerance: float = 0.02) -> dict[str, int]:
    """Kept positions per tensor at noisy densities ``d * (1 + U(-noise, noise))``, clipped to
    ``[1, numel]``, redrawn until ``|sum kept / sum numel - d| <= tolerance * d``.

    Raises ``ValueError`` when no draw in :data:`MAX_DRAWS` meets the tolerance (e.g. a target
    below one position per tensor).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    if not numels or any(n < 1 for n in numels.values()):
        raise ValueError(f"numels must name tensors of at least one position, got {dict(numels)}")
    names, sizes = list(numels), np.array([numels[k] for k in numels], dtype=np.int64)
    total = int(sizes.sum())
    for _ in range(MAX_DRAWS):
        d = density * (1.0 + rng.uniform(-noise, noise, size=len(names)))
        kept = np.clip(np.floor(d * sizes + 0.5), 1, sizes).astype(np.int64)
        if abs(int(kept.sum()) / total - density) <= tolerance * density:
            return {n: int(k) for n, k in zip(names, kept)}
    raise ValueError(f"no noisy densities within {tolerance:.0%} of density {density} in {MAX_DRAWS} draws "
                     f"(tensor sizes {sizes.tolist()})")


def candidate_masks(scores: Mapping[str, torch.Tensor], density: float, count: int, rng: np.random.Generator,
                    noise: float = 0.5, tolerance: float = 0.02) -> list[dict[str, torch.Tensor]]:
    """``count`` candidate masks: per tensor the top-``k_l`` of ``scores`` at noisy keep counts
    (:func:`noisy_keep_counts`, one draw per candidate, in order, from ``rng``)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    numels = {k: v.numel() for k, v in scores.items()}
    pool = []
    for _ in range(count):
        kept = noisy_keep_counts(numels, density, noise, rng, tolerance)
        # k / n as a density gives back exactly k positions (selection.keep_count rounds half up)
        pool.append(layerwise_topk(scores, {k: kept[k] / numels[k] for k in scores}))
    return pool

