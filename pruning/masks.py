r"""Binary masks over a model's parameters.

A mask set is a plain ``dict`` mapping parameter names (as in ``model.named_parameters()``, which are
also the ``state_dict`` keys) to ``torch.bool`` tensors of the parameter's shape: ``True`` = kept.
Parameters without an entry are dense. Nothing is re-parametrised, so ``state_dict`` keys stay
unchanged (unlike ``torch.nn.utils.prune``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = [
    "apply_masks",
    "check_masks",
    "density",
    "full_masks",
    "layer_density",
    "mask_gradients",
    "mask_optimizer_state",
    "prunable_names",
]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
WEIGHT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def prunable_names(model: nn.Module, *, include_bias: bool = False, include_norm: bool = False,
                   include_first: bool = True, include_last: bool = True) -> list[str]:
    """Names of the parameters a pruning method should mask, in ``named_parameters`` order.

    The candidates are the weights of Conv and Linear layers, their biases when ``include_bias``,
    and the affine parameters of BatchNorm/InstanceNorm/GroupNorm/LayerNorm when ``include_norm``.
    ``include_first`` / ``include_last`` keep or drop the whole first / last Conv or Linear layer
    in module registration order (which is usually, not necessarily, execution order). Any other
    parameter (embeddings, free ``nn.Parameter`` objects) is never returned.
    """
    layers = [(prefix, m) for prefix, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)]
    skip = set()
    if layers and not include_first:
        skip.add(layers[0][0])
    if layers and not include_last:
        skip.add(layers[-1][0])
    chosen = set()
    for prefix, module in model.named_modules():
        if isinstance(module, WEIGHT_TYPES) and prefix not in skip:
            wanted = ("weight", "bias") if include_bias else ("weight",)
        elif isinstance(module, _NORM_TYPES) and include_norm:
            wanted = ("weight", "bias")
        else:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if pname in wanted and p is not None:
                chosen.add(f"{prefix}.{pname}" if prefix else pname)
    return [name for name, _ in model.named_parameters() if name in chosen]


def _params(model_or_params) -> dict[str, torch.Tensor]:
    if isinstance(model_or_params, nn.Module):
        return dict(model_or_params.named_parameters())
    if isinstance(model_or_params, Mapping):
        return dict(model_or_params)
    raise TypeError(f"expected an nn.Module or a dict of tensors, got {type(model_or_params).__name__}")


def check_masks(model_or_params, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless every mask names a known tensor, is bool and has its shape.

    ``model_or_params`` is a module (its parameters) or a dict of tensors such as a state dict.
    """
    params = _params(model_or_params)
    for name, mask in masks.items():
        if name not in params:
            known = list(params)
            more = ", ..." if len(known) > 8 else ""
            raise ValueError(f"mask for unknown parameter {name!r}; known: {known[:8]}{more}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask {name!r} must be a torch.bool tensor, got {kind}")
        if mask.shape != params[name].shape:
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, "
                             f"parameter has {tuple(params[name].shape)}")


def full_masks(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """All-``True`` masks for ``names`` (default: :func:`prunable_names` with its defaults)."""
    params = dict(model.named_parameters())
    names = prunable_names(model) if names is None else names
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"unknown parameter names: {missing}")
    return {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Set the masked-out weights of ``model`` to exactly ``+0`` in place."""
    check_masks(model, masks)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].masked_fill_(~mask.to(params[name].device), 0)


@torch.no_grad()
def mask_gradients(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero ``.grad`` at masked-out positions (call between ``backward()`` and ``step()``)."""
    check_masks(model, masks)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        grad = params[name].grad
        if grad is not None:
            grad.masked_fill_(~mask.to(grad.device), 0)


@torch.no_grad()
def mask_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                         masks: Mapping[str, torch.Tensor]) -> None:
    """Zero per-parameter optimizer state (momentum, Adam moments) at masked-out positions.

    Needed when a mask changes mid-training: otherwise stale momentum moves pruned weights again.
    State tensors whose shape differs from the parameter (e.g. Adam's scalar ``step``) are left alone.
    """
    check_masks(model, masks)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        for value in optimizer.state.get(params[name], {}).values():
            if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                value.masked_fill_(~mask.to(value.device), 0)


def density(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of kept positions over all masks together (1.0 if they hold no positions)."""
    if not masks:
        raise ValueError("density of an empty mask set is undefined")
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return kept / total if total else 1.0


def layer_density(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of kept positions per mask (1.0 for an empty tensor)."""
    return {n: (int(m.sum()) / m.numel() if m.numel() else 1.0) for n, m in masks.items()}
