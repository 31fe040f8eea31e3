"""Partitions: flwr-datasets partitioners, deterministic by the partition seed, with validation splits."""

import dataclasses

import numpy as np
import pytest

from fedprune.experiment import PartitionConfig
from fedprune.partition import client_indices, partition_plan

LABELS = np.random.default_rng(0).integers(0, 10, 3000)


def test_iid_covers_every_sample_once():
    plan = partition_plan(LABELS, PartitionConfig(scheme="iid"), 6)
    together = np.concatenate(plan)
    assert sorted(together.tolist()) == list(range(len(LABELS)))
    assert {len(p) for p in plan} == {500}


def test_iid_is_shuffled_deterministically_by_the_seed():
    cfg = PartitionConfig(scheme="iid", seed=1)
    a, b = partition_plan(LABELS, cfg, 6), partition_plan(LABELS, cfg, 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], np.arange(500))  # not a contiguous shard of the dataset order
    c = partition_plan(LABELS, dataclasses.replace(cfg, seed=2), 6)
    assert sorted(np.concatenate(c).tolist()) == list(range(len(LABELS)))
    assert all(not np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_is_deterministic_and_seed_sensitive():
    cfg = PartitionConfig(scheme="dirichlet", alpha=0.3, seed=1)
    a, b = partition_plan(LABELS, cfg, 5), partition_plan(LABELS, cfg, 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = partition_plan(LABELS, dataclasses.replace(cfg, seed=2), 5)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert min(len(p) for p in a) >= cfg.min_partition_size


def test_dirichlet_small_alpha_skews_labels():
    def skew(alpha):
        plan = partition_plan(LABELS, PartitionConfig(scheme="dirichlet", alpha=alpha), 5)
        return np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in plan])
    assert skew(0.1) > skew(100.0) + 0.2


def test_pathological_gives_k_classes_each():
    plan = partition_plan(LABELS, PartitionConfig(scheme="pathological", classes_per_partition=2), 5)
    assert all(len(np.unique(LABELS[p])) == 2 for p in plan)


def test_client_split_is_disjoint_deterministic_and_sized():
    cfg = PartitionConfig(scheme="iid", val_fraction=0.2)
    train, val = client_indices(LABELS, cfg, 1, 4)
    assert len(val) == 150 and len(train) == 600 and not set(train) & set(val)
    again = client_indices(LABELS, cfg, 1, 4)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])


@pytest.mark.parametrize("pid, num, match", [(4, 4, "allowed: 0..3"), (-1, 4, "allowed: 0..3")])
def test_bad_partition_id(pid, num, match):
    with pytest.raises(ValueError, match=match):
        client_indices(LABELS, PartitionConfig(scheme="iid"), pid, num)


def test_too_many_classes_per_partition():
    with pytest.raises(ValueError, match="only 10 classes"):
        partition_plan(LABELS, PartitionConfig(scheme="pathological", classes_per_partition=11), 3)
