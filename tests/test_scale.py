"""Scale: a large federation describes only the nodes it samples, partition plans for many
partitions, and nodes that cache their data instead of rebuilding it for every message."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.proto.node_pb2 import NodeInfo as FlowerNodeInfo

import fedprune.partition
import fedprune.task
from benchmarks.inprocess import InProcessGrid, make_context
from client_app import node as client_node
from fedprune.experiment import APP_ROOT, DatasetConfig, PartitionConfig, experiment_from_run_config
from fedprune.partition import check_plan, client_indices, partition_plan
from fedprune.task import cache_key, client_data
from strategies import RunFailed
from strategies.base import FedPruneStrategy

LARGE = "sampling.describe_all_up_to=4 sampling.min_available_nodes=2"


def config(run_config: dict, extra: str) -> dict:
    return {**run_config, "overrides": f"{run_config['overrides']} {extra}"}


def strategy_for(run_config: dict, seed: int = 3) -> FedPruneStrategy:
    return FedPruneStrategy(dataclasses.replace(experiment_from_run_config(run_config), seed=seed))


class RegisteredGrid(InProcessGrid):
    """Node ids in no particular order, as Flower lists them; the registration times tell the order
    (node of partition i registered i-th, as in Flower's simulation)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.registered = {n: self.stamp(ctx.node_config["partition-id"]) for n, ctx in self.contexts.items()}

    @staticmethod
    def stamp(pid: int) -> str:
        return f"2026-01-01T00:00:{pid:02d}"

    def get_node_ids(self):
        return sorted(self.contexts, key=lambda n: (n * 7) % 11)

    def get_nodes(self):
        return [FlowerNodeInfo(node_id=n, registered_at=at) for n, at in self.registered.items()]


def describes(grid) -> list[int]:
    return [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "query.describe"]


def partitions(strategy, nodes) -> list[int]:
    return [strategy.nodes[n].partition_id for n in nodes]


# ------------------------------------------------------------------------------ discovery and sampling

def test_a_large_federation_describes_only_the_nodes_it_samples(tiny_run_config):
    rc = config(tiny_run_config, LARGE)
    strategy, grid = strategy_for(rc), RegisteredGrid(rc, 12)
    first = strategy.sample(grid, 1, 0.25, 2, "sample-train")
    assert len(first) == 3 and sorted(describes(grid)) == sorted(first)
    second = strategy.sample(grid, 2, 0.25, 2, "sample-train")
    new = set(second) - set(first)
    assert len(describes(grid)) == 3 + len(new)  # a node is described once per run
    assert partitions(strategy, first) == sorted(partitions(strategy, first))


def test_a_round_describes_its_training_and_evaluation_nodes_in_one_phase(tiny_run_config):
    rc = config(tiny_run_config, LARGE)
    strategy, grid = strategy_for(rc), RegisteredGrid(rc, 12)
    phases = []
    send = grid.send_and_receive
    grid.send_and_receive = lambda msgs, **kw: phases.append(len(msgs)) or send(msgs, **kw)
    strategy.sample(grid, 1, 0.25, 2, "sample-train", ahead=(("sample-evaluate", 0.25, 2, True),))
    evaluate = strategy.sample(grid, 1, 0.25, 2, "sample-evaluate", validation=True)
    assert len(phases) == 1 and 3 <= phases[0] <= 6
    alone = strategy_for(rc)
    assert partitions(strategy, evaluate) == partitions(alone, alone.sample(RegisteredGrid(rc, 12), 1, 0.25, 2,
                                                                            "sample-evaluate", validation=True))


def test_the_sample_follows_partitions_not_node_ids_nor_the_registration_order(tiny_run_config):
    rc = config(tiny_run_config, LARGE)
    picks = []
    for grid in (RegisteredGrid(rc, 12, id_offset=10), RegisteredGrid(rc, 12, id_offset=999_999),
                 InProcessGrid(rc, 12, id_offset=5)):
        strategy = strategy_for(rc)
        picks.append([partitions(strategy, strategy.sample(grid, r, 0.25, 2, "sample-train")) for r in (1, 2, 3)])
    assert picks[0] == picks[1] == picks[2]
    assert len({tuple(p) for p in picks[0]}) > 1  # rounds draw anew

    class Misregistered(RegisteredGrid):
        @staticmethod
        def stamp(pid: int) -> str:  # registered in reverse partition order: the guesses are wrong
            return f"2026-01-01T00:00:{99 - pid:02d}"

    strategy, grid = strategy_for(rc), Misregistered(rc, 12)
    assert [partitions(strategy, strategy.sample(grid, r, 0.25, 2, "sample-train")) for r in (1, 2, 3)] == picks[0]
    assert len(describes(grid)) == 12  # a wrong guess falls back to describing every node, once


def test_a_partition_whose_node_is_refused_is_passed_over(tiny_run_config):
    rc = config(tiny_run_config, LARGE)
    reference = strategy_for(rc)
    drawn = partitions(reference, reference.sample(RegisteredGrid(rc, 12), 1, 0.25, 2, "sample-train"))
    grid = RegisteredGrid(rc, 12)
    broken = next(n for n, ctx in grid.contexts.items() if ctx.node_config["partition-id"] == drawn[0])
    del grid.contexts[broken].node_config["partition-id"]  # its describe fails
    strategy = strategy_for(rc)
    picked = partitions(strategy, strategy.sample(grid, 1, 0.25, 2, "sample-train"))
    assert len(picked) == 3 and drawn[0] not in picked and set(drawn[1:]) <= set(picked)
    assert set(strategy.refused) == {broken}


def test_a_large_federation_of_broken_nodes_stops_after_its_first_describes(tiny_run_config):
    rc = config(tiny_run_config, LARGE)
    grid = RegisteredGrid(rc, 12)
    for ctx in grid.contexts.values():
        del ctx.node_config["partition-id"]
    with pytest.raises(RunFailed, match="0 usable nodes, 2 required"):
        strategy_for(rc).sample(grid, 1, 0.25, 2, "sample-train")
    assert len(describes(grid)) == 3


def test_a_minimum_partition_size_no_plan_can_meet_stops_a_large_federation_before_round_1(tiny_run_config):
    rc = config(tiny_run_config, LARGE + " partition.scheme=dirichlet partition.min_partition_size=100")
    grid = RegisteredGrid(rc, 12)
    with pytest.raises(RunFailed, match=r"partition.min_partition_size: got 100 with 12 partitions of 600 samples; "
                                        r"allowed: <= 50"):
        strategy_for(rc).sample(grid, 1, 0.25, 2, "sample-train")
    assert len(describes(grid)) == 3


def test_evaluation_samples_only_nodes_with_a_validation_split(tiny_run_config):
    strategy, grid = strategy_for(tiny_run_config), InProcessGrid(tiny_run_config, 6)
    everyone = strategy.sample(grid, 1, 1.0, 1, "sample-evaluate", validation=True)
    assert len(everyone) == 6
    for node in everyone[:2]:
        strategy.nodes[node] = dataclasses.replace(strategy.nodes[node], num_val=0)
    assert strategy.sample(grid, 1, 1.0, 1, "sample-evaluate", validation=True) == everyone[2:]


# ------------------------------------------------------------------------------ partition plans

LABELS = np.random.default_rng(0).integers(0, 10, 20_000)


def test_a_minimum_partition_size_no_plan_can_meet_is_refused_naming_what_is_allowed():
    with pytest.raises(ValueError, match=r"partition.min_partition_size: got 10 with 5000 partitions of 20000 "
                                         r"samples; allowed: <= 4"):
        check_plan(LABELS, PartitionConfig(min_partition_size=10), 5000)
    with pytest.raises(ValueError, match="allowed: <= 20000"):
        check_plan(LABELS, PartitionConfig(), 20_001)


def test_thousands_of_dirichlet_partitions_are_drawn_once_and_read_one_by_one(monkeypatch):
    cfg = PartitionConfig(alpha=0.5, min_partition_size=0, val_fraction=0.0)
    made = []
    original = fedprune.partition.make_partitioner
    monkeypatch.setattr(fedprune.partition, "make_partitioner", lambda *a: made.append(a) or original(*a))
    plan = partition_plan(LABELS, cfg, 2000)
    assert sorted(np.concatenate(plan).tolist()) == list(range(len(LABELS)))
    assert min(len(p) for p in plan) == 0  # alpha 0.5 over 2,000 partitions: some are empty
    some = [pid for pid, p in enumerate(plan) if len(p)][:3] + [max(range(2000), key=lambda i: len(plan[i]))]
    assert all(np.array_equal(client_indices(LABELS, cfg, pid, 2000)[0], plan[pid]) for pid in some)
    with pytest.raises(ValueError, match="has 0 samples"):
        client_indices(LABELS, cfg, next(pid for pid, p in enumerate(plan) if not len(p)), 2000)
    assert len(made) == 1


@pytest.mark.filterwarnings("ignore::UserWarning")  # flwr-datasets warns at each of its redraws
def test_a_plan_that_cannot_be_drawn_fails_at_once_when_asked_again(monkeypatch):
    cfg = PartitionConfig(alpha=0.5, min_partition_size=3)  # the mean is 4: the ten draws fail
    made = []
    original = fedprune.partition.make_partitioner
    monkeypatch.setattr(fedprune.partition, "make_partitioner", lambda *a: made.append(a) or original(*a))
    for _ in range(2):
        with pytest.raises(ValueError, match="max number of attempts"):
            client_indices(LABELS, cfg, 0, 5000)
    assert len(made) == 1


# ------------------------------------------------------------------------------ node caches

def test_a_node_with_a_cache_dir_builds_its_data_once_and_then_reads_its_file(tiny_mnist, tmp_path, monkeypatch):
    dataset, partition = DatasetConfig(name="mnist", root=str(tiny_mnist)), PartitionConfig(scheme="iid")
    built = client_data(dataset, partition, 1, 3, str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1
    client_data.cache_clear()
    monkeypatch.setattr(fedprune.task, "load_dataset", lambda *a: pytest.fail("read the dataset again"))
    again = client_data(dataset, partition, 1, 3, str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(built, again))
    client_data.cache_clear()


def test_the_cache_key_changes_with_every_setting_the_data_depends_on(tiny_mnist, tmp_path):
    dataset, partition = DatasetConfig(name="mnist", root=str(tiny_mnist)), PartitionConfig(scheme="iid")
    key = cache_key(dataset, partition, 1, 3)
    assert key == cache_key(dataset, partition, 1, 3)
    others = {cache_key(dataset, partition, 2, 3), cache_key(dataset, partition, 1, 4),
              cache_key(dataset, dataclasses.replace(partition, seed=1), 1, 3),
              cache_key(dataset, dataclasses.replace(partition, val_fraction=0.2), 1, 3),
              cache_key(dataclasses.replace(dataset, root=str(tmp_path)), partition, 1, 3)}
    assert key not in others and len(others) == 5
    labels = next(tiny_mnist.glob("train-labels*"))
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))  # the files changed
    assert cache_key(dataset, partition, 1, 3) != key


def test_a_node_measures_its_training_costs_once_and_keeps_them_in_its_cache_dir(tiny_run_config, tmp_path,
                                                                                  monkeypatch):
    ctx = make_context(tiny_run_config, 0, 2)
    ctx.node_config["cache-dir"] = str(tmp_path)
    node = client_node.node_of(ctx)
    x, y, _, _ = node.data()
    model = fedprune.task.new_model(node.experiment)
    monkeypatch.setattr(client_node, "_COSTS", {})
    measured = client_node.training_costs(model, None, x, y, node)
    monkeypatch.setattr(client_node, "_COSTS", {})  # a fresh process
    monkeypatch.setattr(client_node, "training_step_memory", lambda *a, **k: pytest.fail("measured again"))
    assert client_node.training_costs(model, None, x, y, node) == measured
    with pytest.raises(pytest.fail.Exception, match="measured again"):  # a smaller batch is another step
        client_node.training_costs(model, None, x[:8], y[:8], node)


def test_a_node_parses_the_experiment_once_per_process(tiny_run_config, monkeypatch):
    calls = []
    monkeypatch.setattr(client_node, "experiment_from_run_config", lambda rc: calls.append(rc) or
                        experiment_from_run_config(rc))
    rc = {**tiny_run_config, "seed": 12345}
    for _ in range(3):
        node = client_node.node_of(make_context(rc, 0, 2))
    assert len(calls) == 1 and node.experiment.seed == 12345


FRESH_PROCESS = """
import json, sys
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
from benchmarks.inprocess import make_context
from client_app.app import app
ctx = make_context(json.loads(sys.argv[1]), 1, 3)
ctx.node_config["cache-dir"] = sys.argv[2]
msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=101, message_type="query.describe")
reply = app(msg, ctx)
import fedprune.data
print(int(reply.content["metrics"]["num-train"]), "datasets" in sys.modules,
      fedprune.data.load_dataset.cache_info().currsize)
"""


def test_a_fresh_clientapp_process_with_a_warm_cache_loads_neither_the_dataset_nor_flwr_datasets(
        tiny_run_config, tmp_path):
    def run() -> list[str]:
        out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(tiny_run_config), str(tmp_path)],
                             cwd=APP_ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    cold, warm = run(), run()
    assert cold == [cold[0], "True", "1"]  # the first message loads the dataset and builds the plan
    assert warm == [cold[0], "False", "0"]  # the next ones only read the node's file
