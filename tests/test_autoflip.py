"""AutoFLIP through the real strategy and ClientApp (in process): exploration phase, guided hybrid
mask, server momentum, the physically smaller client model, validation of replies, the controls,
refresh and resume."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.inprocess import InProcessGrid, make_context
from client_app.app import app as client_app
from client_app.app import train_masked
from client_app.autoflip import explore_model, train_hybrid
from client_app.node import node_of
from fedprune import protocol
from fedprune.experiment import ExperimentError, experiment_from_run_config
from fedprune.task import new_model
from pruning.guidance import hybrid_masks, mean_deviation, normalize, select_units
from strategies import RunFailed, build_strategy
from tests.test_resume import whole_and_resumed

FAST = "autoflip.explore_epochs=2 autoflip.patience=1 sampling.fraction_evaluate=0"


class RecordingGrid(InProcessGrid):
    """Keeps every reply; ``tamper_query(instruction, reply)`` may rewrite the replies of query phases."""

    def __init__(self, *args, tamper_query=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tamper_query = tamper_query
        self.replies: list[tuple[Message, Message]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if self.tamper_query is not None:
            replies = [self.tamper_query(m, r) if m.metadata.message_type.startswith("query.explore") else r
                       for m, r in zip(messages, replies)]
        self.replies += list(zip(messages, replies))
        return replies


def run(run_config, rounds=1, nodes=3, extra="", tamper=None, tamper_query=None, fails=False):
    cfg = {**run_config, "experiment": "configs/autoflip.yaml", "num-server-rounds": rounds,
           "overrides": f"{run_config['overrides']} {FAST} {extra}"}
    exp = experiment_from_run_config(cfg)
    strategy = build_strategy(exp)
    grid = RecordingGrid(cfg, nodes, tamper=tamper, tamper_query=tamper_query)
    records, states = [], []
    start = lambda: strategy.start(grid, ArrayRecord(new_model(exp).state_dict()), rounds,  # noqa: E731
                                   on_round=records.append, on_checkpoint=states.append,
                                   evaluate_fn=lambda r, a: MetricRecord({"test_accuracy": 0.0}))
    if fails:
        with pytest.raises(RunFailed):
            start()
    else:
        start()
    return strategy, records, states, grid


def of_kind(grid, kind):
    return [(m, r) for m, r in grid.replies if m.metadata.message_type == kind]


def deviations(strategy, grid):
    expected = {k: (strategy.global_arrays[k].shape, np.dtype(np.float32)) for k in strategy.names}
    return [(protocol.unpack(r.content[protocol.DEVIATION], expected), r.content["metrics"]["num-examples"])
            for _, r in of_kind(grid, "query.explore")]


def fresh_context(grid, partition_id):
    """A new node for ``partition_id`` with the run config of ``grid``'s nodes."""
    return make_context(next(iter(grid.contexts.values())).run_config, partition_id, len(grid.contexts))


@pytest.fixture(scope="module")
def guided(tiny_mnist):
    """One guided AutoFLIP run of one round, shared by the tests that only read it."""
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # before the autouse fixture
    rc = {"experiment": "configs/autoflip.yaml", "seed": 7, "run-name": "", "output-dir": "",
          "overrides": f"dataset.name=mnist dataset.root={tiny_mnist} partition.scheme=iid client.batch_size=16"}
    return rc, run(rc)


def test_each_explorer_trains_its_own_copy_before_round_1_and_sends_its_deviation(guided):
    rc, (strategy, records, _, grid) = guided
    kinds = [m.metadata.message_type for m in grid.sent]
    assert kinds.count("query.explore") == 3 and kinds.index("query.explore") < kinds.index("train")
    devs = deviations(strategy, grid)
    assert all((d[k] >= 0).all() for d, _ in devs for k in d)
    assert not np.array_equal(devs[0][0]["features.3.weight"], devs[1][0]["features.3.weight"])
    # the last explorer, alone on a fresh node, sends exactly what it sent after the others explored
    msg, reply = of_kind(grid, "query.explore")[-1]
    alone = client_app(msg, fresh_context(grid, reply.content["metrics"]["partition-id"]))
    again = protocol.unpack(alone.content[protocol.DEVIATION], {k: (v.shape, v.dtype) for k, v in devs[-1][0].items()})
    assert all(np.array_equal(again[k], devs[-1][0][k]) for k in again)
    assert records[0]["bytes_up_explore"] > 0 and records[0]["autoflip_explorers"] == 3
    assert 1 <= records[0]["autoflip_explore_epochs"] <= 2 and records[0]["autoflip_explore_flops"] > 0


def test_the_mask_is_the_hybrid_cut_of_the_example_weighted_guidance(guided):
    _, (strategy, records, _, grid) = guided
    devs = deviations(strategy, grid)
    guidance = normalize(mean_deviation([{k: torch.from_numpy(v) for k, v in d.items()} for d, _ in devs],
                                        [n for _, n in devs]))
    units = select_units(guidance, strategy.structured, 0.2, 8)
    shapes = {k: v.shape for k, v in guidance.items()}
    want = hybrid_masks(guidance, 0.3, strategy.chain.unit_positions(units, shapes))
    assert all(np.array_equal(strategy.masks[k], want[k].numpy()) for k in want)
    assert strategy.structured == ["features.0.weight", "features.3.weight", "classifier.1.weight"]
    # every hidden layer lost floor(0.2 n) units and kept a multiple of 8 (or fewer, where the cut
    # removed all of a unit's positions); the classifier kept its 10 outputs
    assert all(kept <= width for kept, width in zip(records[0]["autoflip_units_kept"], (24, 48, 96)))
    assert records[0]["autoflip_units_kept"][3] == 10
    assert records[0]["density"] < 0.7
    for name, mask in strategy.masks.items():
        assert not strategy.global_arrays[name][~mask].any()


def test_a_client_trains_the_smaller_model_to_the_weights_masked_training_gives(guided):
    rc, (strategy, records, _, grid) = guided
    msg, reply = of_kind(grid, "train")[0]
    assert protocol.MASK in msg.content
    pid = reply.content["metrics"]["partition-id"]
    ctx = fresh_context(grid, pid)
    node = node_of(ctx)
    slim, dense = train_hybrid(msg, ctx, node), train_masked(msg, fresh_context(grid, pid), node)
    expected = protocol.expected_of(strategy.global_arrays)
    a = protocol.unpack(slim.content["arrays"], expected, strategy.masks)
    b = protocol.unpack(dense.content["arrays"], expected, strategy.masks)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # counted FLOPs scale with the mask's density either way; the smaller model runs fewer in
    # dense kernels (the record) and holds smaller activations
    assert slim.content["metrics"]["flops"] == pytest.approx(dense.content["metrics"]["flops"], rel=1e-3)
    assert slim.content["metrics"]["peak-memory"] < 0.9 * dense.content["metrics"]["peak-memory"]
    assert records[0]["autoflip_executed_flops_ratio"] < 0.75
    assert records[0]["autoflip_counted_flops_ratio"] < records[0]["autoflip_executed_flops_ratio"]


def test_the_server_applies_the_authors_momentum_update_and_keeps_it_masked(tiny_run_config):
    strategy, records, states, grid = run(tiny_run_config, rounds=2)
    beta = 0.9
    theta = {k: v.numpy().astype(np.float64) for k, v in states[0]["arrays"].items()}
    velocity = {}
    for server_round in (1, 2):
        replies = [r for m, r in of_kind(grid, "train") if m.content["config"]["server-round"] == server_round]
        arrays = [protocol.unpack(r.content["arrays"], protocol.expected_of(strategy.global_arrays), strategy.masks)
                  for r in replies]
        n = [r.content["metrics"]["num-examples"] for r in replies]
        for name in strategy.parameter_names:
            avg = sum(a[name].astype(np.float64) * w for a, w in zip(arrays, n)) / sum(n)
            velocity[name] = beta * velocity.get(name, 0.0) + (1 - beta) * (theta[name] - avg)
            theta[name] = theta[name] - velocity[name]
        got = states[server_round]
        for name in strategy.parameter_names:
            np.testing.assert_allclose(got["arrays"][name].numpy(), theta[name], rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(got["method"]["velocity"][name].numpy(), velocity[name], rtol=1e-4,
                                       atol=1e-7)
    for name, mask in strategy.masks.items():
        assert not strategy.global_arrays[name][~mask].any() and not strategy.velocity[name][~mask].any()


def _forged(field):
    """A tamper that rewrites one entry of the deviation record, or the metric ``field``."""
    def tamper(ins, reply):
        content = dict(reply.content.items())
        if field == "explore-epochs":
            content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), field: 99})
        elif field == "missing":
            del content[protocol.DEVIATION]
        else:
            record = reply.content[protocol.DEVIATION]
            dev = protocol.unpack(record, {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in record.items()})
            dev["features.3.weight"] = {"negative": -dev["features.3.weight"] - 1,
                                        "nan": dev["features.3.weight"] * np.nan,
                                        "shape": dev["features.3.weight"][:1]}[field]
            content[protocol.DEVIATION] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in dev.items()})
        return Message(RecordDict(content), reply_to=ins)
    return tamper


def tampering(*defects):
    """Rewrite the first exploration replies, one defect each."""
    pending = list(defects)
    return lambda ins, reply: _forged(pending.pop(0))(ins, reply) if pending else reply


def test_a_bad_exploration_reply_is_rejected_and_counted(tiny_run_config):
    strategy, records, _, _ = run(tiny_run_config, tamper_query=tampering("negative", "nan"))
    assert records[0]["rejected_replies"] == 2 and records[0]["autoflip_explorers"] == 1
    assert strategy.masks is not None and records[1]["train_num_nodes"] == 3


def test_without_a_valid_exploration_the_run_stops_before_round_1(tiny_run_config):
    strategy, records, _, grid = run(tiny_run_config, tamper_query=tampering("missing", "shape", "explore-epochs"),
                                     fails=True)
    assert records == [] and strategy.round_stats["rejected_replies"] == 3
    assert not of_kind(grid, "train")


def test_the_warm_started_dense_control_starts_from_the_mean_of_the_explored_models(tiny_run_config):
    strategy, records, states, grid = run(tiny_run_config, extra="autoflip.prune=false")
    assert strategy.masks is None and records[0]["density"] == 1.0 and records[0]["bytes_up_explore"] > 0
    explored = [(protocol.unpack(r.content["arrays"], protocol.expected_of(strategy.global_arrays)),
                 r.content["metrics"]["num-examples"]) for _, r in of_kind(grid, "query.explore")]
    total = sum(n for _, n in explored)
    for name, value in states[0]["arrays"].items():
        want = sum(a[name].astype(np.float64) * n for a, n in explored) / total
        np.testing.assert_allclose(value.numpy(), want, rtol=1e-6, atol=1e-7)
    cold, cold_records, _, cold_grid = run(tiny_run_config, extra="autoflip.prune=false autoflip.warm_start=false")
    assert not of_kind(cold_grid, "query.explore") and cold_records[0]["bytes_up"] == 0


def test_the_random_control_has_the_guided_masks_shape_at_other_positions(guided):
    rc, (strategy, records, _, _) = guided
    other, other_records, _, _ = run(rc, extra="autoflip.mask=random")
    assert other_records[0]["autoflip_units_kept"] == records[0]["autoflip_units_kept"]
    for name, mask in strategy.masks.items():
        assert other.masks[name].sum() == mask.sum()
    assert not np.array_equal(other.masks["features.3.weight"], strategy.masks["features.3.weight"])


def test_refresh_chooses_the_mask_again_from_the_rounds_deviations(tiny_run_config):
    def negative(ins, reply):  # partition 2 sends a negative deviation every round
        return _forged("negative")(ins, reply) if reply.content["metrics"]["partition-id"] == 2 else reply

    strategy, records, _, grid = run(tiny_run_config, rounds=2, extra="autoflip.refresh=true", tamper=negative)
    assert all(protocol.DEVIATION in r.content for _, r in of_kind(grid, "train") if not r.has_error())
    assert [r["rejected_replies"] for r in records[1:]] == [1, 1]
    assert records[2]["mask_version"] >= 2 and records[1]["mask_changed"] == 1


def test_exploration_stops_after_patience_epochs_without_improvement(tiny_run_config, monkeypatch):
    exp_cfg = {**tiny_run_config, "experiment": "configs/autoflip.yaml"}
    node = node_of(make_context(exp_cfg, 0, 3))
    model = new_model(node.experiment)
    monkeypatch.setattr("client_app.autoflip.evaluate", lambda *a, **k: (1.0, 0.0))
    _, run_epochs, _ = explore_model(model, node, torch.Generator().manual_seed(0), epochs=10, patience=2)
    assert run_epochs == 3  # the first epoch improves on infinity, then two without improvement
    losses = iter(range(10, 0, -1))
    monkeypatch.setattr("client_app.autoflip.evaluate", lambda *a, **k: (float(next(losses)), 0.0))
    assert explore_model(model, node, torch.Generator().manual_seed(0), epochs=4, patience=1)[1] == 4


def test_a_killed_run_resumes_with_its_server_momentum(tiny_run_config, tmp_path, monkeypatch):
    rc = {**tiny_run_config, "experiment": "configs/autoflip.yaml", "num-server-rounds": 3,
          "overrides": f"{tiny_run_config['overrides']} {FAST}"}
    whole, resumed = whole_and_resumed(rc, 3, tmp_path, monkeypatch, at_round=1)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    lines = (tmp_path / "killed" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2, 3]


@pytest.mark.parametrize("extra, key", [
    ("autoflip.prune=false autoflip.refresh=true", "autoflip.prune"),
    ("autoflip.refresh=true autoflip.mask=random", "autoflip.refresh"),
    ("autoflip.quantile=1.0", "autoflip.quantile"),
])
def test_inconsistent_settings_are_refused_before_round_1(tiny_run_config, extra, key):
    rc = {**tiny_run_config, "experiment": "configs/autoflip.yaml", "overrides": extra}
    with pytest.raises(ExperimentError, match=key):
        experiment_from_run_config(rc)


@pytest.mark.parametrize("extra", ["model.name=resnet20", "pruning.include_bias=false"])
def test_structured_pruning_needs_a_chain_model_with_maskable_units(tiny_run_config, extra):
    rc = {**tiny_run_config, "experiment": "configs/autoflip.yaml", "overrides": extra}
    with pytest.raises(ExperimentError, match="autoflip.structured_quantile"):
        build_strategy(experiment_from_run_config(rc))
    assert build_strategy(experiment_from_run_config({**rc, "overrides": extra + " autoflip.structured_quantile=0"}))
