"""What a (masked) model costs: parameters, FLOPs and the memory of one training step.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix-multiply and
convolution FLOPs only (2 per multiply-accumulate; bias adds, activations, norms and the optimizer
are not counted). Each Conv/Linear layer's count is scaled by the density of its weight mask: that is
the work a sparse kernel would do; masked dense kernels on a CPU do all of it, so never read a
speed-up into these numbers.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .masks import WEIGHT_TYPES, apply_masks, check_masks, mask_gradients

__all__ = [
    "FlopReport",
    "LayerFlops",
    "LayerParams",
    "MemoryReport",
    "ParamCounts",
    "count_flops",
    "param_counts",
    "training_step_memory",
]


# ---------------------------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class LayerParams:
    """One parameter tensor: ``total`` positions, ``kept`` by its mask, ``nonzero`` values."""

    total: int
    kept: int
    nonzero: int


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts over the whole model and per parameter name."""

    total: int
    kept: int
    nonzero: int
    layers: dict[str, LayerParams] = field(repr=False)

    @property
    def density(self) -> float:
        """Kept fraction of all parameters (masked and unmasked)."""
        return self.kept / self.total if self.total else 1.0


def param_counts(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> ParamCounts:
    """Count parameters: total, kept by ``masks`` (unmasked tensors count fully), non-zero values."""
    masks = masks or {}
    check_masks(model, masks)
    layers = {}
    for name, p in model.named_parameters():
        kept = int(masks[name].sum()) if name in masks else p.numel()
        layers[name] = LayerParams(p.numel(), kept, int(torch.count_nonzero(p.detach())))
    return ParamCounts(
        total=sum(r.total for r in layers.values()),
        kept=sum(r.kept for r in layers.values()),
        nonzero=sum(r.nonzero for r in layers.values()),
        layers=layers,
    )


# ---------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class LayerFlops:
    """One Conv/Linear module (by ``named_modules`` path): dense FLOPs, weight density, effective."""

    name: str
    dense: int
    density: float
    effective: float


@dataclass(frozen=True)
class FlopReport:
    """Counted FLOPs of one forward (``training=False``) or forward + backward (``training=True``).

    ``other`` is what ``flop_counter`` counted outside leaf Conv/Linear modules (e.g. a functional
    matmul); it is included dense in both totals.
    """

    training: bool
    dense: int
    effective: float
    other: int
    layers: tuple[LayerFlops, ...] = field(repr=False)

    @property
    def ratio(self) -> float:
        """``effective / dense`` (1.0 when nothing was counted)."""
        return self.effective / self.dense if self.dense else 1.0


class _Restored:
    """Restore every module's train/eval flag and every buffer on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = {m: m.training for m in self.model.modules()}
        self.buffers = [(b, b.clone()) for b in self.model.buffers()]
        return self

    def __exit__(self, *exc):
        for m, training in self.modes.items():
            m.training = training
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)


def _args(example_input) -> tuple:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def count_flops(model: nn.Module, example_input, masks: Mapping[str, torch.Tensor] | None = None, *,
                training: bool = False,
                loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> FlopReport:
    """Count FLOPs of ``model`` on ``example_input`` (a tensor or a tuple of positional inputs).

    ``training=False`` runs one forward in eval mode without gradients; ``training=True`` runs one
    forward in train mode plus the backward of ``loss_fn(output)`` (default ``output.sum()``) with
    respect to all parameters that require grad. Per-module counts are those ``flop_counter``
    attributes to each leaf Conv/Linear module (the backward included); each is scaled by the
    density of that module's ``weight`` mask, and modules without one count dense. The backward of
    the first layer computes no input gradient, so a training pass is a little under 3x the forward.
    The model's ``.grad``, buffers and train/eval flags are left as they were.
    """
    masks = masks or {}
    check_masks(model, masks)
    root = type(model).__name__
    counter = FlopCounterMode(display=False)
    with _Restored(model):
        model.train(training)
        with counter:
            if training:
                out = model(*_args(example_input))
                loss = loss_fn(out) if loss_fn is not None else out.sum()
                params = [p for p in model.parameters() if p.requires_grad]
                if not params:
                    raise ValueError("training FLOPs need at least one parameter that requires grad")
                torch.autograd.grad(loss, params, allow_unused=True)
            else:
                with torch.no_grad():
                    model(*_args(example_input))
    counts = counter.get_flop_counts()
    total = int(counter.get_total_flops())
    rows = []
    for path, module in model.named_modules():
        if not isinstance(module, WEIGHT_TYPES):
            continue
        dense = int(sum(counts.get(f"{root}.{path}" if path else root, {}).values()))
        mask = masks.get(f"{path}.weight" if path else "weight")
        d = int(mask.sum()) / mask.numel() if mask is not None and mask.numel() else 1.0
        rows.append(LayerFlops(path, dense, d, dense * d))
    other = total - sum(r.dense for r in rows)
    return FlopReport(training, total, other + sum(r.effective for r in rows), other, tuple(rows))


# ---------------------------------------------------------------------------------------------
# memory


@dataclass(frozen=True)
class MemoryReport:
    """Memory of one training step (forward, backward, optimizer step), in bytes.

    ``peak`` is measured: ``baseline`` (what is alive before the step: parameters, buffers, the
    batch) plus ``peak_increase``, the maximum of the running sum of every CPU allocation and free
    the profiler saw during the step. The rest is the analytic breakdown: ``weights`` (parameters
    and buffers), ``grads``, ``optimizer_state`` (as held in ``optimizer.state`` after the step) and
    ``activations`` (tensors saved for backward, each storage once, parameters excluded). The
    measured peak can exceed ``analytic`` by kernel workspaces and temporaries, and fall short of it
    where activations are freed before the optimizer state is allocated.
    """

    peak: int
    baseline: int
    peak_increase: int
    weights: int
    grads: int
    optimizer_state: int
    activations: int

    @property
    def analytic(self) -> int:
        """``weights + grads + optimizer_state + activations``."""
        return self.weights + self.grads + self.optimizer_state + self.activations


def _storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int] | None = None) -> int:
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _peak_allocation(events) -> int:
    """Max over time of the running sum of the profiler's CPU allocation events (0 if none)."""
    mem = sorted(
        (e.start_ns(), e.nbytes()) for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in mem:
        running += nbytes
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced():
    """Hide what native code writes to file descriptor 2 meanwhile: on CUDA builds of torch the
    CPU profiler prints USDT and device-query lines there on every use."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def training_step_memory(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         batch: tuple[torch.Tensor, torch.Tensor], *,
                         optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
                         masks: Mapping[str, torch.Tensor] | None = None) -> MemoryReport:
    """Measure one CPU training step of a copy of ``model`` on ``batch = (x, y)``.

    The step is: gradients set to ``None``, forward in train mode, ``loss_fn(output, y).backward()``,
    gradient masking, ``optimizer.step()`` of a fresh ``optimizer_factory(params)`` (default SGD
    with momentum 0.9), re-masking. ``model`` itself is not changed.
    """
    from torch.profiler import ProfilerActivity, profile

    net = copy.deepcopy(model).train()
    masks = masks or {}
    check_masks(net, masks)
    make = optimizer_factory or (lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9))
    optimizer = make(net.parameters())
    net.zero_grad(set_to_none=True)
    x, y = batch

    state_ptrs: set[int] = set()
    weights = _storage_bytes(list(net.parameters()) + list(net.buffers()), state_ptrs)
    baseline = weights + _storage_bytes([x, y], set(state_ptrs))
    saved: dict[int, int] = {}  # storage pointer -> bytes; saved tensors all live until backward

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in state_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t  # keep no reference, so the measurement sees the step's own lifetimes

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(net(x), y)
        loss.backward()
        mask_gradients(net, masks)
        optimizer.step()
        apply_masks(net, masks)
    activations = sum(saved.values())
    increase = _peak_allocation(prof.profiler.kineto_results.events())

    grads = _storage_bytes([p.grad for p in net.parameters() if p.grad is not None])
    state = _storage_bytes([v for s in optimizer.state.values() for v in s.values()
                            if isinstance(v, torch.Tensor)])
    return MemoryReport(baseline + increase, baseline, increase, weights, grads, state, activations)
