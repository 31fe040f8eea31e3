"""Flower strategies: the sparse-aware FedAvg base and one module per method."""

from fedprune.experiment import Experiment
from fedprune.methods import get_method
from strategies.base import FedPruneStrategy, RunFailed

__all__ = ["FedPruneStrategy", "RunFailed", "build_strategy"]


def build_strategy(experiment: Experiment) -> FedPruneStrategy:
    """The strategy of the experiment's method (fedprune/methods.py), built with the experiment."""
    return get_method(experiment.method).strategy_class()(experiment)
