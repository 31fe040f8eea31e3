"""Saliency scores for pruning and regrowth.

Every function returns ``{name: score tensor}`` with the parameter's shape for the given ``names``
(parameter names as in ``model.named_parameters()``); higher means "keep" (or "grow"). None of them
changes the model: parameters, ``.grad``, buffers and train/eval mode are as they were.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "gradient_scores",
    "magnitude_scores",
    "random_scores",
    "snip_scores",
    "synflow_scores",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
                       batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sum over ``batches`` of d loss / d param, without touching ``.grad`` or BN statistics."""
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
    return grads


def snip_scores(model: nn.Module, loss_fn: LossFn, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                names: Sequence[str]) -> dict[str, torch.Tensor]:
    """SNIP connection sensitivity ``|g * w|`` (Lee et al. 2019).

    ``g`` is the gradient of ``loss_fn(model(x), y)`` summed over all ``batches`` (the gradient of
    their union, as in the single-batch original when given one batch). The model is run in its
    current train/eval mode; BN running statistics are restored afterwards.
    """
    params = _select(model, names)
    grads = _accumulated_grads(model, params, loss_fn, batches)
    return {n: (grads[n] * p.detach()).abs() for n, p in params.items()}


def gradient_scores(model: nn.Module, loss_fn: LossFn, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    names: Sequence[str], masks: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Gradient magnitude ``|g|`` for regrowth (RigL, FedTiny).

    With ``masks``, positions that are currently kept score ``-inf`` so that a top-k over the
    result picks only pruned positions; the dense gradient is computed (no gradient masking).
    """
    params = _select(model, names)
    grads = _accumulated_grads(model, params, loss_fn, batches)
    scores = {n: g.abs() for n, g in grads.items()}
    for n, mask in (masks or {}).items():
        if n in scores:
            if mask.shape != scores[n].shape or mask.dtype != torch.bool:
                raise ValueError(f"mask {n!r} must be bool with shape {tuple(scores[n].shape)}")
            scores[n].masked_fill_(mask.to(scores[n].device), float("-inf"))
    return scores


def synflow_scores(model: nn.Module, input_shape: Sequence[int], names: Sequence[str]
                   ) -> dict[str, torch.Tensor]:
    """SynFlow scores ``|theta * dR/dtheta|`` (Tanaka et al. 2020), one shot, data-free.

    On a float64 copy of ``model`` in eval mode with every parameter and floating buffer replaced by
    its absolute value, ``R = sum(model(ones((1, *input_shape))))``. Float64 keeps deep networks
    from overflowing; the scores are returned in float64. ``model`` itself is not touched.
    """
    _select(model, names)
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point():
                t.abs_()
    params = dict(net.named_parameters())
    chosen = [params[n] for n in names]
    device = chosen[0].device
    r = net(torch.ones((1, *input_shape), dtype=torch.float64, device=device)).sum()
    grads = torch.autograd.grad(r, chosen, allow_unused=True)
    return {n: (p.detach() * (torch.zeros_like(p) if g is None else g)).abs()
            for n, p, g in zip(names, chosen, grads)}
