"""Training whose state is sparse: a masked Linear or Conv2d layer holds only its kept weights.

:func:`sparsify` replaces, in place, every ``nn.Linear`` and ``nn.Conv2d`` whose ``weight`` has a
mask by a :class:`SparseLinear` / :class:`SparseConv2d` that holds ``values`` (a parameter: the kept
weights in row-major order) and their positions (int32 buffers). The gradients and the optimizer
state (momentum, Adam moments) of such a layer are therefore as large as its kept weights, and a
pruned weight cannot move: training it is masked training without the dense tensors.

* ``SparseLinear`` keeps the weight as a CSR matrix and multiplies with sparse kernels
  (``torch.sparse``): forward ``W x``, input gradient ``g W``, weight gradient only at the kept
  positions (``torch.sparse.sampled_addmm``); no dense weight exists at any time.
* ``SparseConv2d`` builds its dense weight from the values for the convolution and again in the
  backward (dense kernels, one layer at a time, freed after use); the dense weight gradient is a
  temporary of that layer's backward.

Top-K gradients at pruned positions (FedTiny's growth signal): set ``layer.topk = n`` before a
backward; that backward also stores in ``layer.topk_result`` the ``n`` largest-``|g|`` entries of
the gradient at the layer's pruned positions (:func:`pruning.prune_grow.topk_at_pruned`), computed
in chunks of rows (Linear) so that only ``O(n + chunk)`` gradient values are held.

:func:`dense_state_dict` gives the model's state dict with dense weights again (for the wire).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .prune_grow import topk_at_pruned

__all__ = ["SparseConv2d", "SparseLinear", "dense_state_dict", "sparse_layers", "sparsify"]

CHUNK = 1 << 16
"""Gradient values computed at a time (at least one row) when collecting top-K gradients."""


def _flat_kept(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().squeeze(1)


def _collect(layer, chunks) -> None:
    if layer.topk is not None:
        layer.topk_result = topk_at_pruned(chunks, layer.kept_index(), layer.topk)


class _SparseMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, layer):
        ctx.save_for_backward(x, values)
        ctx.layer = layer
        return (layer.csr(values) @ x.T).T

    @staticmethod
    def backward(ctx, gy):
        x, values = ctx.saved_tensors
        layer = ctx.layer
        w = layer.csr(values)
        gx = gy @ w if ctx.needs_input_grad[0] else None
        gv = torch.sparse.sampled_addmm(w, gy.T.contiguous(), x, beta=0.0).values()
        rows = max(1, CHUNK // x.shape[1])
        _collect(layer, ((r * x.shape[1], gy[:, r:r + rows].T @ x) for r in range(0, gy.shape[1], rows)))
        return gx, gv, None


class _SparseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, layer):
        ctx.save_for_backward(x, values)
        ctx.layer = layer
        return F.conv2d(x, layer.dense(values), None, *layer.conv_args)

    @staticmethod
    def backward(ctx, gy):
        x, values = ctx.saved_tensors
        layer = ctx.layer
        gx = (torch.nn.grad.conv2d_input(x.shape, layer.dense(values), gy, *layer.conv_args)
              if ctx.needs_input_grad[0] else None)
        gw = torch.nn.grad.conv2d_weight(x, layer.shape, gy, *layer.conv_args).reshape(-1)
        _collect(layer, [(0, gw)])
        return gx, gw[layer.index.long()], None


class SparseLinear(nn.Module):
    """An ``nn.Linear`` that holds its kept weights only (CSR: ``values``, ``crow``, ``col``)."""

    def __init__(self, linear: nn.Linear, mask: torch.Tensor) -> None:
        super().__init__()
        self.shape = tuple(linear.weight.shape)
        kept = _flat_kept(mask)
        self.values = nn.Parameter(linear.weight.detach().reshape(-1)[kept].clone())
        rows = kept // self.shape[1]
        crow = torch.zeros(self.shape[0] + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=self.shape[0]), 0)
        self.register_buffer("crow", crow.to(torch.int32))
        self.register_buffer("col", (kept % self.shape[1]).to(torch.int32))
        self.bias = linear.bias
        self.topk: int | None = None
        self.topk_result: tuple[torch.Tensor, torch.Tensor] | None = None

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # "CSR support is in beta": tests/test_pruning_fedtiny.py checks it
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)

    def kept_index(self) -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(self.shape[0]), torch.diff(self.crow.long()))
        return rows * self.shape[1] + self.col.long()

    def dense_weight(self) -> torch.Tensor:
        return torch.zeros(self.shape).reshape(-1).index_copy(0, self.kept_index(), self.values.detach()
                                                             ).reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = _SparseMM.apply(x.reshape(-1, self.shape[1]), self.values, self)
        y = y.reshape(*lead, self.shape[0])
        return y if self.bias is None else y + self.bias


class SparseConv2d(nn.Module):
    """An ``nn.Conv2d`` (zero padding) that holds its kept weights only (``values``, ``index``)."""

    def __init__(self, conv: nn.Conv2d, mask: torch.Tensor) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"SparseConv2d: padding {conv.padding!r} / mode {conv.padding_mode!r}; "
                             "allowed: numeric zero padding")
        self.shape = tuple(conv.weight.shape)
        self.conv_args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        kept = _flat_kept(mask)
        self.values = nn.Parameter(conv.weight.detach().reshape(-1)[kept].clone())
        self.register_buffer("index", kept.to(torch.int32))
        self.bias = conv.bias
        self.topk: int | None = None
        self.topk_result: tuple[torch.Tensor, torch.Tensor] | None = None

    def kept_index(self) -> torch.Tensor:
        return self.index.long()

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=values.dtype).reshape(-1).index_copy(
            0, self.index.long(), values).reshape(self.shape)

    def dense_weight(self) -> torch.Tensor:
        return self.dense(self.values.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _SparseConv.apply(x, self.values, self)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


SPARSE_TYPES = (SparseLinear, SparseConv2d)


def sparsify(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Replace, in place, each Linear / Conv2d whose ``<module>.weight`` has a mask by its sparse
    layer (other modules and parameters stay); returns ``model``. Masks may name only such weights."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        path, _, leaf = name.rpartition(".")
        module = modules.get(path)
        if leaf != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"sparsify: {name!r} is not the weight of an nn.Linear or nn.Conv2d")
        if mask.shape != module.weight.shape or mask.dtype != torch.bool:
            raise ValueError(f"sparsify: mask {name!r} must be bool of shape {tuple(module.weight.shape)}")
        sparse = SparseLinear(module, mask) if isinstance(module, nn.Linear) else SparseConv2d(module, mask)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, sparse)
    return model


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(weight name, sparse layer)`` of every sparse layer, e.g. ``("classifier.1.weight", ...)``."""
    for path, module in model.named_modules():
        if isinstance(module, SPARSE_TYPES):
            yield f"{path}.weight", module


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each sparse layer as a dense ``<module>.weight`` (zeros at pruned
    positions) instead of its ``values`` and position buffers."""
    state = model.state_dict()
    for name, layer in sparse_layers(model):
        path = name.removesuffix(".weight")
        for key in ("values", "crow", "col", "index"):
            state.pop(f"{path}.{key}", None)
        state[name] = layer.dense_weight()
    return state
