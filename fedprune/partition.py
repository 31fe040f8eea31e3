"""Client partitions of a training set, with flwr-datasets partitioners on the in-memory labels.

Deterministic given the partition seed: every ClientApp process rebuilds the same plan from its
``partition-id`` and ``num-partitions``. Each client's share is split again into train and
validation; the server keeps the official test set.
"""

from __future__ import annotations

import functools

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from fedprune.experiment import PartitionConfig
from fedprune.seeding import numpy_rng


def make_partitioner(cfg: PartitionConfig, num_partitions: int) -> Partitioner:
    if cfg.scheme == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if cfg.scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size, self_balancing=False, shuffle=True,
            seed=cfg.seed,
        )
    if cfg.scheme == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="label",
            num_classes_per_partition=cfg.classes_per_partition, class_assignment_mode="random",
            shuffle=True, seed=cfg.seed,
        )
    raise ValueError(f"partition.scheme: got {cfg.scheme!r}; allowed: iid, dirichlet, pathological")


def partition_plan(labels: np.ndarray, cfg: PartitionConfig, num_partitions: int) -> list[np.ndarray]:
    """Sample indices of every partition (sorted), in partition-id order."""
    if num_partitions < 1:
        raise ValueError(f"num-partitions: got {num_partitions}; allowed: >= 1")
    if cfg.scheme == "pathological" and cfg.classes_per_partition > len(np.unique(labels)):
        raise ValueError(
            f"partition.classes_per_partition: got {cfg.classes_per_partition}; the dataset has "
            f"only {len(np.unique(labels))} classes"
        )
    order = np.arange(len(labels), dtype=np.int64)
    if cfg.scheme == "iid":  # IidPartitioner cuts contiguous shards: shuffle by the seed first
        order = numpy_rng(cfg.seed, "iid").permutation(order)
    partitioner = make_partitioner(cfg, num_partitions)
    partitioner.dataset = Dataset.from_dict({"label": labels[order].astype(np.int64), "index": order})
    return [np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
            for i in range(num_partitions)]


@functools.lru_cache(maxsize=8)
def _cached_plan(labels_bytes: bytes, cfg: PartitionConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    return tuple(partition_plan(np.frombuffer(labels_bytes, dtype=np.int64), cfg, num_partitions))


def client_indices(labels: np.ndarray, cfg: PartitionConfig, partition_id: int,
                   num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) sample indices of one client."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id: got {partition_id}; allowed: 0..{num_partitions - 1}")
    plan = _cached_plan(labels.astype(np.int64).tobytes(), cfg, num_partitions)
    idx = numpy_rng(cfg.seed, "val-split", partition_id).permutation(plan[partition_id])
    n_val = int(round(len(idx) * cfg.val_fraction))
    if len(idx) - n_val < 1:
        raise ValueError(f"partition {partition_id} has {len(idx)} samples: too few to split off "
                         f"a validation fraction of {cfg.val_fraction}")
    return np.sort(idx[n_val:]), np.sort(idx[:n_val])
