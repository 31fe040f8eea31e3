"""Flower strategies: a reproducible, accountable FedAvg base and one module per method."""

from fedprune.experiment import Experiment
from strategies.base import FedPruneStrategy


def build_strategy(experiment: Experiment) -> FedPruneStrategy:
    """The strategy an experiment's ``method`` names."""
    if experiment.method == "fedavg":
        return FedPruneStrategy(seed=experiment.seed, sampling=experiment.sampling)
    raise ValueError(f"method: got {experiment.method!r}; allowed: fedavg")
