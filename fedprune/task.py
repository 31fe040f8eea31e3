"""What both apps build from an experiment: the model and the (normalized) data they need.

A client's data is cached per process; with a cache directory (a node's ``cache-dir``) also on
disk, so that a deployed node, which serves every message in a fresh process, builds its partition
once and then only reads its own file: no dataset files, no partition plan, no flwr-datasets import.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from fedprune.data import SPECS, load_dataset, local_files, normalize
from fedprune.experiment import DatasetConfig, Experiment, PartitionConfig
from fedprune.files import write_atomically
from fedprune.models import build_model
from fedprune.partition import TooSmallPartition, client_indices
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


CACHE_FORMAT = 1
"""Bumped whenever what a cache file holds, or how it is computed, changes."""


def cache_key(dataset: DatasetConfig, partition: PartitionConfig, partition_id: int, num_partitions: int) -> str:
    """What a client's data is a function of: the dataset settings and its files (path, size,
    modification time), the partition settings (seed included), the partition id and count."""
    files = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in local_files(dataset.name, dataset.root)]
    text = json.dumps([CACHE_FORMAT, dataclasses.asdict(dataset), dataclasses.asdict(partition), partition_id,
                       num_partitions, files], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=4)
def client_data(dataset: DatasetConfig, partition: PartitionConfig, partition_id: int,
                num_partitions: int, cache_dir: str | None = None):
    """(train_x, train_y, val_x, val_y) of one client, normalized; cached per process and, with
    ``cache_dir``, in a file named by :func:`cache_key` there (other settings: another file)."""
    if cache_dir is None:
        return _build_client_data(dataset, partition, partition_id, num_partitions)
    file = Path(cache_dir) / f"client-data-{cache_key(dataset, partition, partition_id, num_partitions)}.pt"
    if file.is_file():
        try:
            return tuple(torch.load(file, mmap=True, weights_only=True))
        except (OSError, RuntimeError, EOFError):  # unreadable (e.g. cut short): built again below
            pass
    data = _build_client_data(dataset, partition, partition_id, num_partitions)
    write_atomically(file, lambda tmp: torch.save(list(data), tmp))
    return data


def _build_client_data(dataset: DatasetConfig, partition: PartitionConfig, partition_id: int, num_partitions: int):
    splits = load_dataset(dataset.name, dataset.root)
    try:
        train_idx, val_idx = client_indices(splits.train_y.numpy(), partition, partition_id, num_partitions)
    except TooSmallPartition:
        raise
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
