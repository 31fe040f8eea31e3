"""What FedDP's strategy and client routines share (strategies/feddp.py, client_app/feddp.py): the
model with the run's keep ratio, the record of SCAFFOLD's control variates, the magnitude threshold
of the authors' second code version."""

from __future__ import annotations

import torch
from torch import nn

from fedprune.experiment import Experiment
from fedprune.task import new_model
from pruning.gates import set_keep_ratio

CONTROL = "control"
"""Record of SCAFFOLD's control variates: the server's ``c`` in a training message, the client's
``delta c_i`` in its reply; one float32 tensor per trainable parameter, by parameter name."""


def feddp_model(experiment: Experiment) -> nn.Module:
    """The experiment's model (initialized from the run seed) with ``feddp.keep_ratio`` set in every
    gated layer (a model without gates is returned as it is)."""
    return set_keep_ratio(new_model(experiment), experiment.feddp.keep_ratio)


def conv_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of every ``nn.Conv2d``, by parameter name (what the threshold prunes)."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@torch.no_grad()
def threshold_conv_weights(model: nn.Module, tau: float) -> None:
    """``W[|W| <= tau] = 0`` in every convolution, in place (the authors' ``dynamic_pruning``)."""
    for weight in conv_weights(model).values():
        weight.masked_fill_(weight.abs() <= tau, 0.0)
