"""Client partitions of a training set, with flwr-datasets partitioners on the in-memory labels.

Deterministic given the partition seed: every ClientApp process rebuilds the same plan from its
``partition-id`` and ``num-partitions``. Each client's share is split again into train and
validation; the server keeps the official test set.

Built to scale to many partitions: a process builds the partitioner once per (labels, settings,
number of partitions) and reads out only the partitions it serves; a plan that cannot be built is
remembered too, so a process asked again fails at once with the same message. flwr-datasets
(and the ``datasets`` library under it, about two seconds to import) is imported only when a plan
is built, not by a ClientApp process that finds its partition in its cache (fedprune/task.py).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from fedprune.experiment import PartitionConfig
from fedprune.seeding import numpy_rng

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner


def make_partitioner(cfg: PartitionConfig, num_partitions: int) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

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


def check_plan(labels: np.ndarray, cfg: PartitionConfig, num_partitions: int) -> None:
    """Raise, naming the key and what is allowed, for settings no plan can satisfy."""
    n = len(labels)
    if num_partitions < 1:
        raise ValueError(f"num-partitions: got {num_partitions}; allowed: >= 1")
    if num_partitions > n:
        raise ValueError(f"num-partitions: got {num_partitions}; allowed: <= {n} (the training samples)")
    if cfg.scheme == "dirichlet" and cfg.min_partition_size * num_partitions > n:
        raise ValueError(
            f"partition.min_partition_size: got {cfg.min_partition_size} with {num_partitions} partitions of "
            f"{n} samples; allowed: <= {n // num_partitions} (0 takes the first Dirichlet draw as it is; "
            "a node whose partition is then empty is refused)")
    if cfg.scheme == "pathological" and cfg.classes_per_partition > len(np.unique(labels)):
        raise ValueError(
            f"partition.classes_per_partition: got {cfg.classes_per_partition}; the dataset has "
            f"only {len(np.unique(labels))} classes"
        )


class TooSmallPartition(ValueError):
    """A partition too small for a training split (many partitions of a skewed draw leave a few
    empty): its node cannot take part, the plan is fine."""


class _Plan:
    """One partitioner over ``labels``, its partitions read out on demand."""

    def __init__(self, labels: np.ndarray, cfg: PartitionConfig, num_partitions: int) -> None:
        from datasets import Dataset

        check_plan(labels, cfg, num_partitions)
        order = np.arange(len(labels), dtype=np.int64)
        if cfg.scheme == "iid":  # IidPartitioner cuts contiguous shards: shuffle by the seed first
            order = numpy_rng(cfg.seed, "iid").permutation(order)
        self.partitioner = make_partitioner(cfg, num_partitions)
        self.partitioner.dataset = Dataset.from_dict({"label": labels[order].astype(np.int64), "index": order})
        self.partition(0)  # flwr-datasets draws the whole plan on the first read: fail here, once

    def partition(self, partition_id: int) -> np.ndarray:
        return np.sort(np.asarray(self.partitioner.load_partition(partition_id)["index"], dtype=np.int64))


@functools.lru_cache(maxsize=8)
def _plan(labels_bytes: bytes, cfg: PartitionConfig, num_partitions: int) -> _Plan | ValueError:
    try:
        return _Plan(np.frombuffer(labels_bytes, dtype=np.int64), cfg, num_partitions)
    except ValueError as exc:  # remembered: flwr-datasets' ten Dirichlet redraws take seconds at scale
        return exc


def _cached_plan(labels: np.ndarray, cfg: PartitionConfig, num_partitions: int) -> _Plan:
    plan = _plan(labels.astype(np.int64).tobytes(), cfg, num_partitions)
    if isinstance(plan, ValueError):
        raise ValueError(str(plan))
    return plan


def partition_plan(labels: np.ndarray, cfg: PartitionConfig, num_partitions: int) -> list[np.ndarray]:
    """Sample indices of every partition (sorted), in partition-id order."""
    plan = _cached_plan(labels, cfg, num_partitions)
    return [plan.partition(i) for i in range(num_partitions)]


def client_indices(labels: np.ndarray, cfg: PartitionConfig, partition_id: int,
                   num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) sample indices of one client."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id: got {partition_id}; allowed: 0..{num_partitions - 1}")
    part = _cached_plan(labels, cfg, num_partitions).partition(partition_id)
    idx = numpy_rng(cfg.seed, "val-split", partition_id).permutation(part)
    n_val = int(round(len(idx) * cfg.val_fraction))
    if len(idx) - n_val < 1:
        raise TooSmallPartition(f"partition {partition_id} of {num_partitions} has {len(idx)} samples: too few to "
                                f"split off a validation fraction of {cfg.val_fraction}")
    return np.sort(idx[n_val:]), np.sort(idx[:n_val])
