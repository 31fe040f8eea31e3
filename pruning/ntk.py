"""NTK-SAP saliency (Wang, Li & Sun, ICLR 2023): foresight pruning by the neural tangent kernel,
data-free, and its iterative mask on the exponential schedule.

The score of mask entry ``m_j`` is ``|d/dm_j sum_x ||f(x; theta * m) - f(x; (theta + eps * delta) * m)||^2|``
summed over draws: a finite-difference proxy of the NTK trace. Each draw takes a batch of inputs
(Gaussian noise for the data-free score, NTK-SAP's choice, or real inputs), a fresh
``delta ~ N(0, I)`` on the scored parameters and, with ``resample_weights`` (NTK-SAP's
"multi-sampling"), fresh weights from the model's own initialization, so the score is an
expectation over initializations rather than a property of one. As in the authors' code
(``Pruners/pruners.py`` class ``NTKSAP``): the two outputs are taken in eval mode after BatchNorm
statistics were set by one train-mode forward of the batch (momentum 1), both forwards share those
statistics and the mask, only the scored (maskable) parameters are perturbed, and the gradients
are summed over draws before the absolute value; pruned entries score 0.

Unlike the authors' code nothing here destroys the model's weights (they re-initialize the model
in place and reload the saved initialization afterwards): scoring runs on a copy, and the mask is a
differentiable input of ``torch.func.functional_call``. Where the authors' perturbed copy keeps the
biases of the *first* initialization across draws, here both outputs share the draw's unscored
parameters. Weights are re-drawn under ``torch.random.fork_rng`` from a seed taken from the given
generator, so the caller's global RNG stream is unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .schedules import exponential_densities
from .selection import global_topk

__all__ = ["iterative_masks", "ntk_scores"]

Select = Callable[[dict[str, torch.Tensor], float], dict[str, torch.Tensor]]


def _reinitialize(net: nn.Module, generator: torch.Generator) -> None:
    """Every module's own ``reset_parameters`` (the architecture's initialization), seeded from
    ``generator`` without touching the caller's global RNG."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in net.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()


def _set_norm_statistics(net: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """NTK-SAP's BatchNorm handling: statistics reset, then set from ``x`` by one train-mode forward
    with momentum 1 (a no-op for a model without BatchNorm)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = 1.0
    net.train()
    with torch.no_grad():
        functional_call(net, params, (x,))
    net.eval()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def ntk_scores(model: nn.Module, names: Sequence[str], inputs: Iterable[torch.Tensor],
               masks: Mapping[str, torch.Tensor] | None = None, *, epsilon: float = 0.01,
               generator: torch.Generator | None = None, resample_weights: bool = True) -> dict[str, torch.Tensor]:
    """NTK-SAP scores (float32, the parameters' shapes) of ``names`` over one draw per batch of
    ``inputs``; ``masks`` (bool, default all kept) are the current masks, pruned entries score 0.

    ``generator`` drives the perturbations ``delta`` and, with ``resample_weights``, the weight
    re-draws; ``model`` (weights, buffers, flags, ``.grad``) is left as it was.
    """
    if not names:
        raise ValueError("names is empty: nothing to score")
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    params = dict(net.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"unknown parameter names: {missing}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    masks = masks or {}
    gates = {n: (masks[n] if n in masks else torch.ones_like(params[n], dtype=torch.bool)).to(params[n].dtype)
             .requires_grad_() for n in names}
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    draws = 0
    for x in inputs:
        if resample_weights:
            _reinitialize(net, generator)
        clean = {n: params[n] * gates[n] for n in names}
        _set_norm_statistics(net, {n: c.detach() for n, c in clean.items()}, x)
        noisy = {n: (params[n] + epsilon * torch.randn(params[n].shape, generator=generator,
                                                       dtype=params[n].dtype)) * gates[n] for n in names}
        gap = (functional_call(net, clean, (x,)) - functional_call(net, noisy, (x,))).pow(2).sum()
        for n, g in zip(names, torch.autograd.grad(gap, [gates[n] for n in names])):
            total[n] += g
        draws += 1
    if draws == 0:
        raise ValueError("inputs is empty: NTK-SAP scores need at least one batch")
    return {n: (total[n] * (gates[n].detach() != 0)).abs().float() for n in names}


def iterative_masks(shapes: Mapping[str, Sequence[int]], density: float, iterations: int,
                    score: Callable[[dict[str, torch.Tensor], int], Mapping[str, torch.Tensor]],
                    select: Select | None = None) -> dict[str, torch.Tensor]:
    """Iterative pruning on the exponential schedule: iteration ``j = 1..iterations`` scores the
    current masks (``score(masks, j)``; all kept at first) and keeps ``select(scores, density **
    (j / iterations))`` (default :func:`~pruning.selection.global_topk`), pruned entries handed to
    ``select`` as ``-inf`` so that they never come back. Returns bool masks for ``shapes``."""
    select = select or global_topk
    masks = {n: torch.ones(tuple(s), dtype=torch.bool) for n, s in shapes.items()}
    for j, d in enumerate(exponential_densities(density, iterations), start=1):
        scores = score(masks, j)
        masks = select({n: torch.as_tensor(scores[n]).double().masked_fill(~masks[n], float("-inf"))
                        for n in shapes}, d)
    return masks
