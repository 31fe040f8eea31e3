"""FedDP through the real strategy and ClientApp (in process): pinned keep counts, SCAFFOLD's control
variates, FedProx, the threshold variant's sparse uploads, the skipping evaluation, bad replies."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from benchmarks.inprocess import InProcessGrid
from client_app.app import evaluate_received
from client_app.feddp import STATE_KEY, feddp_evaluate, proximal
from client_app.node import node_of
from fedprune import protocol
from fedprune.experiment import ExperimentError, experiment_from_run_config
from fedprune.feddp import CONTROL
from fedprune.task import new_model
from pruning.codec import decode
from strategies import RunFailed, build_strategy


def run(run_config, extra="", rounds=1, nodes=3, tamper=None, fails=False):
    cfg = {**run_config, "experiment": "configs/feddp.yaml", "num-server-rounds": rounds,
           "overrides": run_config["overrides"] + " sampling.fraction_evaluate=0 " + extra}
    exp = experiment_from_run_config(cfg)
    strategy, grid, records = build_strategy(exp), InProcessGrid(cfg, nodes, tamper=tamper), []

    def start():
        strategy.start(grid, ArrayRecord(new_model(exp).state_dict()), rounds, on_round=records.append,
                       evaluate_fn=lambda r, a: MetricRecord({"test_accuracy": 0.0}))
    if fails:
        with pytest.raises(RunFailed):
            start()
    else:
        start()
    return strategy, records, grid


def values(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A record's tensors, decoded without checks (the tests read what was sent)."""
    return {k: decode(v.data).numpy() for k, v in record.items()}


def rewrite(reply: Message, ins: Message, **records) -> Message:
    content = {k: v for k, v in reply.content.items()}
    content.update(records)
    return Message(RecordDict(content), reply_to=ins)


def test_the_run_keeps_the_configured_channels_and_trains(tiny_run_config):
    strategy, records, grid = run(tiny_run_config, "feddp.keep_ratio=0.5", rounds=2)
    assert {k: int(strategy.global_arrays[k]) for k in strategy.keep} == {"features.0.keep": 16,
                                                                         "features.2.keep": 32}
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert all(int(values(m.content["arrays"])["features.2.keep"]) == 32 for m in sent)
    assert records[-1]["train_num_nodes"] == 3 and records[-1]["rejected_replies"] == 0
    assert records[2]["train_loss"] < records[1]["train_loss"]


def test_a_reply_that_changes_the_keep_count_is_rejected(tiny_run_config):
    def widen(ins, reply):
        arrays = dict(reply.content["arrays"].items())
        arrays["features.2.keep"] = protocol.pack({"k": torch.tensor(64)})["k"]
        return rewrite(reply, ins, arrays=ArrayRecord(arrays))

    _, records, _ = run(tiny_run_config, "feddp.keep_ratio=0.5", tamper=widen, fails=True)
    assert records[1]["rejected_replies"] == 3


def test_scaffold_sends_control_down_with_training_only_and_averages_the_clients_variates(tiny_run_config):
    strategy, records, grid = run(tiny_run_config, rounds=1)
    kinds = {m.metadata.message_type: CONTROL in m.content for m in grid.sent}
    assert kinds == {"query.describe": False, "train": True}
    # c starts at 0 and every node starts from c_i = 0, so after a round with all N nodes c = mean(c_i)
    local = [{k: v.numpy() for k, v in ctx.state[STATE_KEY].items()} for ctx in grid.contexts.values()]
    for name, c in strategy.control.items():
        assert np.allclose(c, np.mean([c_i[name] for c_i in local], axis=0), atol=1e-6)
    assert any(np.abs(c).max() > 0 for c in strategy.control.values())


def test_scaffold_changes_the_model_and_doubles_the_training_traffic(tiny_run_config):
    plain, plain_records, _ = run(tiny_run_config, "feddp.correction=none", rounds=2)
    scaffold, records, _ = run(tiny_run_config, "feddp.correction=scaffold", rounds=2)
    assert not np.allclose(plain.global_arrays["classifier.1.weight"], scaffold.global_arrays["classifier.1.weight"])
    for direction in ("down", "up"):
        ratio = records[2][f"bytes_{direction}_train"] / plain_records[2][f"bytes_{direction}_train"]
        assert 1.5 < ratio < 2.05, (direction, ratio)  # delta c_i of parameters no sample moved goes sparse


@pytest.mark.parametrize("bad", ["missing", "nonfinite", "shape"])
def test_a_reply_with_a_bad_control_variate_is_rejected(tiny_run_config, bad):
    def forge(ins, reply):
        content = {k: v for k, v in reply.content.items() if k != CONTROL}
        if bad != "missing":
            delta = values(reply.content[CONTROL])
            first = next(iter(delta))
            delta[first] = np.full_like(delta[first], np.nan) if bad == "nonfinite" else delta[first][:1]
            content[CONTROL] = protocol.pack(delta)
        return Message(RecordDict(content), reply_to=ins)

    strategy, records, _ = run(tiny_run_config, tamper=forge, fails=True)
    assert records[1]["rejected_replies"] == 3
    assert all(not c.any() for c in strategy.control.values())


def test_the_proximal_term_pulls_the_gradient_back_to_the_global_weights():
    model = torch.nn.Linear(3, 2)
    hook = proximal(model, mu=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    model(torch.zeros(1, 3)).sum().backward()  # weight gradient 0, bias gradient 1
    hook(model)
    assert torch.allclose(model.weight.grad, torch.full((2, 3), 0.5)) and torch.allclose(model.bias.grad, torch.ones(2))


def test_the_threshold_variant_uploads_its_zeros_sparse(tiny_run_config):
    base = "model.name=cnn-bn feddp.keep_ratio=1.0 feddp.correction=none client.lr=0.001"
    _, dense, _ = run(tiny_run_config, base)
    seen = []
    strategy, pruned, _ = run(tiny_run_config, base + " feddp.threshold=0.02",
                              tamper=lambda ins, reply: seen.append(reply) or reply)
    for reply in seen:
        arrays = protocol.unpack(reply.content["arrays"], protocol.expected_of(strategy.global_arrays))
        for name in strategy.convs:
            assert not ((arrays[name] != 0) & (np.abs(arrays[name]) <= 0.02)).any()
    assert pruned[1]["feddp_conv_zero_share_up"] > 0.2 and dense[1]["feddp_conv_zero_share_up"] == 0
    assert pruned[1]["bytes_up_train"] < dense[1]["bytes_up_train"]


def test_the_client_evaluates_through_the_skipping_path_with_the_dense_result(tiny_run_config):
    strategy, _, grid = run(tiny_run_config, "feddp.keep_ratio=0.5", rounds=1)
    node_id, context = next(iter(grid.contexts.items()))
    msg = strategy.model_message(1, node_id, ConfigRecord(), MessageType.EVALUATE)
    skipped = feddp_evaluate(msg, context, node_of(context)).content["metrics"]
    dense = evaluate_received(msg, context, node_of(context)).content["metrics"]
    assert skipped["accuracy"] == dense["accuracy"] and skipped["loss"] == pytest.approx(dense["loss"], rel=1e-5)


def test_a_keep_ratio_below_one_needs_a_gated_model(tiny_run_config):
    cfg = {**tiny_run_config, "experiment": "configs/feddp.yaml",
           "overrides": tiny_run_config["overrides"] + " model.name=cnn-bn feddp.keep_ratio=0.5"}
    with pytest.raises(ExperimentError, match="feddp.keep_ratio"):
        experiment_from_run_config(cfg)


def test_the_control_variates_survive_a_checkpoint(tiny_run_config):
    strategy, _, _ = run(tiny_run_config, rounds=1)
    state = strategy.state_dict(1)
    restored = build_strategy(strategy.experiment)
    restored.load_state_dict(state)
    assert all(np.array_equal(restored.control[k], v) for k, v in strategy.control.items())


def test_the_benchmark_summary_picks_the_smallest_r_within_one_point_under_both_splits():
    from benchmarks.feddp import summary

    drops = {(0.5, 0.1): -0.4, (0.5, 0.5): -0.9, (0.25, 0.1): -0.5, (0.25, 0.5): -1.6}
    runs = [{"name": f"feddp-r{r}-{c}-dir{a}", "mean": {"acc_minus_dense": d - (c == "scaffold") * 2}}
            for (r, a), d in drops.items() for c in ("none", "scaffold")]
    measured = {"flops_ratio": {"0.5": 0.33, "0.25": 0.16},
                "timing": [{"model": "gated-cnn", "keep_ratio": 0.5, "batch": b, "time_saved_over_flops_saved": v}
                           for b, v in ((1, 0.2), (64, 0.9))]}
    s = summary(runs, measured)
    assert s["keep_ratio_within_1_point"] == {"scaffold": None, "none": 0.5}
    assert s["inference_flops_ratio_at_that_r"] == {"scaffold": None, "none": 0.33}
    assert s["time_saved_over_flops_saved"] == {"1": 0.2, "64": 0.9}
