"""Flower strategies: the sparse-aware FedAvg base and one module per method."""

from fedprune.data import SPECS
from fedprune.experiment import Experiment
from fedprune.task import maskable_names, new_model
from strategies.base import FedPruneStrategy


def build_strategy(experiment: Experiment) -> FedPruneStrategy:
    """The strategy an experiment's ``method`` names."""
    from strategies.baselines import METHODS
    from strategies.fedlp import METHODS as FEDLP_METHODS

    if experiment.method == "fedavg":
        return FedPruneStrategy(seed=experiment.seed, sampling=experiment.sampling,
                                value_dtype=experiment.transport.value_dtype)
    if experiment.method in METHODS:
        spec = SPECS[experiment.dataset.name]
        model = new_model(experiment)
        return METHODS[experiment.method](experiment, lambda: new_model(experiment),
                                          maskable_names(experiment, model), (spec.channels, spec.size, spec.size))
    if experiment.method in FEDLP_METHODS:
        return FEDLP_METHODS[experiment.method](experiment, lambda: new_model(experiment))
    raise ValueError(f"method: got {experiment.method!r}; allowed: fedavg, {', '.join([*METHODS, *FEDLP_METHODS])}")
