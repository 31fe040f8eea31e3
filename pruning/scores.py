"""Saliency scores for pruning and regrowth.

Every function returns ``{name: tensor}`` with the parameter's shape for the given ``names``
(parameter names as in ``model.named_parameters()``): scores, where higher means "keep" (or
"grow"), except for :func:`loss_gradients` (signed gradients, the ingredient of SNIP on the union
gradient) and :func:`synflow_iterative_masks` (bool masks). None of them changes the model:
parameters, ``.grad``, buffers and train/eval mode are as they were.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .schedules import exponential_densities
from .selection import global_topk

__all__ = [
    "gradient_scores",
    "loss_gradients",
    "magnitude_scores",
    "random_scores",
    "snip_from_gradients",
    "snip_scores",
    "synflow_iterative_masks",
    "synflow_scores",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Select = Callable[[dict[str, torch.Tensor], float], dict[str, torch.Tensor]]


def _select(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"unknown parameter names: {missing}")
    if not names:
        raise ValueError("names is empty: nothing to score")
    return {n: params[n] for n in names}


def magnitude_scores(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``|w|``."""
    return {n: p.detach().abs() for n, p in _select(model, names).items()}


def random_scores(model: nn.Module, names: Sequence[str], generator: torch.Generator
                  ) -> dict[str, torch.Tensor]:
    """Uniform ``[0, 1)`` scores drawn from ``generator`` (CPU), in ``names`` order."""
    return {n: torch.rand(p.shape, generator=generator).to(p.device)
            for n, p in _select(model, names).items()}


def _accumulated_grads(model: nn.Module, params: dict[str, nn.Parameter], loss_fn: LossFn,
                       batches: Batches) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over ``batches`` of d loss / d param and the number of batches, without touching ``.grad``
    or BN statistics."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    try:
        for x, y in batches:
            loss = loss_fn(model(x), y)
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                if g is not None:
                    grads[n] += g
            seen += 1
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
    if seen == 0:
        raise ValueError("batches is empty: gradient scores need at least one (x, y) batch")
    return grads, seen


def loss_gradients(model: nn.Module, loss_fn: LossFn, batches: Batches, names: Sequence[str]
                   ) -> dict[str, torch.Tensor]:
    """Signed mean over ``batches`` of d ``loss_fn(model(x), y)`` / d param, in float32.

    What a client sends for SNIP on the union gradient: the server sums (or averages) these over
    clients *before* taking ``|g * w|`` with :func:`snip_from_gradients`. The model is run in its
    current train/eval mode; BN running statistics are restored afterwards.
    """
    params = _select(model, names)
    grads, seen = _accumulated_grads(model, params, loss_fn, batches)
    return {n: (g / seen).float() for n, g in grads.items()}


def snip_from_gradients(weights: Mapping[str, torch.Tensor], gradients: Mapping[str, torch.Tensor]
                        ) -> dict[str, torch.Tensor]:
    """SNIP connection sensitivity ``|g * w|`` from given gradients, for the names of ``weights``."""
    missing = [n for n in weights if n not in gradients]
    if missing:
        raise ValueError(f"no gradient for {missing}")
    for n, w in weights.items():
        if gradients[n].shape != w.shape:
            raise ValueError(f"gradient {n!r} has shape {tuple(gradients[n].shape)}, weight {tuple(w.shape)}")
    return {n: (gradients[n] * w.detach()).abs() for n, w in weights.items()}


def snip_scores(model: nn.Module, loss_fn: LossFn, batches: Batches, names: Sequence[str]
                ) -> dict[str, torch.Tensor]:
    """SNIP connection sensitivity ``|g * w|`` (Lee et al. 2019).

    ``g`` is the gradient of ``loss_fn(model(x), y)`` summed over all ``batches`` (the gradient of
    their union, as in the single-batch original when given one batch). The model is run in its
    current train/eval mode; BN running statistics are restored afterwards. Across clients, averaging
    these scores differs from scoring the union gradient (:func:`loss_gradients`): gradients of
    opposite sign cancel in the latter only.
    """
    params = _select(model, names)
    grads, _ = _accumulated_grads(model, params, loss_fn, batches)
    return snip_from_gradients(params, grads)


def gradient_scores(model: nn.Module, loss_fn: LossFn, batches: Batches, names: Sequence[str],
                    masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Gradient magnitude ``|g|`` for regrowth (RigL, FedTiny).

    With ``masks``, positions that are currently kept score ``-inf`` so that a top-k over the
    result picks only pruned positions; the dense gradient is computed (no gradient masking).
    """
    params = _select(model, names)
    grads, _ = _accumulated_grads(model, params, loss_fn, batches)
    scores = {n: g.abs() for n, g in grads.items()}
    for n, mask in (masks or {}).items():
        if n in scores:
            if mask.shape != scores[n].shape or mask.dtype != torch.bool:
                raise ValueError(f"mask {n!r} must be bool with shape {tuple(scores[n].shape)}")
            scores[n].masked_fill_(mask.to(scores[n].device), float("-inf"))
    return scores


def _linearized(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` in eval mode, every parameter and floating buffer replaced by its
    absolute value."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point():
                t.abs_()
    return net


def _synaptic_flow(net: nn.Module, chosen: dict[str, nn.Parameter], input_shape: Sequence[int]
                   ) -> dict[str, torch.Tensor]:
    """``|theta * dR/dtheta|`` with ``R = sum(net(ones((1, *input_shape))))`` on a linearized net."""
    device = next(iter(chosen.values())).device
    r = net(torch.ones((1, *input_shape), dtype=torch.float64, device=device)).sum()
    grads = torch.autograd.grad(r, list(chosen.values()), allow_unused=True)
    return {n: (p.detach() * (torch.zeros_like(p) if g is None else g)).abs()
            for (n, p), g in zip(chosen.items(), grads)}


def synflow_scores(model: nn.Module, input_shape: Sequence[int], names: Sequence[str]
                   ) -> dict[str, torch.Tensor]:
    """SynFlow scores ``|theta * dR/dtheta|`` (Tanaka et al. 2020), one shot, data-free.

    On a float64 copy of ``model`` in eval mode with every parameter and floating buffer replaced by
    its absolute value, ``R = sum(model(ones((1, *input_shape))))``. Float64 keeps deep networks
    from overflowing; the scores are returned in float64. ``model`` itself is not touched.
    """
    _select(model, names)
    net = _linearized(model)
    params = dict(net.named_parameters())
    return _synaptic_flow(net, {n: params[n] for n in names}, input_shape)


def synflow_iterative_masks(model: nn.Module, input_shape: Sequence[int], names: Sequence[str],
                            density: float, iterations: int = 100, select: Select | None = None
                            ) -> dict[str, torch.Tensor]:
    """Iterative SynFlow (Tanaka et al. 2020, Algorithm 1): bool masks for ``names`` at ``density``.

    Iteration ``j = 1..iterations`` computes the SynFlow scores of :func:`synflow_scores` with the
    current masks applied (pruned weights are zero, so they score 0) and keeps
    ``select(scores, density ** (j / iterations))`` (:func:`exponential_densities`; default
    :func:`global_topk`, whose last keep count is exact). Pruned positions are handed to ``select``
    as ``-inf``, so a weight once pruned never comes back. Re-scoring after each small step is what
    avoids layer collapse (a layer pruned entirely), which one-shot scoring (``iterations=1``, the
    same as ``select(synflow_scores(...), density)``) suffers at high compression. ``model`` itself
    is not touched.
    """
    select = select or global_topk
    _select(model, names)
    net = _linearized(model)
    params = dict(net.named_parameters())
    chosen = {n: params[n] for n in names}
    dense = {n: p.detach().clone() for n, p in chosen.items()}
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in chosen.items()}
    for d in exponential_densities(density, iterations):
        with torch.no_grad():
            for n, p in chosen.items():
                p.copy_(dense[n] * masks[n])
        scores = _synaptic_flow(net, chosen, input_shape)
        masks = select({n: s.masked_fill(~masks[n], float("-inf")) for n, s in scores.items()}, d)
    return masks
