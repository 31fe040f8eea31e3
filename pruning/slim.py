"""Structured pruning that really shrinks compute: a masked chain model whose removed units run as a
physically smaller dense model.

A *chain* is a model whose forward pass is its leaf modules applied one after the other in
registration order, with a flatten before the first Linear layer (the small CNN and VGG here; not
ResNets, whose shortcuts branch): Conv2d / Linear layers with BatchNorm, zero-preserving
activations, pooling, flatten and dropout between them. :func:`chain_of` checks that by running
the model and that sequence on an example input. In a chain, output unit ``u`` of a Conv/Linear layer (a filter or a neuron)
feeds only input channel ``u`` of the next Conv/Linear layer (its input features ``u*s ..
u*s + s - 1`` when a flatten of ``s`` positions per channel lies between them).

A unit is *removed* when everything that sets its output is masked out: its weight row, its bias
and the affine weight and bias of the BatchNorm that follows it. Its output is then exactly zero
whatever the input, so the next layer's weights that read it do nothing either. :class:`Slim` is
the chain without removed units and without those weights: same outputs, same gradients for every
kept weight, fewer FLOPs in dense kernels. The output units of the last layer are never removed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Chain", "Layer", "Slim", "chain_of"]

_WEIGHTED = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.GELU, nn.Identity, nn.Dropout, nn.Flatten,
                    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
"""Leaves allowed between weighted layers: each maps an all-zero channel to an all-zero channel."""


@dataclass(frozen=True)
class Layer:
    """A Conv/Linear layer of a chain, with the BatchNorm that follows it (if any)."""

    leaf: int
    """Index of the layer in the chain's sequence of leaves."""
    path: str
    units: int
    """Output channels / features."""
    spread: int
    """Input features per output unit of the previous layer (positions per channel of a flatten; 1
    otherwise, and for the first layer)."""
    norm: int | None
    """Leaf index of the BatchNorm on this layer's output."""
    norm_path: str | None

    @property
    def weight(self) -> str:
        return f"{self.path}.weight"


def _param(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class Chain:
    """A chain model's leaves and its Conv/Linear layers (see the module docstring)."""

    def __init__(self, leaves: Sequence[tuple[str | None, nn.Module]], layers: Sequence[Layer]) -> None:
        self.leaves = list(leaves)
        self.layers = list(layers)

    def hidden(self) -> list[Layer]:
        """The layers whose units may be removed: all but the last."""
        return self.layers[:-1]

    def owned(self, layer: Layer) -> list[str]:
        """The parameters that set a unit's output: weight, bias, the BatchNorm's weight and bias."""
        module = self.leaves[layer.leaf][1]
        names = [layer.weight] + ([_param(layer.path, "bias")] if module.bias is not None else [])
        if layer.norm is not None:
            norm = self.leaves[layer.norm][1]
            if norm.affine:
                names += [_param(layer.norm_path, "weight"), _param(layer.norm_path, "bias")]
            else:
                names.append("<non-affine norm>")  # its output is not zero: the unit cannot go
        return names

    def removable(self, maskable: Sequence[str]) -> list[Layer]:
        """Hidden layers whose units a mask over ``maskable`` names can remove (every parameter the
        unit owns is maskable)."""
        allowed = set(maskable)
        return [layer for layer in self.hidden() if all(n in allowed for n in self.owned(layer))]

    def unit_positions(self, keep: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]
                       ) -> dict[str, torch.Tensor]:
        """Masks that remove the units ``keep`` (weight name -> bool per output unit) drops: rows of
        every parameter the unit owns, and the next layer's input columns that read it. Only names
        in ``shapes`` (the maskable parameters) get a mask."""
        masks = {name: torch.ones(tuple(shape), dtype=torch.bool) for name, shape in shapes.items()}
        for i, layer in enumerate(self.layers):
            units = keep.get(layer.weight)
            if units is None:
                continue
            gone = ~units
            for name in self.owned(layer):
                if name in masks:
                    masks[name][gone] = False
            after = self.layers[i + 1]
            if after.weight in masks:
                masks[after.weight][:, gone.repeat_interleave(after.spread)] = False
        return {name: m for name, m in masks.items() if not m.all()}

    def kept_units(self, masks: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, the output units a mask keeps: a unit is removed only when every parameter it
        owns is masked out over its whole row (the last layer keeps all)."""
        out = []
        for layer in self.layers:
            alive = torch.zeros(layer.units, dtype=torch.bool)
            if layer is self.layers[-1]:
                alive[:] = True
            for name in self.owned(layer):
                mask = masks.get(name)
                alive |= True if mask is None else mask.reshape(layer.units, -1).any(1)
            out.append(alive)
        return out

    def slim(self, model: nn.Module, kept: Sequence[torch.Tensor]) -> "Slim":
        return Slim(self, model, kept)


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in model.named_modules() if not list(m.children())]


def chain_of(model: nn.Module, example: torch.Tensor) -> Chain | None:
    """The model as a chain, or None when it is not one (a leaf of another kind, a Conv2d with
    groups, a Conv after a Linear, or a forward pass that is not its leaves in order)."""
    leaves: list[tuple[str | None, nn.Module]] = []
    layers: list[Layer] = []
    flat = False
    for path, m in _leaves(model):
        flat = flat or isinstance(m, nn.Flatten)
        if isinstance(m, nn.Linear) and not flat:  # a functional flatten in forward()
            leaves.append((None, nn.Flatten()))
            flat = True
        i = len(leaves)
        leaves.append((path, m))
        if isinstance(m, _WEIGHTED):
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or (layers and isinstance(leaves[layers[-1].leaf][1],
                                                                                      nn.Linear))):
                return None
            units = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            fan_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            spread = 1 if not layers else fan_in // layers[-1].units
            if layers and fan_in != spread * layers[-1].units:
                return None
            layers.append(Layer(i, path, units, spread, None, None))
        elif isinstance(m, _NORMS):
            if not layers or layers[-1].norm is not None or m.num_features != layers[-1].units:
                return None
            layers[-1] = Layer(layers[-1].leaf, layers[-1].path, layers[-1].units, layers[-1].spread, i, path)
        elif not isinstance(m, _ZERO_PRESERVING):
            return None
    if not layers:
        return None
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            same = torch.allclose(model(example), nn.Sequential(*[m for _, m in leaves])(example), atol=1e-6)
    except RuntimeError:
        same = False
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return Chain(leaves, layers) if same else None


class Slim:
    """A chain without its removed units, as an ``nn.Sequential`` (``model``) built from the
    values of a full model; :meth:`masks` and :meth:`full_state` translate masks and trained
    values between the two."""

    def __init__(self, chain: Chain, model: nn.Module, kept: Sequence[torch.Tensor]) -> None:
        self.chain = chain
        self.sizes = tuple(int(k.sum()) for k in kept)
        full = dict(_leaves(model))
        index: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        for j, layer in enumerate(chain.layers):
            out_idx = torch.nonzero(kept[j]).squeeze(1)
            in_idx = None if j == 0 else torch.nonzero(
                kept[j - 1].repeat_interleave(layer.spread)).squeeze(1)
            index[layer.leaf] = (out_idx, in_idx)
            if layer.norm is not None:
                index[layer.norm] = (out_idx, None)
        modules = []
        self.names: dict[str, tuple[str, torch.Tensor | None, torch.Tensor | None]] = {}
        """Full state-dict name -> (slim name, kept rows, kept columns)."""
        for i, (path, m) in enumerate(chain.leaves):
            m = m if path is None else full[path]
            if i in index:
                out_idx, in_idx = index[i]
                modules.append(_shrunk(m, len(out_idx), None if in_idx is None else len(in_idx)))
                for key in m.state_dict():
                    cols = in_idx if key == "weight" and not isinstance(m, _NORMS) else None
                    rows = None if key == "num_batches_tracked" else out_idx
                    self.names[_param(path, key)] = (f"{i}.{key}", rows, cols)
            else:
                modules.append(copy.deepcopy(m))
        self.model = nn.Sequential(*modules)
        self.model.train(model.training)
        state = model.state_dict()
        self.model.load_state_dict({slim: _gather(state[name], rows, cols)
                                    for name, (slim, rows, cols) in self.names.items()})

    def masks(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full-model masks restricted to the slim model (by its parameter names)."""
        return {self.names[k][0]: _gather(m, *self.names[k][1:]) for k, m in masks.items()}

    def full_state(self, full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``full`` (a full model's state) with the slim model's values written where they belong;
        the removed positions keep ``full``'s values."""
        slim = self.model.state_dict()
        out = {k: v.clone() for k, v in full.items()}
        for name, (key, rows, cols) in self.names.items():
            value = slim[key].detach()
            if rows is None:
                out[name] = value.clone()
            elif cols is None:
                out[name][rows] = value
            else:
                out[name][rows.unsqueeze(1), cols] = value
        return out


def _gather(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    t = t if rows is None else t.index_select(0, rows)
    return (t if cols is None else t.index_select(1, cols)).clone()


def _shrunk(m: nn.Module, out: int, inp: int | None) -> nn.Module:
    """A Conv2d / Linear / BatchNorm like ``m`` with ``out`` output and ``inp`` input units."""
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(inp or m.in_channels, out, m.kernel_size, m.stride, m.padding, m.dilation,
                         bias=m.bias is not None, padding_mode=m.padding_mode)
    if isinstance(m, nn.Linear):
        return nn.Linear(inp or m.in_features, out, bias=m.bias is not None)
    return type(m)(out, eps=m.eps, momentum=m.momentum, affine=m.affine,
                   track_running_stats=m.track_running_stats)
