"""The base strategy, driven directly with an in-process grid: rounds, sampling, bytes, bad replies."""

import dataclasses
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedprune.experiment import SamplingConfig, experiment_from_run_config
from fedprune.protocol import STYPE, expected_of, unpack
from fedprune.task import new_model
from strategies import RunFailed, build_strategy
from strategies.base import FedPruneStrategy, NodeInfo
from strategies.ledger import content_bytes
from benchmarks.inprocess import InProcessGrid


def run(run_config, num_nodes=3, rounds=2, strategy=None, **grid_kw):
    exp = experiment_from_run_config(run_config)
    strategy = strategy or build_strategy(exp)
    grid = InProcessGrid(run_config, num_nodes, **grid_kw)
    records = []
    initial = ArrayRecord(new_model(exp).state_dict())
    result = strategy.start(grid, initial, rounds, on_round=records.append,
                            evaluate_fn=lambda r, a: MetricRecord({"test_accuracy": float(r)}))
    return result, records, grid, initial


def test_rounds_produce_one_record_each_with_measured_bytes(tiny_run_config):
    result, records, grid, _ = run(tiny_run_config)
    assert [r["round"] for r in records] == [0, 1, 2]
    describe = [m for m in grid.sent if m.metadata.message_type == "query.describe"]
    train1 = [m for m in grid.sent if m.metadata.message_type == "train"][:3]
    eval1 = [m for m in grid.sent if m.metadata.message_type == "evaluate"][:3]
    assert records[1]["bytes_down_describe"] == sum(content_bytes(m) for m in describe)
    assert records[1]["bytes_down_train"] == sum(content_bytes(m) for m in train1)
    assert records[1]["bytes_down"] == sum(content_bytes(m) for m in describe + train1 + eval1)
    assert records[1]["bytes_up_train"] > 3 * 400_000 and records[2]["bytes_up_evaluate"] > 0
    assert records[2]["train_num_nodes"] == 3 and records[2]["val_num_nodes"] == 3
    assert records[2]["rejected_replies"] == 0 and records[2]["wall_seconds"] >= records[1]["wall_seconds"]
    assert set(result.train_metrics_clientapp) == {1, 2}


def test_the_average_is_weighted_by_examples(tiny_run_config):
    exp = experiment_from_run_config(tiny_run_config)
    strategy = build_strategy(exp)
    model = new_model(exp)
    reference = {k: v.numpy() for k, v in model.state_dict().items()}
    strategy.global_arrays = reference
    strategy.nodes[5] = NodeInfo(partition_id=0, num_partitions=1, num_train=100, num_val=0)
    ins = Message(RecordDict({}), dst_node_id=5, message_type="train")

    def reply(value, n):
        arrays = ArrayRecord({k: Array(np.full_like(v, value)) for k, v in reference.items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})}), reply_to=ins)

    arrays, metrics = strategy.aggregate_train(1, [reply(1.0, 10), reply(4.0, 30)])
    assert math.isclose(float(arrays["features.0.weight"].numpy().flat[0]), 3.25, rel_tol=1e-6)
    assert metrics["num-examples"] == 40 and metrics["num-nodes"] == 2


def test_sampling_follows_partitions_not_node_ids(tiny_run_config):
    base = experiment_from_run_config(tiny_run_config)
    sampling = SamplingConfig(fraction_train=0.5, min_train_nodes=1)
    picks = []
    for offset in (10, 999_999):
        strategy = FedPruneStrategy(dataclasses.replace(base, seed=3, sampling=sampling))
        grid = InProcessGrid(tiny_run_config, 6, id_offset=offset)
        nodes = strategy.sample(grid, 4, 0.5, 1, "sample-train")
        picks.append([strategy.nodes[n].partition_id for n in nodes])
    assert picks[0] == picks[1] and len(picks[0]) == 3
    other = FedPruneStrategy(dataclasses.replace(base, seed=4, sampling=sampling))
    grid = InProcessGrid(tiny_run_config, 6)
    assert [other.nodes[n].partition_id for n in other.sample(grid, 4, 0.5, 1, "sample-train")] != picks[0] or \
        [other.nodes[n].partition_id for n in other.sample(grid, 5, 0.5, 1, "sample-train")] != picks[0]


def test_same_seed_same_model_other_seed_other_model(tiny_run_config):
    a, _, _, _ = run(tiny_run_config, rounds=1)
    b, _, _, _ = run(tiny_run_config, rounds=1)
    c, _, _, _ = run({**tiny_run_config, "seed": 8}, rounds=1)
    assert all(np.array_equal(a.arrays[k].numpy(), b.arrays[k].numpy()) for k in a.arrays)
    assert any(not np.array_equal(a.arrays[k].numpy(), c.arrays[k].numpy()) for k in a.arrays)


def _with(reply: Message, ins: Message, *, arrays=None, metrics=None, drop=()) -> Message:
    content = {"arrays": reply.content["arrays"], "metrics": reply.content["metrics"]}
    if arrays is not None:
        content["arrays"] = arrays
    if metrics is not None:
        content["metrics"] = metrics
    for key in drop:
        content.pop(key)
    return Message(RecordDict(content), reply_to=ins)


def _edit_arrays(reply, fn):
    record = reply.content["arrays"]
    arrays = unpack(record, {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in record.items()})
    fn(arrays)
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _metrics(**kw):
    return MetricRecord(kw)


MALFORMED = {
    "error reply": lambda ins, r: Message(Error(code=1, reason="boom"), reply_to=ins),
    "no arrays": lambda ins, r: _with(r, ins, drop=("arrays",)),
    "no metrics": lambda ins, r: _with(r, ins, drop=("metrics",)),
    "missing key": lambda ins, r: _with(r, ins, arrays=_edit_arrays(r, lambda a: a.pop("features.0.weight"))),
    "extra key": lambda ins, r: _with(r, ins, arrays=_edit_arrays(r, lambda a: a.update(evil=np.ones(3, np.float32)))),
    "wrong shape": lambda ins, r: _with(r, ins, arrays=_edit_arrays(
        r, lambda a: a.update({"features.0.bias": np.zeros(7, np.float32)}))),
    "wrong dtype": lambda ins, r: _with(r, ins, arrays=_edit_arrays(
        r, lambda a: a.update({"features.0.bias": a["features.0.bias"].astype(np.float64)}))),
    "nan": lambda ins, r: _with(r, ins, arrays=_edit_arrays(r, lambda a: a["features.0.weight"].flat.__setitem__(0, np.nan))),
    "inf": lambda ins, r: _with(r, ins, arrays=_edit_arrays(r, lambda a: a["classifier.1.bias"].__setitem__(0, np.inf))),
    "undecodable array": lambda ins, r: _with(r, ins, arrays=ArrayRecord({
        **{k: v for k, v in r.content["arrays"].items() if k != "features.0.bias"},
        "features.0.bias": Array(dtype="float32", shape=(32,), stype="numpy.ndarray", data=b"junk")})),
    "truncated codec blob": lambda ins, r: _with(r, ins, arrays=ArrayRecord({
        **{k: v for k, v in r.content["arrays"].items() if k != "features.0.weight"},
        "features.0.weight": Array(dtype="float32", shape=(32, 1, 3, 3), stype=STYPE,
                                   data=r.content["arrays"]["features.0.weight"].data[:-5])})),
    "num-examples missing": lambda ins, r: _with(r, ins, metrics=_metrics(loss=0.1)),
    "num-examples zero": lambda ins, r: _with(r, ins, metrics=_metrics(**{"num-examples": 0})),
    "num-examples negative": lambda ins, r: _with(r, ins, metrics=_metrics(**{"num-examples": -5})),
    "num-examples float": lambda ins, r: _with(r, ins, metrics=_metrics(**{"num-examples": 12.5})),
    "num-examples beyond the node's data": lambda ins, r: _with(r, ins, metrics=_metrics(**{"num-examples": 10**6})),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_replies_are_dropped_and_never_touch_the_model(tiny_run_config, kind):
    exp = experiment_from_run_config(tiny_run_config)
    strategy, records = build_strategy(exp), []
    initial = {k: v.numpy().copy() for k, v in new_model(exp).state_dict().items()}
    with pytest.raises(RunFailed, match="no training reply was accepted"):
        strategy.start(InProcessGrid(tiny_run_config, 3, tamper=MALFORMED[kind]), ArrayRecord(new_model(exp).state_dict()),
                       1, on_round=records.append)
    assert all(np.array_equal(strategy.global_arrays[k], initial[k]) for k in initial)
    rejected = records[1]["rejected_replies"] + records[1]["failed_replies"]
    assert rejected == 3 and "train_num_nodes" not in records[1]


def test_one_bad_reply_among_good_ones_is_left_out(tiny_run_config):
    def spoil_first(ins, reply):
        return MALFORMED["nan"](ins, reply) if ins.metadata.dst_node_id == first_node else reply

    grid = InProcessGrid(tiny_run_config, 3)
    first_node = max(grid.contexts)  # partition 0
    _, records, _, _ = run(tiny_run_config, rounds=1, tamper=spoil_first)
    assert records[1]["rejected_replies"] == 1 and records[1]["train_num_nodes"] == 2
