"""From scores to masks, and per-layer density allocation.

Keep counts are exact: a tensor (or, for :func:`global_topk`, the union of all tensors) of ``n``
positions at density ``d`` keeps ``floor(d * n + 0.5)`` positions (round half up). Ties in score
are broken by position: the earlier position wins, in flattened (C) order and, across tensors, in
the order of the ``scores`` dict. Densities must lie in ``(0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "erk_densities",
    "global_topk",
    "keep_count",
    "layerwise_topk",
    "threshold",
    "uniform_densities",
]

Shapes = Mapping[str, "Sequence[int] | torch.Tensor"]


def _check_density(d: float, what: str = "density") -> float:
    d = float(d)
    if not 0.0 < d <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {d}")
    return d


def keep_count(density: float, numel: int) -> int:
    """Positions kept out of ``numel`` at ``density``: ``floor(density * numel + 0.5)``."""
    return int(math.floor(_check_density(density) * numel + 0.5))


def _check_scores(scores: Mapping[str, torch.Tensor]) -> None:
    if not scores:
        raise ValueError("scores is empty")
    for name, s in scores.items():
        if not s.is_floating_point():
            raise ValueError(f"scores {name!r} must be floating point, got {s.dtype}")
        if bool(torch.isnan(s).any()):
            raise ValueError(f"scores {name!r} contain NaN")


def _top_flat(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Bool vector marking the ``k`` largest entries, ties to the lower index (linear time)."""
    if k == 0:
        return torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    kth = torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest value
    keep = flat > kth
    keep[torch.nonzero(flat == kth).squeeze(1)[: k - int(keep.sum())]] = True
    return keep


def global_topk(scores: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Keep the highest-scoring ``keep_count(density, total)`` positions over all tensors together."""
    _check_scores(scores)
    flat = torch.cat([s.detach().reshape(-1).to("cpu", torch.float64) for s in scores.values()])
    keep = _top_flat(flat, keep_count(density, flat.numel()))
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start:start + s.numel()].reshape(s.shape).to(s.device)
        start += s.numel()
    return masks


def layerwise_topk(scores: Mapping[str, torch.Tensor], densities: Mapping[str, float] | float
                   ) -> dict[str, torch.Tensor]:
    """Keep the highest-scoring ``keep_count(d_l, numel_l)`` positions of each tensor."""
    _check_scores(scores)
    if not isinstance(densities, Mapping):
        densities = dict.fromkeys(scores, densities)
    missing = set(scores) - set(densities)
    if missing:
        raise ValueError(f"no density for {sorted(missing)}")
    return {n: _top_flat(s.detach().reshape(-1), keep_count(densities[n], s.numel())).reshape(s.shape)
            for n, s in scores.items()}


def threshold(scores: Mapping[str, torch.Tensor], tau: float) -> dict[str, torch.Tensor]:
    """Keep positions whose score is at least ``tau`` (``score >= tau``)."""
    _check_scores(scores)
    return {n: s.detach() >= tau for n, s in scores.items()}


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(int(v) for v in x)


def uniform_densities(shapes: Shapes, density: float) -> dict[str, float]:
    """The same density for every tensor. ``shapes`` maps names to shapes (or tensors)."""
    d = _check_density(density)
    return {n: d for n in shapes}


def erk_densities(shapes: Shapes, density: float, erk_power_scale: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities (Evci et al. 2020, RigL).

    Each tensor gets ``d_l = eps * (sum(shape_l) / prod(shape_l)) ** erk_power_scale``, with ``eps``
    chosen so that ``sum_l d_l * n_l = density * sum_l n_l``. Tensors whose ``d_l`` would exceed 1 are
    made dense and ``eps`` is solved again over the rest, until none exceeds 1; the global parameter
    count is therefore met exactly (before the per-tensor rounding of :func:`keep_count`).
    """
    d = _check_density(density)
    dims = {n: _shape(s) for n, s in shapes.items()}
    if not dims:
        raise ValueError("shapes is empty")
    numel = {n: math.prod(s) for n, s in dims.items()}
    if any(v == 0 for v in numel.values()):
        raise ValueError(f"empty tensors have no density: {[n for n, v in numel.items() if v == 0]}")
    raw = {n: (sum(s) / numel[n]) ** erk_power_scale for n, s in dims.items()}
    target = d * sum(numel.values())
    dense: set[str] = set()
    while True:
        budget = target - sum(numel[n] for n in dense)
        rest = [n for n in dims if n not in dense]
        eps = budget / sum(raw[n] * numel[n] for n in rest)
        over = [n for n in rest if eps * raw[n] > 1.0 + 1e-12]  # tolerance: float error at d = 1
        if not over:
            break
        dense.add(max(over, key=lambda n: raw[n]))
    return {n: 1.0 if n in dense else min(1.0, eps * raw[n]) for n in dims}
