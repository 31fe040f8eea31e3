r"""Inference that skips the channels a gated model zeroes, so fewer FLOPs take less time.

Zeroing a channel (what a gated model does in training) saves nothing: the dense convolution still
computes it. Here every sample's active channels are gathered instead. A batch of feature maps is
an :class:`Active`: per sample, the values of its ``k`` active channels (N x k x H x W, contiguous)
and their channel ids (N x k). A gated convolution (:class:`FoldedGatedConv`, BatchNorm folded into
the weights) computes the gates, takes each sample's top-k output channels and gathers, per
sample, the k x k_in slice of the weights that connects its active input channels to them; all
samples then run as ONE grouped convolution (``groups = N``: sample n convolves only with its own
slice). FLOPs scale with ``k_out * k_in`` per sample, and no per-sample Python loop runs. Where
gathering N slices costs more than it saves (small feature maps, wide layers), a batch convolves
over the union of its samples' active channels instead (:meth:`FoldedGatedConv._cheaper`). Channel-wise layers (pooling, ReLU) act on the active channels as they are; any
other layer (a flatten, a linear classifier, a stem convolution) gets the dense tensor, with the
inactive channels scattered back as zeros. A residual block (``skipping_parts``) adds its gated
branch into the dense shortcut with a scatter.

:func:`export` turns a gated model (which lists its layers in execution order in
``skipping_layers()``) into a :class:`SkippingNet`: with ``skip=True`` the path above, with
``skip=False`` the dense reference, the same folded weights and gates computing every channel. Both
give the gated model's eval-mode output (up to float rounding); the export is a snapshot (a
copy) of the weights. FLOPs of either path are counted on the path itself with
:func:`pruning.accounting.count_flops` (grouped convolutions count ``k_out * k_in`` per sample).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .gates import GatedConv2d

__all__ = ["Active", "FoldedGatedConv", "SkippingNet", "export"]

CHANNEL_WISE = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ReLU, nn.Identity)
"""Layers that act on each channel alone, so they run on the active channels only."""


@dataclass(frozen=True)
class Active:
    """A batch of feature maps that holds, per sample, only its active channels.

    ``values``: N x k x H x W; ``index``: N x k channel ids of sample n's channels, or None when
    ``values`` holds all ``channels`` in order (dense).
    """

    values: torch.Tensor
    index: torch.Tensor | None
    channels: int

    @staticmethod
    def of(x: torch.Tensor) -> Active:
        return Active(x, None, x.shape[1])

    def dense(self) -> torch.Tensor:
        """N x channels x ..., inactive channels 0."""
        if self.index is None:
            return self.values
        out = self.values.new_zeros((self.values.shape[0], self.channels, *self.values.shape[2:]))
        return out.scatter_(1, self.expanded_index(), self.values)

    def expanded_index(self) -> torch.Tensor:
        return self.index.view(*self.index.shape, *([1] * (self.values.dim() - 2))).expand_as(self.values)


SMALL_SLICES_BYTES = 2 << 20
"""Per-sample weight slices of at most this many bytes in all (about a core's L2 cache here) are
always gathered: they cost little next to the convolution."""

GATHER_COST = 64
"""Beyond that, what gathering one weight element into a per-sample slice costs, in multiply-adds: a
gather that spills to memory moves it there and back, a convolution computes on it. Both constants
were chosen on this machine's CPU with the gated CNN, ResNet-20 and VGG-11 at batch 64: a fixed rule
(per sample on maps of at least 16 pixels) took 2.2x the dense path's time on VGG-11's 4x4 maps of
512 channels, and the union cost ResNet-20 two fifths more time on 7x7 maps of 64 channels."""


class FoldedGatedConv(nn.Module):
    """A :class:`~pruning.gates.GatedConv2d` for inference, its eval-mode BatchNorm folded into the
    convolution (weight x scale, bias = shift); ``skip`` chooses the skipping or the dense path."""

    def __init__(self, layer: GatedConv2d, skip: bool) -> None:
        super().__init__()
        conv, bn = layer.conv, layer.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("weight", (conv.weight * scale[:, None, None, None]).detach().clone())
        self.register_buffer("bias", (bn.bias - bn.running_mean * scale).detach().clone())
        self.register_buffer("gate_weight", layer.gate.weight.detach().clone())
        self.register_buffer("gate_bias", layer.gate.bias.detach().clone())
        self.k, self.skip, self.relu = layer.k, skip, layer.relu
        self.stride, self.padding = conv.stride, conv.padding

    def gates(self, x: Active) -> torch.Tensor:
        """The saliency ``ReLU(W_g sigmoid(GAP(x)) + b_g)``; an inactive channel's GAP is 0."""
        s = torch.sigmoid(x.values.mean(dim=(2, 3)))
        if x.index is not None:
            s = s.new_full((s.shape[0], x.channels), 0.5).scatter_(1, x.index, s)
        return F.relu(F.linear(s, self.gate_weight, self.gate_bias))

    def forward(self, x: Active) -> Active:
        saliency = self.gates(x)
        gate, index = saliency.topk(self.k, dim=1)
        index, order = index.sort(dim=1)  # ascending channel ids: the weight slices are read in memory order
        gate = gate.gather(1, order)
        if not self.skip:
            out = F.conv2d(x.dense(), self.weight, self.bias, self.stride, self.padding)
            gate, index = saliency.new_zeros(saliency.shape).scatter_(1, index, gate), None
        elif x.values.shape[0] == 1:
            out = self._per_sample(x, index)
        else:
            out, gate, index = self._cheaper(x, saliency, index, gate)
        out = out * gate[:, :, None, None]
        return Active(F.relu(out) if self.relu else out, index, self.weight.shape[0])

    def _cheaper(self, x: Active, saliency: torch.Tensor, index: torch.Tensor, gate: torch.Tensor):
        """A batch (N > 1) convolved per sample or over the union of its samples' channels: per sample
        when its N slices of k_out x k_in weights are small (:data:`SMALL_SLICES_BYTES`) or cost less,
        gathered (:data:`GATHER_COST` each) and convolved over H_out x W_out pixels, than the union,
        one slice of |union_out| x |union_in| gathered and the whole batch convolved with it."""
        n, k_in, (h, w) = x.values.shape[0], x.values.shape[1], x.values.shape[2:]
        kh, kw = self.weight.shape[2:]
        area = ((h + 2 * self.padding[0] - kh) // self.stride[0] + 1) * ((w + 2 * self.padding[1] - kw) // self.stride[1] + 1)
        slices = n * self.k * k_in
        if slices * kh * kw * self.weight.element_size() <= SMALL_SLICES_BYTES:
            return self._per_sample(x, index), gate, index
        union_out = _union(index, self.weight.shape[0])
        union_in = None if x.index is None else _union(x.index, x.channels)
        u_in = k_in if union_in is None else len(union_in)
        if slices * (area + GATHER_COST) <= len(union_out) * u_in * (n * area + GATHER_COST):
            return self._per_sample(x, index), gate, index
        return self._batch_union(x, saliency, index, gate, union_out, union_in)

    def _per_sample(self, x: Active, index: torch.Tensor) -> torch.Tensor:
        """Each sample's active output channels from its active input channels: one grouped
        convolution over per-sample weight slices (``groups = N``)."""
        n, k_in = x.values.shape[:2]
        c_out, c_in, kh, kw = self.weight.shape
        if x.index is None:
            weight = self.weight.index_select(0, index.reshape(-1))
        else:  # rows (out, in) of the weight seen as (c_out * c_in) x (kh * kw)
            rows = (index[:, :, None] * c_in + x.index[:, None, :]).reshape(-1)
            weight = self.weight.view(c_out * c_in, kh * kw).index_select(0, rows)
        out = F.conv2d(x.values.reshape(1, n * k_in, *x.values.shape[2:]), weight.view(-1, k_in, kh, kw),
                       self.bias[index].reshape(-1), self.stride, self.padding, groups=n)
        return out.view(n, self.k, *out.shape[2:])

    def _batch_union(self, x: Active, saliency: torch.Tensor, index: torch.Tensor, gate: torch.Tensor,
                     union_out: torch.Tensor, union_in: torch.Tensor | None):
        """The batch convolved over the union of its samples' active output channels ``union_out``
        and input channels ``union_in`` (None: the input is dense); returns the output, each
        sample's gate on the union and the union as every sample's index."""
        if union_in is None:
            values, weight = x.values, self.weight.index_select(0, union_out)
        else:
            values = x.dense().index_select(1, union_in)
            weight = self.weight.index_select(0, union_out).index_select(1, union_in)
        out = F.conv2d(values, weight, self.bias[union_out], self.stride, self.padding)
        gate = saliency.new_zeros(saliency.shape).scatter_(1, index, gate).index_select(1, union_out)
        return out, gate, union_out.expand(x.values.shape[0], -1)


def _union(index: torch.Tensor, channels: int) -> torch.Tensor:
    """The channels active in any sample (sorted)."""
    used = torch.zeros(channels, dtype=torch.bool, device=index.device)
    used[index.reshape(-1)] = True
    return used.nonzero().squeeze(1)


class ChannelWise(nn.Module):
    """A layer that acts on each channel alone, run on the active channels."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Active) -> Active:
        return Active(self.layer(x.values), x.index, x.channels)


class Densified(nn.Module):
    """Any other layer, run on the dense tensor (inactive channels as zeros)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Active) -> Active:
        return Active.of(self.layer(x.dense()))


class Residual(nn.Module):
    """``ReLU(branch(x) + shortcut(x))``; the branch's active channels are added into the dense shortcut."""

    def __init__(self, branch: Sequence[nn.Module], shortcut: nn.Module, skip: bool) -> None:
        super().__init__()
        self.branch = nn.Sequential(*(convert(m, skip) for m in branch))
        self.shortcut = copy.deepcopy(shortcut)

    def forward(self, x: Active) -> Active:
        out = self.branch(x)
        base = self.shortcut(x.dense())
        if out.index is None:
            return Active.of(F.relu(base + out.values))
        return Active.of(F.relu(base.scatter_add(1, out.expanded_index(), out.values)))


def convert(layer: nn.Module, skip: bool) -> nn.Module:
    """The inference form of one layer of a gated model's pipeline."""
    if isinstance(layer, GatedConv2d):
        return FoldedGatedConv(layer, skip)
    if hasattr(layer, "skipping_parts"):
        branch, shortcut = layer.skipping_parts()
        return Residual(branch, shortcut, skip)
    if isinstance(layer, CHANNEL_WISE):
        return ChannelWise(copy.deepcopy(layer))
    return Densified(copy.deepcopy(layer))


class SkippingNet(nn.Module):
    """A gated model's layers in their inference form (see :func:`export`); maps a tensor to a tensor."""

    def __init__(self, layers: Sequence[nn.Module], skip: bool) -> None:
        super().__init__()
        self.skip = skip
        self.layers = nn.Sequential(*(convert(m, skip) for m in layers))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(Active.of(x)).dense()


def export(model: nn.Module, skip: bool = True) -> SkippingNet:
    """The inference form of a gated model in eval mode: ``skip=True`` computes only each sample's
    active channels, ``skip=False`` all of them (the dense reference). ``model`` must list its
    layers in execution order in ``skipping_layers()``; a layer with ``skipping_parts()`` (a
    residual block) returns ``(branch layers, shortcut module)``."""
    if not hasattr(model, "skipping_layers"):
        raise TypeError(f"{type(model).__name__} does not list its layers (skipping_layers()); "
                        "only the gated models can be exported")
    if model.training:
        raise ValueError("export a model in eval mode (model.eval()): BatchNorm is folded with its running statistics")
    return SkippingNet(model.skipping_layers(), skip).eval()
