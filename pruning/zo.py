"""Zeroth-order (forward-only) training with seeded perturbations, restricted to a mask.

The estimator is Stein's identity with K Gaussian directions (BAFFLE, Feng et al. 2023; MeZO,
Malladi et al. 2023)::

    forward:  c_k = (L(theta + sigma z_k) - L(theta)) / sigma                 K + 1 forwards
    central:  c_k = (L(theta + sigma z_k) - L(theta - sigma z_k)) / (2 sigma)  2K forwards
    step:     theta <- theta - lr * (1/K) * sum_k c_k z_k

Direction ``z_k`` of a step with seed ``s`` comes from its own ``torch.Generator`` seeded with
:func:`perturbation_seed` ``(s, k)`` (never the global RNG), consumed parameter by parameter in
the order of the ``params`` mapping. A parameter with a mask gets noise on its kept positions only
(``mask.sum()`` draws, in flattened order); one without gets noise everywhere. So a direction is
never stored: it is regenerated one parameter at a time whenever it is needed, and the scalars
``c_k`` with the seed are all a party needs to rebuild the step (:func:`apply_update_`,
:func:`replay_`): a server and a client replaying the same seeds and scalars from the same weights
get bit-identical weights (on CPU with the same torch version: generator streams differ across
devices and may differ across versions). The noise is scaled first and then added (two separately
rounded operations, no fused multiply-add), so the result does not depend on how a kernel splits
the work across threads.

Sparse weights: :func:`sparse_copy` holds the masked Linear / Conv2d weights of a model as their
kept values only (pruning/sparse_training.py). A direction draws a layer's noise for its kept
positions in flattened order, which is exactly the order of the layer's ``values``, so a step on
the sparse copy perturbs and updates the same numbers with the same noise as a step on the dense
masked model (the losses differ only by the kernels' float rounding).

Memory: weights stay in place; a perturbation is added and removed in place (MeZO), the loss is
evaluated under ``torch.no_grad`` (no autograd graph, no stored activations), optionally in
micro-batches of ``chunk`` examples; the only extra tensors are one parameter's noise at a time
and, for masked parameters, their kept positions (int32, computed once per step).
Removing a perturbation restores the weights up to float rounding, which is harmless: the weights
that count are the replayed ones, never the perturbed-and-restored ones.

Pure torch (no Flower); :func:`zo_step_memory` measures a step as
:func:`pruning.accounting.training_step_memory` measures a backprop step.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .accounting import _native_stderr_silenced, _peak_allocation, _storage_bytes
from .sparse_training import sparsify

__all__ = [
    "DIFFERENCES",
    "ZOMemoryReport",
    "apply_update_",
    "batch_loss",
    "clip",
    "directional_derivatives",
    "forwards_per_step",
    "kept_indices",
    "perturb_",
    "perturbation_generator",
    "perturbation_seed",
    "replay_",
    "sparse_copy",
    "zo_step_memory",
]

DIFFERENCES = ("forward", "central")

Params = Mapping[str, torch.Tensor]
Masks = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def perturbation_seed(seed: int, k: int) -> int:
    """The 63-bit generator seed of direction ``k`` of the step with seed ``seed``."""
    digest = hashlib.sha256(f"zo/{int(seed)}/{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def perturbation_generator(seed: int, k: int) -> torch.Generator:
    """A fresh CPU generator for direction ``k`` of the step with seed ``seed``."""
    return torch.Generator().manual_seed(perturbation_seed(seed, k))


def forwards_per_step(num_perturbations: int, difference: str) -> int:
    """Forward passes of one step: ``K + 1`` (forward difference) or ``2K`` (central)."""
    _check_difference(difference)
    return num_perturbations + 1 if difference == "forward" else 2 * num_perturbations


def _check_difference(difference: str) -> None:
    if difference not in DIFFERENCES:
        raise ValueError(f"difference: got {difference!r}; allowed: {', '.join(DIFFERENCES)}")


def kept_indices(masks: Masks | None) -> dict[str, torch.Tensor]:
    """Flat positions kept by each mask (int32 where they fit): where a direction's noise goes, in order."""
    return {name: mask.reshape(-1).nonzero().squeeze(1).to(torch.int32 if mask.numel() < 2**31 else torch.int64)
            for name, mask in (masks or {}).items()}


@torch.no_grad()
def perturb_(params: Params, support: Mapping[str, torch.Tensor], seed: int, k: int, scale: float) -> None:
    """``params += scale * z_k`` in place, one parameter at a time, ``z_k`` regenerated from
    ``(seed, k)``. A parameter in ``support`` (:func:`kept_indices`) gets noise at those flat
    positions only; the others stay exactly as they are."""
    generator = perturbation_generator(seed, k)
    for name, p in params.items():
        where = support.get(name)
        if where is None:
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype).mul_(scale))
        else:
            p.view(-1).index_add_(0, where, torch.randn(where.shape, generator=generator, dtype=p.dtype).mul_(scale))


def sparse_copy(model: nn.Module, masks: Masks) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``model`` whose masked Linear / Conv2d weights are held as their kept values
    (:func:`pruning.sparse_training.sparsify`), and the masks of the parameters that stay dense
    (e.g. masked biases): with these, a ZO step on the copy is a step on ``model`` under ``masks``."""
    modules = dict(model.named_modules())
    layers = {name: mask for name, mask in masks.items() if name.endswith(".weight")
              and isinstance(modules.get(name.removesuffix(".weight")), (nn.Linear, nn.Conv2d))}
    rest = {name: mask for name, mask in masks.items() if name not in layers}
    return sparsify(copy.deepcopy(model), layers), rest


def clip(scalars, bound: float):
    """``scalars`` clipped to ``[-bound, bound]`` (unchanged when ``bound`` is 0); numpy or torch."""
    if not bound:
        return scalars
    return scalars.clip(-bound, bound)


def _update(params: Params, support: Mapping[str, torch.Tensor], seed: int, scalars: Iterable[float],
            lr: float) -> None:
    scalars = [float(c) for c in scalars]
    for k, c in enumerate(scalars):
        perturb_(params, support, seed, k, -lr * c / len(scalars))


def apply_update_(params: Params, masks: Masks | None, seed: int, scalars: Iterable[float], lr: float) -> None:
    """One ZO step from its seed and its K scalars: ``params -= lr / K * sum_k c_k z_k``, in place,
    direction by direction in order ``k = 0..K-1``."""
    _update(params, kept_indices(masks), seed, scalars, lr)


def replay_(params: Params, masks: Masks | None, seeds: Iterable[int], scalars: Iterable[Iterable[float]],
            lr: float | Iterable[float]) -> None:
    """Steps in order: ``seeds[t]`` with the K scalars ``scalars[t]`` (:func:`apply_update_`) and
    step size ``lr`` (one for all, or ``lr[t]`` per step)."""
    support = kept_indices(masks)
    seeds, scalars = list(seeds), list(scalars)
    lrs = [lr] * len(seeds) if isinstance(lr, (int, float)) else list(lr)
    for seed, row, step_lr in zip(seeds, scalars, lrs, strict=True):
        _update(params, support, int(seed), row, step_lr)


@torch.no_grad()
def batch_loss(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, chunk: int = 0) -> float:
    """``loss_fn(model(x), y)`` (a mean over the batch) without a graph; with ``chunk`` > 0 the
    batch runs in micro-batches of ``chunk`` examples and their losses are averaged by size (the
    same value up to float rounding, a fraction of the activation memory)."""
    if chunk <= 0 or chunk >= len(x):
        return float(loss_fn(model(x), y))
    total = 0.0
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        total += float(loss_fn(model(xs), ys)) * len(ys)
    return total / len(y)


def directional_derivatives(model: nn.Module, loss_fn: LossFn, batch: tuple[torch.Tensor, torch.Tensor],
                            masks: Masks | None, seed: int, num_perturbations: int, sigma: float,
                            difference: str = "forward", chunk: int = 0) -> tuple[torch.Tensor, float]:
    """The K scalars ``c_k`` of one step on ``batch`` and the unperturbed loss (for central
    differences the mean of the two sides, as no unperturbed forward is run).

    Forward passes only, in eval mode (BatchNorm statistics and dropout cannot be replayed from
    seeds; MeZO evaluates in eval mode too); every parameter of ``model`` is perturbed, on its
    kept positions when it has a mask. The weights are restored afterwards up to float rounding,
    and the train/eval flags exactly.
    """
    _check_difference(difference)
    if num_perturbations < 1 or not sigma > 0:
        raise ValueError(f"need num_perturbations >= 1 and sigma > 0, got {num_perturbations}, {sigma}")
    x, y = batch
    params = dict(model.named_parameters())
    support = kept_indices(masks)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    scalars = torch.empty(num_perturbations, dtype=torch.float64)
    sides = []
    try:
        base = batch_loss(model, loss_fn, x, y, chunk) if difference == "forward" else None
        for k in range(num_perturbations):
            perturb_(params, support, seed, k, sigma)
            plus = batch_loss(model, loss_fn, x, y, chunk)
            if difference == "forward":
                perturb_(params, support, seed, k, -sigma)
                scalars[k] = (plus - base) / sigma
            else:
                perturb_(params, support, seed, k, -2 * sigma)
                minus = batch_loss(model, loss_fn, x, y, chunk)
                perturb_(params, support, seed, k, sigma)
                scalars[k] = (plus - minus) / (2 * sigma)
                sides.append((plus + minus) / 2)
    finally:
        for m, training in modes.items():
            m.training = training
    return scalars.float(), base if base is not None else sum(sides) / len(sides)


@dataclass(frozen=True)
class ZOMemoryReport:
    """Memory of one ZO step (K perturbed forwards and the update), in bytes, measured as
    :class:`pruning.accounting.MemoryReport`: ``peak = baseline + peak_increase``, ``baseline`` =
    parameters, buffers and the batch. ``grads`` and ``optimizer_state`` are 0: a ZO step keeps
    neither, nor activations for a backward."""

    peak: int
    baseline: int
    peak_increase: int
    weights: int


def zo_step_memory(model: nn.Module, loss_fn: LossFn, batch: tuple[torch.Tensor, torch.Tensor], *,
                   masks: Masks | None = None, num_perturbations: int = 20, sigma: float = 1e-3,
                   difference: str = "forward", chunk: int = 0, lr: float = 1e-3) -> ZOMemoryReport:
    """Measure one CPU ZO step of a copy of ``model`` on ``batch = (x, y)``: the K scalars
    (:func:`directional_derivatives`) and the update they give (:func:`apply_update_`), with the
    torch profiler as :func:`pruning.accounting.training_step_memory` measures a backprop step.
    ``model`` itself is not changed."""
    from torch.profiler import ProfilerActivity, profile

    net = copy.deepcopy(model)
    x, y = batch
    seen: set[int] = set()
    weights = _storage_bytes(list(net.parameters()) + list(net.buffers()), seen)
    baseline = weights + _storage_bytes([x, y], set(seen))
    params = dict(net.named_parameters())
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        scalars, _ = directional_derivatives(net, loss_fn, batch, masks, 0, num_perturbations, sigma, difference,
                                             chunk)
        apply_update_(params, masks, 0, scalars.tolist(), lr)
    increase = _peak_allocation(prof.profiler.kineto_results.events())
    return ZOMemoryReport(baseline + increase, baseline, increase, weights)
