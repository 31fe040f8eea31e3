"""FedTiny through the real strategy and ClientApp (in process, tiny MNIST-format data, cnn-bn):
adaptive BatchNorm selection, progressive prune-and-grow from top-K gradients, the memory budget,
bad replies, held-out server images and resume."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.inprocess import InProcessGrid
from fedprune import fedtiny, protocol
from fedprune.data import load_dataset
from fedprune.experiment import DatasetConfig, ExperimentError, PartitionConfig, experiment_from_run_config
from fedprune.partition import client_indices
from fedprune.seeding import numpy_rng
from fedprune.task import new_model
from pruning.prune_grow import mean_sparse
from pruning.selection import keep_count, layerwise_topk
from strategies import RunFailed, build_strategy
from strategies.fedtiny import FedTiny
from tests.test_resume import whole_and_resumed


def config(tiny_mnist, extra="", rounds=1):
    return {"experiment": "configs/fedtiny.yaml", "num-server-rounds": rounds, "seed": 7, "run-name": "",
            "output-dir": "",
            "overrides": f"dataset.name=mnist dataset.root={tiny_mnist} partition.scheme=iid client.batch_size=16 "
                         f"pruning.density=0.1 fedtiny.delta=1 fedtiny.t_end=3 fedtiny.adjust_rate=0.3 {extra}"}


class Grid(InProcessGrid):
    """The in-process federation, keeping every reply; ``tamper(grid, partition, instruction, reply)``
    rewrites the replies to messages of type ``kind``."""

    def __init__(self, run_config, nodes, kind=None, tamper=None):
        super().__init__(run_config, nodes)
        self.kind, self.rewrite, self.replies = kind, tamper, []
        self.partition = {nid: int(c.node_config["partition-id"]) for nid, c in self.contexts.items()}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = [self.rewrite(self, self.partition[m.metadata.dst_node_id], m, r)
                   if self.rewrite and m.metadata.message_type == self.kind else r
                   for m, r in zip(messages, super().send_and_receive(messages, timeout=timeout))]
        self.replies += list(zip(messages, replies))
        return replies


def run(run_config, nodes=3, kind=None, tamper=None, fails=None):
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    exp = experiment_from_run_config(run_config)
    strategy, grid = build_strategy(exp), Grid(run_config, nodes, kind, tamper)
    records, checkpoints = [], []
    start = lambda: strategy.start(grid, ArrayRecord(new_model(exp).state_dict()), exp.num_server_rounds,  # noqa: E731
                                   on_round=records.append, on_checkpoint=checkpoints.append,
                                   evaluate_fn=lambda r, a: MetricRecord({"test_accuracy": 0.0}))
    if fails:
        with pytest.raises(RunFailed, match=fails):
            start()
    else:
        start()
    return strategy, records, checkpoints, grid


def decoded(record):
    """A record's entries as numpy arrays, decoded as declared."""
    return protocol.unpack(record, {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in record.items()})


def top_k(reply, layer):
    """A top-K reply's (positions, gradients, num-examples) for ``layer``."""
    arrays = decoded(reply.content["arrays"])
    return (arrays[fedtiny.INDEX.format(layer)].astype(np.int64), arrays[fedtiny.GRAD.format(layer)],
            reply.content["metrics"]["num-examples"])


def exchanged(grid, kind):
    return [(m, r) for m, r in grid.replies if m.metadata.message_type == kind]


def replace_arrays(msg, reply, key, arrays: dict):
    """The reply with ``arrays`` (name -> numpy) in place of record ``key``'s entries."""
    record = ArrayRecord({**{k: v for k, v in reply.content[key].items()}, **{k: Array(v) for k, v in arrays.items()}})
    return Message(RecordDict({**{k: v for k, v in reply.content.items() if k != key}, key: record}), reply_to=msg)


@pytest.fixture(scope="module")
def abns(tiny_mnist):
    """Three rounds on three nodes: selection before round 1, adjustments after rounds 1 and 2."""
    return run(config(tiny_mnist, rounds=3))


def test_candidates_are_recalibrated_then_evaluated_before_training_and_the_best_is_kept(abns):
    strategy, records, _, grid = abns
    kinds = [m.metadata.message_type for m, _ in grid.replies]
    assert kinds.index("query.bn_stats") < kinds.index("query.candidate_loss") < kinds.index("train")
    assert kinds.count("query.bn_stats") == kinds.count("query.candidate_loss") == 3
    losses = records[0]["fedtiny_candidate_losses"]
    assert len(losses) == 5 and records[0]["fedtiny_chosen"] == int(np.argmin(losses)) == strategy.chosen
    assert records[0]["bytes_up_bn_stats"] > 0 and records[0]["bytes_up_candidate_loss"] > 0
    assert all(abs(d - 0.1) <= 0.002 for d in records[0]["fedtiny_candidate_densities"])
    assert records[0]["density"] == records[0]["fedtiny_candidate_densities"][strategy.chosen]


def test_the_batchnorm_statistics_are_the_example_weighted_mean_of_the_clients(abns):
    strategy, records, checkpoints, grid = abns
    names = strategy.bn_names
    expected = {k: ((v.shape[0],), np.dtype(np.float32)) for k, v in checkpoints[0]["arrays"].items() if k in names}
    replies = [r for _, r in exchanged(grid, "query.bn_stats")]
    weights = [r.content["metrics"]["num-examples"] for r in replies]
    sent = exchanged(grid, "query.candidate_loss")[0][0]
    for i in range(5):
        stats = [protocol.unpack(r.content[fedtiny.BN.format(i)], expected) for r in replies]
        mean = {k: sum(s[k].astype(np.float64) * w for s, w in zip(stats, weights)) / sum(weights) for k in names}
        aggregated = protocol.unpack(sent.content[fedtiny.BN.format(i)], expected)
        assert all(np.allclose(aggregated[k], mean[k], rtol=1e-6, atol=1e-7) for k in names)
        assert not any(np.allclose(aggregated[k], stats[0][k]) for k in names if k.endswith("running_mean"))
        if i == strategy.chosen:  # the global model starts with the chosen candidate's statistics
            assert all(np.array_equal(checkpoints[0]["arrays"][k].numpy(), aggregated[k]) for k in names)


def test_the_server_images_are_held_out_from_every_client_and_follow_the_partition_seed(tiny_mnist):
    dataset, partition = DatasetConfig("mnist", str(tiny_mnist)), PartitionConfig(scheme="iid", seed=3)
    labels = load_dataset("mnist", str(tiny_mnist)).train_y.numpy()
    held = fedtiny.server_shot_indices(labels, 3, 4)
    assert np.bincount(labels[held]).tolist() == [4] * 10
    assert np.array_equal(held, fedtiny.server_shot_indices(labels, 3, 4))
    assert not np.array_equal(held, fedtiny.server_shot_indices(labels, 4, 4))
    server_x, _ = fedtiny.server_shots(dataset, partition, 4)
    seen = 0
    for pid in range(3):
        tx, _, vx, _ = fedtiny.client_data(dataset, partition, 4, pid, 3)
        train, val = client_indices(labels, partition, pid, 3)
        assert len(tx) == len(np.setdiff1d(train, held)) and len(vx) == len(np.setdiff1d(val, held))
        rows = {x.numpy().tobytes() for x in torch.cat([tx, vx])}
        assert not rows & {x.numpy().tobytes() for x in server_x}
        seen += len(tx) + len(vx)
    assert seen + len(held) == len(labels)


def test_top_k_gradients_regrow_each_layer_at_constant_density_after_the_adjustment_rounds(abns):
    strategy, records, checkpoints, grid = abns
    topk = exchanged(grid, "query.topk_grads")
    assert sorted({m.content["config"]["server-round"] for m, _ in topk}) == [1, 2]  # t_end = 3: alpha_3 = 0
    assert [r["mask_changed"] for r in records] == [1, 1, 1, 0]
    for t in (1, 2):
        before, after = checkpoints[t - 1]["masks"], checkpoints[t]["masks"]
        replies = [r for m, r in topk if m.content["config"]["server-round"] == t]
        assert records[t]["bytes_up_topk_grads"] * 10 < records[t]["fedtiny_dense_gradient_bytes"]
        rate = 0.3 / 2 * (1 + np.cos(np.pi * t / 3))
        for name, old in before.items():
            old, new = old.numpy(), after[name].numpy()
            assert new.sum() == old.sum()
            limit = int(np.ceil(rate * old.sum()))
            lists = []
            for r in replies:
                lists.append(top_k(r, name))
                assert 0 < lists[-1][0].size <= limit and not old.reshape(-1)[lists[-1][0]].any()
            index, mean = mean_sparse(lists)
            grown = np.flatnonzero(new & ~old)
            best = index[np.argsort(-np.abs(mean), kind="stable")[:grown.size]]
            assert 0 < grown.size <= limit and set(grown) == set(best)


@pytest.mark.parametrize("selection", ["no-recalibration", "random"])
def test_the_selection_ablations(tiny_mnist, selection):
    strategy, records, _, grid = run(config(tiny_mnist, f"fedtiny.selection={selection} fedtiny.adjust_rate=0"))
    kinds = [m.metadata.message_type for m, _ in grid.replies]
    losses = records[0]["fedtiny_candidate_losses"]
    if selection == "no-recalibration":
        assert "query.bn_stats" not in kinds and strategy.chosen == int(np.argmin(losses))
        assert all("arrays" in m.content for m, _ in exchanged(grid, "query.candidate_loss"))
    else:
        assert strategy.chosen == int(numpy_rng(7, "fedtiny-random-candidate").integers(5))
    assert "query.topk_grads" not in kinds and records[1]["mask_changed"] == 0  # adjust_rate 0: static mask


@pytest.mark.parametrize("baseline", ["magnitude", "snip"])
def test_the_authors_baselines_prune_the_warmed_up_model_per_layer_on_the_server(tiny_mnist, baseline):
    rc = config(tiny_mnist, f"fedtiny.baseline={baseline} fedtiny.adjust_rate=0")
    strategy, records, _, grid = run(rc)
    kinds = [m.metadata.message_type for m, _ in grid.replies]
    assert "query.bn_stats" not in kinds and "query.candidate_loss" not in kinds and "train" in kinds
    assert all(int(m.sum()) == keep_count(0.1, m.size) for m in strategy.masks.values())  # uniform per layer
    exp = experiment_from_run_config(rc)
    warmed = FedTiny(exp)
    warmed.global_arrays = {k: v.numpy() for k, v in new_model(exp).state_dict().items()}  # as run() starts
    warmed.warm_up()
    magnitude = {k: m.numpy() for k, m in layerwise_topk(warmed.magnitudes(), 0.1).items()}
    same = all(np.array_equal(strategy.masks[k], magnitude[k]) for k in magnitude)
    assert same == (baseline == "magnitude")
    if baseline == "snip":
        assert all(np.array_equal(strategy.masks[k], m) for k, m in warmed.server_pruned().items())
    assert "fedtiny_candidate_losses" not in records[0] and records[1]["mask_changed"] == 0


def test_bad_batchnorm_statistics_are_rejected_and_the_rest_averaged(tiny_mnist):
    def forge(grid, partition, msg, reply):
        key = fedtiny.BN.format(0)
        stats = decoded(reply.content[key])
        name = next(k for k in stats if k.endswith("running_var"))
        if partition == 0:
            stats[name][0] = -1.0
        elif partition == 1:
            stats[name][1] = np.nan
        elif partition == 2:
            stats[name] = stats[name][:-1]
        else:
            return reply
        return replace_arrays(msg, reply, key, {name: stats[name]})

    strategy, records, _, grid = run(config(tiny_mnist, "fedtiny.adjust_rate=0"), nodes=4, kind="query.bn_stats",
                                     tamper=forge)
    assert records[0]["rejected_replies"] == 3
    honest = [r for m, r in exchanged(grid, "query.bn_stats") if grid.partition[m.metadata.dst_node_id] == 3][0]
    sent = decoded(exchanged(grid, "query.candidate_loss")[0][0].content[fedtiny.BN.format(0)])
    assert all(np.array_equal(sent[k], decoded(honest.content[fedtiny.BN.format(0)])[k]) for k in sent)


def test_bad_top_k_lists_are_rejected_and_only_the_valid_one_moves_the_mask(tiny_mnist):
    layer = "classifier.1.weight"

    def forge(grid, partition, msg, reply):
        index, grads, _ = top_k(reply, layer)
        index, grads = index.astype(np.int32), grads.copy()
        if partition == 0:
            index[1] = index[0]                                    # a repeated position
        elif partition == 1:
            index[-1] = 128 * 784 * 100                            # out of range
        elif partition == 2:                                       # one entry more than n_l
            index, grads = np.append(index, index[-1] + 1).astype(np.int32), np.append(grads, np.float32(1))
        elif partition == 3:
            grads[0] = np.inf
        elif partition == 4:                                       # a position the mask keeps
            node = msg.metadata.dst_node_id
            sent = [m for m, _ in grid.replies if m.metadata.dst_node_id == node and "mask" in m.content]
            record = sent[-1].content["mask"]
            kept = np.flatnonzero(protocol.unpack_masks(record, {k: a.shape for k, a in record.items()})[layer])
            index = np.sort(np.append(index[1:], kept[0])).astype(np.int32)
        else:
            return reply
        return replace_arrays(msg, reply, "arrays", {fedtiny.INDEX.format(layer): index,
                                                     fedtiny.GRAD.format(layer): grads})

    strategy, records, checkpoints, grid = run(config(tiny_mnist, "fedtiny.t_end=2"), nodes=6,
                                               kind="query.topk_grads", tamper=forge)
    assert records[1]["rejected_replies"] == 5 and records[1]["fedtiny_topk_nodes"] == 1
    honest = [r for m, r in exchanged(grid, "query.topk_grads") if grid.partition[m.metadata.dst_node_id] == 5][0]
    old, new = checkpoints[0]["masks"][layer].numpy(), checkpoints[1]["masks"][layer].numpy()
    grown = np.flatnonzero(new & ~old)
    assert grown.size and set(grown) <= set(top_k(honest, layer)[0].tolist())


def test_a_memory_budget_below_the_measured_step_stops_the_run_before_round_1(tiny_mnist):
    _, records, _, grid = run(config(tiny_mnist, "fedtiny.memory_budget=1000"),
                              fails=r"memory_budget: a client's training step at density 0.09\d+ takes \d+ bytes")
    assert "train" not in [m.metadata.message_type for m, _ in grid.replies] and not records


def test_a_training_reply_over_the_budget_is_rejected(tiny_mnist):
    def forge(grid, partition, msg, reply):
        metrics = MetricRecord({**dict(reply.content["metrics"]), "peak-memory": 32_000_001.0})
        return Message(RecordDict({**{k: v for k, v in reply.content.items() if k != "metrics"}, "metrics": metrics}),
                       reply_to=msg)

    _, records, _, _ = run(config(tiny_mnist, "fedtiny.adjust_rate=0"), kind="train", tamper=forge,
                           fails="no training reply was accepted")
    assert records[1]["rejected_replies"] == 3 and records[1]["memory_budget"] == 32_000_000


def test_a_client_refuses_to_train_over_the_budget(tiny_mnist, monkeypatch):
    monkeypatch.setattr(FedTiny, "check_budget", lambda self: None)  # past the server's own check
    _, records, _, grid = run(config(tiny_mnist, "fedtiny.memory_budget=1000 fedtiny.adjust_rate=0"),
                              fails="no training reply was accepted")
    assert records[1]["failed_replies"] == 3
    assert all("MemoryBudgetExceeded" in r.error.reason for _, r in exchanged(grid, "train"))


def test_the_configuration_rules(tiny_mnist):
    for extra, key in [("model.name=cnn", "model.name"), ("partition.val_fraction=0", "partition.val_fraction"),
                       ("fedtiny.delta=4", "fedtiny.delta"), ("fedtiny.memory_budget=0", "fedtiny.memory_budget"),
                       ("fedtiny.baseline=snip fedtiny.selection=random", "fedtiny.selection")]:
        with pytest.raises(ExperimentError, match=key):
            experiment_from_run_config(config(tiny_mnist, extra))
    exp = experiment_from_run_config(config(tiny_mnist, "fedtiny.delta=4 fedtiny.adjust_rate=0"))
    assert exp.fedtiny.delta == 4  # a static mask needs no adjustment round


def test_a_killed_run_resumes_to_the_bitwise_same_final_model(tiny_mnist, tmp_path, monkeypatch):
    rc = config(tiny_mnist, rounds=2)
    whole, resumed = whole_and_resumed(rc, 3, tmp_path, monkeypatch, at_round=1)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    rows = [[json.loads(line) for line in (tmp_path / d / "rounds.jsonl").read_text().splitlines()]
            for d in ("whole", "killed")]
    assert [(r["mask_version"], r.get("fedtiny_grown")) for r in rows[0]] == \
           [(r["mask_version"], r.get("fedtiny_grown")) for r in rows[1]]
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["method"]
    assert state["adjustments"] == 2 and state["chosen"] == rows[0][0]["fedtiny_chosen"]
