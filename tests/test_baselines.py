"""Pruning baselines through the real strategies and ClientApp (in process): masks, bytes, schedules."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from benchmarks.inprocess import InProcessGrid
from fedprune.experiment import experiment_from_run_config
from fedprune.task import new_model
from client_app.app import app as client_app
from fedprune.protocol import STYPE, unpack
from pruning.codec import encode
from pruning.scores import synflow_scores
from pruning.selection import global_topk
from strategies import RunFailed, build_strategy


def run(run_config, method, rounds=2, nodes=3, extra="", tamper=None, fails=False):
    cfg = {**run_config, "experiment": f"configs/{method}.yaml", "num-server-rounds": rounds,
           "overrides": run_config["overrides"] + " " + extra}
    exp = experiment_from_run_config(cfg)
    strategy = build_strategy(exp)
    grid = InProcessGrid(cfg, nodes, tamper=tamper)
    records = []
    start = lambda: strategy.start(grid, ArrayRecord(new_model(exp).state_dict()), rounds,  # noqa: E731
                                   on_round=records.append,
                                   evaluate_fn=lambda r, a: MetricRecord({"test_accuracy": 0.0}))
    if fails:
        with pytest.raises(RunFailed):
            start()
    else:
        start()
    return strategy, records, grid


@pytest.mark.parametrize("method", ["random", "magnitude", "snip", "synflow", "gradual-magnitude"])
def test_every_baseline_reaches_its_density_and_keeps_pruned_weights_at_zero(tiny_run_config, method):
    strategy, records, _ = run(tiny_run_config, method, rounds=2,
                               extra="pruning.density=0.2 pruning.warmup_rounds=1 pruning.end_round=2")
    assert records[-1]["density"] == pytest.approx(0.2, abs=1e-3)
    for name, mask in strategy.masks.items():
        assert not strategy.global_arrays[name][~mask].any()
    assert records[-1]["train_num_nodes"] == 3 and records[-1]["rejected_replies"] == 0
    assert records[-1]["train_flops"] > 0 and records[-1]["train_peak_memory"] > 0


def test_the_mask_travels_only_when_the_node_lacks_it(tiny_run_config):
    _, records, grid = run(tiny_run_config, "random", rounds=2)
    sent = [(m.metadata.message_type, m.content["config"]["server-round"], "mask" in m.content)
            for m in grid.sent if m.metadata.message_type in ("train", "evaluate")]
    assert all(flag for kind, rnd, flag in sent if kind == "train" and rnd == 1)
    assert not any(flag for kind, rnd, flag in sent if kind == "evaluate" or rnd == 2)
    assert records[2]["bytes_down"] < records[1]["bytes_down"]


@pytest.mark.parametrize("value_dtype, bound", [("float32", 1 / 7), ("float16", 1 / 12)])
def test_bytes_per_round_at_density_01_against_dense(tiny_run_config, value_dtype, bound):
    _, dense, _ = run(tiny_run_config, "fedavg", rounds=2)
    _, sparse, _ = run(tiny_run_config, "random", rounds=2,
                       extra=f"pruning.density=0.1 transport.value_dtype={value_dtype}")
    for r in (1, 2):
        ratio = (sparse[r]["bytes_down"] + sparse[r]["bytes_up"]) / (dense[r]["bytes_down"] + dense[r]["bytes_up"])
        assert ratio <= bound, (r, ratio)


def test_snip_scores_in_a_round_before_training(tiny_run_config):
    strategy, records, grid = run(tiny_run_config, "snip", rounds=1, extra="pruning.density=0.3")
    kinds = [m.metadata.message_type for m in grid.sent]
    assert kinds.index("query.snip") < kinds.index("train")
    assert records[0]["bytes_up"] > 0 and records[0]["mask_changed"] == 1
    assert records[0]["density"] == pytest.approx(0.3, abs=1e-3)


def test_magnitude_prunes_after_the_warmup(tiny_run_config):
    _, records, _ = run(tiny_run_config, "magnitude", rounds=3, extra="pruning.warmup_rounds=2")
    assert [r["density"] for r in records] == [1.0, 1.0, pytest.approx(0.1, abs=1e-3), pytest.approx(0.1, abs=1e-3)]
    assert [r["mask_changed"] for r in records] == [0, 0, 1, 0]


def test_gradual_schedule_falls_monotonically_to_the_target(tiny_run_config):
    _, records, _ = run(tiny_run_config, "gradual-magnitude", rounds=4,
                        extra="pruning.start_round=1 pruning.end_round=3 pruning.density=0.1")
    densities = [r["density"] for r in records]
    assert densities[0] == 1.0 and all(a > b for a, b in zip(densities[:4], densities[1:4]))
    assert densities[3] == pytest.approx(0.1, abs=1e-3) and densities[4] == densities[3]


def test_a_reply_under_another_mask_is_rejected(tiny_run_config):
    def foreign_mask(ins, reply):
        name = "classifier.1.weight"
        shape = reply.content["arrays"][name].shape
        weight = np.ones(shape, np.float32)
        forged = Array(dtype="float32", shape=shape, stype=STYPE,  # carries an all-ones mask
                       data=encode(weight, np.ones(shape, bool), encoding="bitmask"))
        arrays = ArrayRecord({**{k: v for k, v in reply.content["arrays"].items() if k != name}, name: forged})
        return Message(RecordDict({"arrays": arrays, "metrics": reply.content["metrics"]}), reply_to=ins)

    strategy, records, _ = run(tiny_run_config, "random", rounds=1, tamper=foreign_mask, fails=True)
    assert records[1]["rejected_replies"] == 3


def test_a_reply_from_a_stale_mask_version_is_rejected(tiny_run_config):
    def stale(ins, reply):
        metrics = MetricRecord({**dict(reply.content["metrics"]), "mask-version": 0})
        return Message(RecordDict({"arrays": reply.content["arrays"], "metrics": metrics}), reply_to=ins)

    _, records, _ = run(tiny_run_config, "random", rounds=1, tamper=stale, fails=True)
    assert records[1]["rejected_replies"] == 3


def test_synflow_is_iterative_and_keeps_every_layer_where_single_shot_disconnects_one(tiny_run_config):
    strategy, _, _ = run(tiny_run_config, "synflow", rounds=1, extra="pruning.density=0.01")
    assert strategy.experiment.pruning.synflow_iterations == 100
    assert all(m.any() for m in strategy.masks.values())
    initial = new_model(strategy.experiment)  # what the mask was chosen on, before round 1
    single = global_topk(synflow_scores(initial, strategy.input_shape, strategy.names), 0.01)
    assert not all(m.any() for m in single.values())  # the old single-shot baseline empties a layer


def test_snip_scores_the_union_gradient(tiny_run_config):
    replies = []
    strategy, _, grid = run(tiny_run_config, "snip", rounds=1, extra="pruning.density=0.1")
    initial = {k: v.numpy() for k, v in new_model(strategy.experiment).state_dict().items()}
    queries = [m for m in grid.sent if m.metadata.message_type == "query.snip"]
    for q in queries:
        replies.append(client_app(q, grid.contexts[q.metadata.dst_node_id]))
    expected = {k: (initial[k].shape, np.dtype(np.float32)) for k in strategy.names}
    grads = [(unpack(r.content["arrays"], expected), r.content["metrics"]["num-examples"]) for r in replies]
    assert any((g < 0).any() for g, _ in grads for g in g.values())  # signed gradients, not |g*w|
    total = sum(n for _, n in grads)
    union = {k: np.abs(sum(g[k].astype(np.float64) * n for g, n in grads) / total * initial[k]) for k in strategy.names}
    want = global_topk({k: torch.from_numpy(v) for k, v in union.items()}, 0.1)
    assert all(np.array_equal(strategy.masks[k], want[k].numpy()) for k in strategy.names)


def test_gradual_magnitude_prunes_every_layer_to_the_schedules_density(tiny_run_config):
    strategy, records, _ = run(tiny_run_config, "gradual-magnitude", rounds=3,
                               extra="pruning.start_round=1 pruning.end_round=3 pruning.density=0.2")
    for name, mask in strategy.masks.items():
        assert mask.mean() == pytest.approx(0.2, abs=1.0 / mask.size + 1e-9), name
