"""What both apps build from an experiment: the model and the (normalized) data they need."""

from __future__ import annotations

import functools

import torch
from torch import nn

from fedprune.data import SPECS, load_dataset, normalize
from fedprune.experiment import DatasetConfig, Experiment, PartitionConfig
from fedprune.models import build_model
from fedprune.partition import client_indices
from fedprune.seeding import derive_seed
from pruning.masks import prunable_names


def new_model(experiment: Experiment) -> nn.Module:
    """The experiment's model, initialized from the run seed."""
    spec = SPECS[experiment.dataset.name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(experiment.seed, "init"))
        return build_model(experiment.model.name, spec.channels, spec.num_classes, spec.size)


@functools.lru_cache(maxsize=2)
def test_data(name: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    splits = load_dataset(name, root)
    return normalize(splits.test_x, splits.spec), splits.test_y


@functools.lru_cache(maxsize=4)
def client_data(dataset: DatasetConfig, partition: PartitionConfig, partition_id: int,
                num_partitions: int):
    """(train_x, train_y, val_x, val_y) of one client, normalized; cached per process."""
    splits = load_dataset(dataset.name, dataset.root)
    try:
        train_idx, val_idx = client_indices(splits.train_y.numpy(), partition, partition_id, num_partitions)
    except ValueError as exc:
        raise ValueError(f"cannot build the partition plan ({partition.scheme}, {num_partitions} partitions of "
                         f"{len(splits.train_y)} samples): {exc}. Change partition.scheme, partition.alpha, "
                         "partition.min_partition_size, partition.classes_per_partition or the number of "
                         "partitions") from exc
    tr, va = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return (normalize(splits.train_x[tr], splits.spec), splits.train_y[tr],
            normalize(splits.train_x[va], splits.spec), splits.train_y[va])


def maskable_names(experiment: Experiment, model: nn.Module) -> list[str]:
    """The parameters a pruning method may mask, by the experiment's rules (pruning.include_*)."""
    p = experiment.pruning
    return prunable_names(model, include_bias=p.include_bias, include_norm=p.include_norm,
                          include_first=p.include_first, include_last=p.include_last)
