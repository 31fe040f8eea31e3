r"""Input-dependent channel gates: each convolution keeps, per sample, its ``k`` most salient output
channels and zeroes the rest (feature boosting and suppression, Gao et al. 2019, as in the gated
code of Yu et al.'s "Adaptive Dynamic Pruning for Non-IID FL", FedDP v1).

:class:`GatedConv2d` is ``conv -> BatchNorm -> x gate -> ReLU``. The gate of a sample ``x`` (N x
C_in x H x W) is its channel saliency ::

    s = sigmoid(GAP(x))              # N x C_in, GAP = global average pool
    g = ReLU(W_g s + b_g)            # N x C_out, W_g kaiming-normal, b_g = 1 at init
    g = winners(g, k)                # all but the k largest entries of each row set to 0

A channel whose gate is 0 outputs 0 for that sample, so its filter gets no gradient from that
sample's output ("only the salient parameters' gradients are kept"). One coupling remains, as in
the authors' code: in training mode BatchNorm normalizes with the batch's statistics, which
include the samples that gated the channel off, so its filter still gets a small gradient through
them; a channel that no sample of the batch keeps gets none.

``k`` is a persistent int64 buffer ``keep`` (default ``C_out``: nothing pruned) so that it travels
in the state dict with the weights: whoever loads the state evaluates the same function.
:func:`set_keep_ratio` sets ``k = max(1, round(r * C_out))`` in every gated layer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GatedConv2d", "gated_layers", "keep_counts", "set_keep_ratio", "winners"]


def winners(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """``saliency`` (N x C) with all but the ``k`` largest entries of each row set to 0
    (winner-take-all; ties are broken by ``torch.topk``). Gradients flow to the kept entries."""
    if k >= saliency.shape[1]:
        return saliency
    index = saliency.topk(k, dim=1).indices
    keep = torch.zeros_like(saliency).scatter_(1, index, 1.0)
    return saliency * keep


class GatedConv2d(nn.Module):
    """``ReLU(BN(conv(x)) * winners(gate(x), k))``, the ReLU optional (a residual branch adds
    its shortcut first). The convolution has no bias (BatchNorm follows)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.gate = nn.Linear(in_channels, out_channels)
        nn.init.kaiming_normal_(self.gate.weight)
        nn.init.constant_(self.gate.bias, 1.0)
        self.relu = relu
        self.register_buffer("keep", torch.tensor(out_channels, dtype=torch.int64))

    @property
    def k(self) -> int:
        """Output channels kept per sample."""
        return int(self.keep)

    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        """``ReLU(W_g sigmoid(GAP(x)) + b_g)``, N x C_out, before winner-take-all."""
        return F.relu(self.gate(torch.sigmoid(x.mean(dim=(2, 3)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = winners(self.saliency(x), self.k)
        out = self.bn(self.conv(x)) * g[:, :, None, None]
        return F.relu(out) if self.relu else out


def gated_layers(model: nn.Module) -> dict[str, GatedConv2d]:
    """The model's gated convolutions by module path, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GatedConv2d)}


@torch.no_grad()
def set_keep_ratio(model: nn.Module, ratio: float) -> nn.Module:
    """Keep ``max(1, round(ratio * C_out))`` channels per sample in every gated layer; returns the model."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio: got {ratio!r}; allowed: 0 < ratio <= 1")
    for layer in gated_layers(model).values():
        layer.keep.fill_(max(1, round(ratio * layer.conv.out_channels)))
    return model


def keep_counts(model: nn.Module) -> dict[str, int]:
    """``k`` of every gated layer, by the state-dict key of its ``keep`` buffer."""
    return {f"{name}.keep" if name else "keep": layer.k for name, layer in gated_layers(model).items()}
