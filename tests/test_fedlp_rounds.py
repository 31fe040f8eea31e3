"""FedLP in real rounds (in-process federation, the authors' CNN on tiny CIFAR-format files):
measured bytes against the counts, partial averaging, private heads, validation of key sets."""

import contextlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from benchmarks.inprocess import InProcessGrid
from client_app.app import app as client_app
from fedprune.experiment import experiment_from_run_config
from fedprune.fedlp import kept_keys, level_shared_params
from fedprune.protocol import expected_of, pack, unpack
from fedprune.task import new_model
from strategies import RunFailed, build_strategy
from strategies.base import NodeInfo
from strategies.fedlp import FedLPHetero, FedLPHomo
from strategies.ledger import content_bytes
from tests.conftest import make_context, write_cifar10

TENSOR_OVERHEAD = 96
"""Bytes per tensor beyond its values that we allow: the codec header (8 + 4 * ndim) plus the
Flower Array around it (key, dtype, shape, stype); measured 72-81 with this model."""
MESSAGE_OVERHEAD = 256
"""Bytes per message beyond its tensors: the config or metrics record (measured 140-170)."""


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, per_batch=24, n_test=20)
    return root


def run_config(cifar, experiment, overrides="", rounds=2):
    return {"experiment": experiment, "num-server-rounds": rounds, "seed": 5,
            "overrides": f"dataset.name=cifar10 dataset.root={cifar} partition.scheme=iid client.batch_size=20 "
                         f"sampling.fraction_evaluate=0 partition.val_fraction=0.2 {overrides}"}


def run(rc, nodes=3, rounds=2, tamper=None, fails=False):
    exp = experiment_from_run_config(rc)
    strategy = build_strategy(exp)
    pairs = []

    def capture(instruction, reply):
        reply = tamper(instruction, reply) if tamper else reply
        pairs.append((instruction, reply))
        return reply

    grid = InProcessGrid(rc, nodes, tamper=capture)
    records = []
    initial = {k: v.numpy().copy() for k, v in new_model(exp).state_dict().items()}
    with pytest.raises(RunFailed) if fails else contextlib.nullcontext():
        strategy.start(grid, ArrayRecord(new_model(exp).state_dict()), rounds, on_round=records.append,
                       evaluate_fn=lambda r, a: MetricRecord({"test_accuracy": 0.0}))
    return strategy, grid, pairs, records, initial


def wire_check(msg, keys, reference) -> tuple[int, int]:
    """The message carries exactly ``keys``, and its measured bytes lie within
    ``counted - 4 * zeros <= measured <= counted + 96 * tensors + 256``, where ``counted`` is the
    entries' raw size (4 B per float32 element, 8 B per int64 BatchNorm counter) and ``zeros`` the
    zero-valued floats (which the codec may send sparse). Returns (measured, counted)."""
    record = msg.content["arrays"]
    assert set(record.keys()) == set(keys)
    arrays = unpack(record, expected_of({k: reference[k] for k in keys}))
    counted = sum(a.nbytes for a in arrays.values())
    zeros = sum(int((a == 0).sum()) for a in arrays.values() if a.dtype.kind == "f")
    measured = content_bytes(msg)
    assert counted - 4 * zeros <= measured <= counted + TENSOR_OVERHEAD * len(arrays) + MESSAGE_OVERHEAD
    return measured, counted


def test_homo_bytes_per_client_round_agree_with_the_counts(cifar):
    strategy, grid, pairs, records, _ = run(run_config(cifar, "configs/fedlp-homo.yaml", "fedlp.p=0.5"))
    keys = strategy.keys
    assert len(pairs) == 6 and all(not reply.has_error() for _, reply in pairs)
    for ins, reply in pairs:
        r, pid = int(ins.content["config"]["server-round"]), strategy.nodes[ins.metadata.dst_node_id].partition_id
        down, _ = wire_check(ins, keys, strategy.global_arrays)  # downloads carry the full model
        wire_check(reply, kept_keys(5, r, pid, keys, 0.5), strategy.global_arrays)
        assert 0.99 <= down / (4 * 551_466) <= 1.01  # the paper's count (no buffers) vs measured
    assert records[2]["rejected_replies"] == 0 and 0 < records[2]["fedlp_uploaded_share"] < 1
    sent = [(i, r) for i, r in pairs if i.content["config"]["server-round"] == 2]
    assert records[2]["bytes_down"] == sum(content_bytes(i) for i, _ in sent)
    assert records[2]["bytes_up"] == sum(content_bytes(r) for _, r in sent)


def test_hetero_bytes_per_client_round_agree_with_the_counts_and_heads_stay_home(cifar):
    rc = run_config(cifar, "configs/fedlp-hetero.yaml", "sampling.fraction_evaluate=1")
    strategy, grid, pairs, records, _ = run(rc, nodes=4)
    paper = level_shared_params()
    levels = set()
    for ins, reply in pairs:
        node = ins.metadata.dst_node_id
        level = strategy.node_level(node)
        levels.add(level)
        assert ins.content["config"]["fedlp-level"] == level
        down, _ = wire_check(ins, strategy.level_keys[level], strategy.global_arrays)
        up, _ = wire_check(reply, strategy.level_keys[level], strategy.global_arrays)
        # per client-round against the paper's count (shared parameters down + up, no buffers)
        assert 1.0 <= (down + up) / (2 * 4 * paper[level]) <= 1.05
        head = grid.contexts[node].state["fedlp-head"] if level < 5 else None
        assert level == 5 or set(head.keys()) == {"private_fc1.weight", "private_fc1.bias",
                                                  "private_fc2.weight", "private_fc2.bias"}
    assert len(levels) >= 2
    for msg in grid.sent:  # evaluation messages too: shared entries only
        if msg.metadata.message_type == MessageType.EVALUATE:
            assert set(msg.content["arrays"].keys()) == set(strategy.level_keys[strategy.node_level(msg.metadata.dst_node_id)])
    everything = [m for m in grid.sent if "arrays" in m.content] + [r for _, r in pairs]
    assert not any(k.startswith("private_") for m in everything for k in m.content["arrays"].keys())
    last = records[2]
    assert last["rejected_replies"] == 0 and last["failed_replies"] == 0
    assert set(last["fedlp_val_accuracy_by_level"]) == {str(c) for c in levels}
    assert set(last["fedlp_train_flops_per_example_by_level"]) == {str(c) for c in levels}
    flops = last["fedlp_train_flops_per_example_by_level"]
    assert all(flops[str(a)] < flops[str(b)] for a, b in zip(sorted(levels), sorted(levels)[1:]))


def test_entries_nobody_sent_keep_their_value(cifar):
    strategy, _, pairs, records, initial = run(run_config(cifar, "configs/fedlp-homo.yaml", "fedlp.p=0.2"), rounds=1)
    sent = set().union(*(kept_keys(5, 1, strategy.nodes[i.metadata.dst_node_id].partition_id, strategy.keys, 0.2)
                         for i, _ in pairs))
    assert 0 < len(sent) < len(strategy.keys) and records[1]["fedlp_entries_unsent"] == len(strategy.keys) - len(sent)
    for k in strategy.keys:  # sent entries moved (they were trained), the others kept their value
        assert np.array_equal(strategy.global_arrays[k], initial[k]) == (k not in sent), k


def test_homo_with_p_1_is_fedavg(cifar):
    fedlp, *_ = run(run_config(cifar, "configs/fedlp-homo.yaml", "fedlp.p=1.0"), rounds=1)
    fedavg, *_ = run(run_config(cifar, "configs/fedavg.yaml", "model.name=fedlp-cnn client.optimizer=adam "
                                                          "client.lr=0.001"), rounds=1)
    for k, v in fedavg.global_arrays.items():
        np.testing.assert_array_equal(fedlp.global_arrays[k], v)


def test_replies_with_other_key_sets_are_rejected(cifar):
    def drop_one(ins, reply):
        arrays = dict(reply.content["arrays"].items())
        arrays.pop(next(iter(arrays)), None) if arrays else arrays.update(extra=Array(np.zeros(1, np.float32)))
        reply.content["arrays"] = ArrayRecord(arrays)
        return reply

    strategy, _, _, records, initial = run(run_config(cifar, "configs/fedlp-homo.yaml", "fedlp.p=0.7"), rounds=1, fails=True,
                                           tamper=drop_one)
    assert records[1]["rejected_replies"] == 3 and "train_num_nodes" not in records[1]
    assert all(np.array_equal(strategy.global_arrays[k], initial[k]) for k in initial)

    def add_head(ins, reply):
        arrays = dict(reply.content["arrays"].items())
        arrays["private_fc2.bias"] = Array(np.zeros(10, np.float32))
        reply.content["arrays"] = ArrayRecord(arrays)
        return reply

    _, _, _, records, _ = run(run_config(cifar, "configs/fedlp-hetero.yaml"), rounds=1, tamper=add_head, fails=True)
    assert records[1]["rejected_replies"] == 3


def level_1_node(cifar, keep_head):
    """A level-1 run config, a message factory (same shared entries every round) and a decoder of
    train replies."""
    rc = run_config(cifar, "configs/fedlp-hetero.yaml",
                    f"fedlp.preferred_level=1 fedlp.preference_weight=1.0 fedlp.keep_head={str(keep_head).lower()}")
    exp = experiment_from_run_config(rc)
    assert exp.fedlp.keep_head is keep_head
    global_arrays = {k: v.numpy() for k, v in new_model(exp).state_dict().items()}
    keys = build_strategy(exp).level_keys[1]
    payload = pack({k: global_arrays[k] for k in keys})

    def msg(server_round=1, kind=MessageType.TRAIN):
        cfg = ConfigRecord({"server-round": server_round, "fedlp-level": 1})
        return Message(RecordDict({"arrays": payload, "config": cfg}), dst_node_id=101, message_type=kind)

    def decode(reply):
        return unpack(reply.content["arrays"], expected_of({k: global_arrays[k] for k in keys}))

    return rc, keys, msg, decode


def test_private_head_persists_in_the_node_state(cifar):
    rc, keys, train_msg, decode = level_1_node(cifar, keep_head=True)
    ctx, fresh = make_context(rc, 0, 3), make_context(rc, 0, 3)
    first = decode(client_app(train_msg(), ctx))
    head = {k: v.numpy().copy() for k, v in ctx.state["fedlp-head"].items()}
    second = decode(client_app(train_msg(), ctx))
    again = decode(client_app(train_msg(), fresh))
    assert set(first) == set(keys)
    assert all(np.array_equal(first[k], again[k]) for k in first)  # same start, same result
    assert any(not np.array_equal(first[k], second[k]) for k in first)  # the trained head carried over
    assert any(not np.array_equal(head[k], v.numpy()) for k, v in ctx.state["fedlp-head"].items())
    wrong = train_msg()
    wrong.content["config"]["fedlp-level"] = 3
    with pytest.raises(ValueError, match="server says this node .* has level 3, its own draw says 1"):
        client_app(wrong, make_context(rc, 0, 3))


def test_private_head_restarts_every_training_round_by_default(cifar):
    rc, keys, msg, decode = level_1_node(cifar, keep_head=False)
    ctx = make_context(rc, 0, 3)
    first = decode(client_app(msg(1), ctx))
    second = decode(client_app(msg(1), ctx))
    assert all(np.array_equal(first[k], second[k]) for k in keys)  # the trained head was not reused
    # round 2 starts from the same initial head whether the node trained before or not
    later = decode(client_app(msg(2), ctx))
    fresh = decode(client_app(msg(2), make_context(rc, 0, 3)))
    assert all(np.array_equal(later[k], fresh[k]) for k in keys)
    assert any(not np.array_equal(later[k], first[k]) for k in keys)  # other round, other batches

    def val_loss(server_round, context):
        return client_app(msg(server_round, MessageType.EVALUATE), context).content["metrics"]["loss"]

    # evaluating round 2 uses the head trained in round 2; round 3 (not trained) the initial head
    assert ctx.state["fedlp-head-meta"]["round"] == 2
    untrained = val_loss(3, make_context(rc, 0, 3))
    assert val_loss(3, ctx) == untrained != val_loss(2, ctx)


@pytest.mark.parametrize("weighted, expected", [(True, 3.25), (False, 2.5)])
def test_weighted_and_unweighted_averaging(cifar, weighted, expected):
    rc = run_config(cifar, "configs/fedlp-homo.yaml", f"fedlp.p=1.0 fedlp.weighted={str(weighted).lower()}")
    strategy = build_strategy(experiment_from_run_config(rc))
    assert isinstance(strategy, FedLPHomo) and not isinstance(strategy, FedLPHetero)
    strategy.global_arrays = {k: v.numpy() for k, v in new_model(experiment_from_run_config(rc)).state_dict().items()}
    strategy.nodes = {5: NodeInfo(0, 2, 100, 0), 6: NodeInfo(1, 2, 100, 0)}
    strategy.server_round = 1

    def reply(node, value, n):
        ins = Message(RecordDict({}), dst_node_id=node, message_type="train")
        arrays = ArrayRecord({k: Array(np.full_like(v, value)) for k, v in strategy.global_arrays.items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})}), reply_to=ins)

    arrays, _ = strategy.aggregate_train(1, [reply(5, 1.0, 10), reply(6, 4.0, 30)])
    assert float(arrays["conv1.weight"].numpy().flat[0]) == pytest.approx(expected)
