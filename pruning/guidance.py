"""AutoFLIP's guidance (Internò et al. 2024): from the clients' loss exploration to a hybrid mask.

Each exploring client trains its own copy of a common model: one base epoch (``theta_base``), then
more epochs (``theta_k``), and reports per parameter the squared deviation ``(theta_k -
theta_base) ** 2``. The guidance of a tensor is the example-weighted mean of the clients'
deviations, normalized per tensor (min-max, as the paper; or the robust scaler
``(g - median) / IQR``). One quantile ``q`` over the guidance of all tensors together is the cut:
positions at or below it moved least in exploration and are pruned (``keep = g > tau``).

Hybrid pruning (the 2024-2025 versions of the paper remove "whole units" as well, without saying
how; this rule is ours): every hidden layer loses the ``floor(q_s * n)`` of its ``n`` output units
(filters, neurons) whose weights have the lowest mean guidance, and optionally a few more so that
the units it keeps are a multiple of 8 (CPU kernels are faster at such widths); the positions that
remain are cut by the same global quantile. :mod:`pruning.slim` turns removed units into masks and into a
physically smaller model.

Plain torch and numpy; guidance, like masks (pruning/masks.py), is a dict name -> tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "NORMALIZATIONS",
    "cut",
    "hybrid_masks",
    "mean_deviation",
    "normalize",
    "quantile_threshold",
    "random_like",
    "select_units",
    "shuffled_units",
    "squared_deviation",
]

NORMALIZATIONS = ("minmax", "robust")
Tensors = Mapping[str, torch.Tensor]


def squared_deviation(explored: Tensors, base: Tensors, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``(explored - base) ** 2`` per tensor (computed in float64, returned as float32)."""
    names = list(explored) if names is None else names
    return {k: (explored[k].double() - base[k].double()).square().float() for k in names}


def mean_deviation(deviations: Sequence[Tensors], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The ``weights``-weighted mean of the clients' deviations, per tensor, in float64."""
    if not deviations or len(deviations) != len(weights):
        raise ValueError(f"mean_deviation: {len(deviations)} deviations, {len(weights)} weights")
    if any(w <= 0 for w in weights):
        raise ValueError(f"mean_deviation: weights must be > 0, got {list(weights)}")
    total = float(sum(weights))
    return {k: sum(d[k].double() * (float(w) / total) for d, w in zip(deviations, weights))
            for k in deviations[0]}


def normalize(guidance: Tensors, method: str = "minmax") -> dict[str, torch.Tensor]:
    """Per tensor: ``minmax`` maps to [0, 1] (a constant tensor, which has nothing to rank, to 0);
    ``robust`` is ``(g - median) / IQR`` with the 25-75 % interquartile range (an IQR of 0 counts
    as 1, as scikit-learn's RobustScaler does)."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalization: got {method!r}; allowed: {', '.join(NORMALIZATIONS)}")
    out = {}
    for name, g in guidance.items():
        g = g.double()
        if method == "minmax":
            lo, spread = g.min(), g.max() - g.min()
            out[name] = (g - lo) / spread if spread > 0 else torch.zeros_like(g)
        else:
            q1, median, q3 = np.quantile(g.reshape(-1).numpy(), (0.25, 0.5, 0.75))
            out[name] = (g - median) / (q3 - q1 if q3 > q1 else 1.0)
    return out


def quantile_threshold(guidance: Tensors, q: float) -> float:
    """The ``q`` quantile of all tensors' values together (linear interpolation, as torch.quantile)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    flat = np.concatenate([g.detach().reshape(-1).double().numpy() for g in guidance.values()])
    return float(np.quantile(flat, q))


def cut(guidance: Tensors, q: float) -> dict[str, torch.Tensor]:
    """The paper's mask: keep the positions whose guidance exceeds the global ``q`` quantile."""
    tau = quantile_threshold(guidance, q)
    return {k: g > tau for k, g in guidance.items()}


def select_units(guidance: Tensors, weights: Sequence[str], q_s: float, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Per named weight tensor (output units along dim 0): a bool vector over its units, False for
    the units of lowest mean guidance (ties: the lower index goes first). Of ``n`` units,
    ``n - floor(q_s * n)`` stay, rounded down to a multiple of ``multiple`` when ``q_s > 0`` and at
    least ``multiple`` stay; at least one unit stays."""
    if not 0.0 <= q_s < 1.0:
        raise ValueError(f"structured quantile must be in [0, 1), got {q_s}")
    keep = {}
    for name in weights:
        means = guidance[name].double().reshape(guidance[name].shape[0], -1).mean(1)
        n = means.numel()
        stay = n - math.floor(q_s * n)
        if q_s > 0 and stay >= multiple:
            stay -= stay % multiple
        drop = min(n - stay, n - 1)
        order = torch.sort(means, stable=True).indices
        k = torch.ones(n, dtype=torch.bool)
        k[order[:drop]] = False
        keep[name] = k
    return keep


def hybrid_masks(guidance: Tensors, q: float, structural: Tensors | None = None) -> dict[str, torch.Tensor]:
    """The global quantile cut of :func:`cut`, and-ed with ``structural`` (the positions that
    removed units leave, per tensor; a tensor without an entry is not restricted)."""
    masks = cut(guidance, q)
    for name, keep in (structural or {}).items():
        masks[name] = masks[name] & keep
    return masks


def shuffled_units(units: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """As many kept units per layer as ``units``, at random positions."""
    out = {}
    for name, keep in units.items():
        order = torch.randperm(keep.numel(), generator=generator)
        k = torch.zeros_like(keep)
        k[order[: int(keep.sum())]] = True
        out[name] = k
    return out


def random_like(masks: Tensors, allowed: Tensors, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per tensor, as many kept positions as ``masks`` holds, drawn at random among the positions
    ``allowed`` keeps (a tensor without an ``allowed`` entry: among all of them)."""
    out = {}
    for name, mask in masks.items():
        pool = allowed.get(name, torch.ones_like(mask)).reshape(-1)
        k = int(mask.sum())
        if k > int(pool.sum()):
            raise ValueError(f"random_like: {name} keeps {k} positions, only {int(pool.sum())} are allowed")
        candidates = torch.nonzero(pool).squeeze(1)
        chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:k]]
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[chosen] = True
        out[name] = flat.reshape(mask.shape)
    return out
