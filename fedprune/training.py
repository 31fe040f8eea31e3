"""Plain local training and evaluation loops on in-memory tensors (shared by both apps)."""

from __future__ import annotations

import torch
from torch import nn

from fedprune.experiment import ClientConfig


def make_optimizer(model: nn.Module, cfg: ClientConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def batches(n: int, batch_size: int, generator: torch.Generator | None = None):
    """Index batches over ``range(n)``: shuffled by ``generator`` when given, in order otherwise."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return order.split(batch_size)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ClientConfig,
          generator: torch.Generator, after_backward=None, after_step=None) -> float:
    """``cfg.local_epochs`` epochs of minibatch training; returns the mean training loss.

    ``after_backward(model)`` runs between backward and the optimizer step (e.g. to mask
    gradients), ``after_step(model)`` after every step (e.g. to re-apply a mask).
    """
    model.train()
    optimizer = make_optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    total, count = 0.0, 0
    for _ in range(cfg.local_epochs):
        for idx in batches(len(x), cfg.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            optimizer.step()
            if after_step is not None:
                after_step(model)
            total += loss.item() * len(idx)
            count += len(idx)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``x``, ``y``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for idx in batches(len(x), batch_size):
        logits = model(x[idx])
        loss_sum += nn.functional.cross_entropy(logits, y[idx], reduction="sum").item()
        correct += int((logits.argmax(1) == y[idx]).sum())
    n = max(len(x), 1)
    return loss_sum / n, correct / n
