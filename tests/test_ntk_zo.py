"""ntk-zo and zo-dense through the real strategy and ClientApp (in process): the federated NTK mask,
bit-identical replay of seeds and scalars, what travels, rejected replies, lost state, checkpoints."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from benchmarks.inprocess import InProcessGrid
from client_app.node import Node
from fedprune import protocol
from fedprune.experiment import experiment_from_run_config
from fedprune.task import new_model
from pruning.accounting import count_flops
from strategies import RunFailed, build_strategy
from strategies.ledger import MeteredGrid
from tests.test_resume import whole_and_resumed

SMALL = ("ntk_zo.num_perturbations=4 ntk_zo.lr=0.005 ntk_zo.score_batch_size=8 ntk_zo.prune_iterations=2 "
         "pruning.density=0.2 sampling.min_train_nodes=1 sampling.fraction_evaluate=0")


def config(run_config, method="ntk-zo", rounds=3, extra=""):
    return {**run_config, "experiment": f"configs/{method}.yaml", "num-server-rounds": rounds,
            "overrides": f"{run_config['overrides']} {SMALL} {extra}"}


def run(cfg, nodes=3, tamper=None, fails=False, after_round=None):
    exp = experiment_from_run_config(cfg)
    strategy = build_strategy(exp)
    grid = InProcessGrid(cfg, nodes, tamper=tamper)
    records, versions = [], {0: None}

    def on_round(record):
        records.append(record)
        versions[strategy.version] = {k: np.array(v) for k, v in strategy.global_arrays.items()}
        if after_round is not None:
            after_round(record["round"], grid)

    def start():
        strategy.start(grid, ArrayRecord(new_model(exp).state_dict()), exp.num_server_rounds, on_round=on_round,
                       evaluate_fn=lambda r, a: MetricRecord({"test_accuracy": 0.0}))

    if fails:
        with pytest.raises(RunFailed):
            start()
    else:
        start()
    return strategy, records, grid, versions


def stored_model(grid, node_id):
    state = grid.contexts[node_id].state
    return int(state["zo-model-meta"]["version"]), {k: v.numpy() for k, v in state["zo-model"].items()}


@pytest.mark.parametrize("method, schedule", [("ntk-zo", ""), ("zo-dense", ""),
                                              ("ntk-zo", "ntk_zo.lr_schedule=cosine ntk_zo.lr_decay_steps=8")])
def test_every_node_holds_the_servers_model_of_its_version_bit_for_bit(tiny_run_config, method, schedule):
    """Half the nodes train per round with two local steps each; a node sampled again after missing
    rounds gets only the seeds and scalars it missed, replays them, and holds exactly the server's
    model of that version (also when the step size decays over the run, here to 0 after 8 of 12 steps)."""
    cfg = config(tiny_run_config, method, rounds=6,
                 extra=f"sampling.fraction_train=0.5 ntk_zo.local_steps=2 {schedule}")
    strategy, records, grid, versions = run(cfg, nodes=4)
    assert strategy.version == 6 and sum(r["zo_replays_sent"] for r in records) >= 4
    replays = [m for m in grid.sent if protocol.ZO_REPLAY in m.content]
    assert max(m.content[protocol.CONFIG][protocol.ZO_VERSION] - m.content[protocol.CONFIG][protocol.ZO_FROM]
               for m in replays) >= 2  # some node caught up on several rounds at once
    for node in grid.contexts:
        version, arrays = stored_model(grid, node)
        assert version >= 1 and all(np.array_equal(arrays[k], versions[version][k]) for k in arrays), node
    if method == "ntk-zo":
        for name, mask in strategy.masks.items():
            assert not strategy.global_arrays[name][~mask].any()
    if schedule:  # versions 5 and 6 (steps 8 to 11) took step size 0
        assert all(np.array_equal(versions[4][k], versions[6][k]) for k in versions[6])
        assert not all(np.array_equal(versions[3][k], versions[4][k]) for k in versions[4])


def test_the_mask_is_federated_ntk_sap_at_the_target_density_and_scoring_keeps_the_initial_weights(
        tiny_run_config, monkeypatch):
    cfg = config(tiny_run_config, rounds=1)
    exp = experiment_from_run_config(cfg)
    strategy = build_strategy(exp)
    grid = InProcessGrid(cfg, 3)
    strategy.global_arrays = {k: v.numpy() for k, v in new_model(exp).state_dict().items()}
    initial = dict(strategy.global_arrays)
    strategy.sample(grid, 0, 1.0, 1, "describe")  # discovery reads the nodes' data sizes
    monkeypatch.setattr(Node, "data", lambda self: pytest.fail("data-free scoring read a node's data"))
    metered = MeteredGrid(grid)
    strategy.prepare(metered)
    assert strategy.density() == pytest.approx(0.2, abs=1e-5)
    for name, value in strategy.global_arrays.items():
        mask = strategy.masks.get(name, np.ones(value.shape, bool))
        assert np.array_equal(value, np.where(mask, initial[name], 0))
    queries = [m for m in grid.sent if m.metadata.message_type == "query.ntk"]
    assert [m.content[protocol.CONFIG][protocol.NTK_ITERATION] for m in queries] == [1, 1, 1, 2, 2, 2]
    assert all(protocol.ARRAYS not in m.content for m in queries)  # resampled weights: no model needed
    traffic = metered.take()
    assert traffic["bytes_up_ntk"] > 0 and traffic["bytes_down_mask"] > 0


@pytest.mark.parametrize("saliency, phase", [("local-data", "query.ntk"), ("snip", "query.snip")])
def test_the_data_driven_variants_score_on_local_data(tiny_run_config, saliency, phase):
    strategy, records, grid, _ = run(config(tiny_run_config, rounds=1, extra=f"ntk_zo.saliency={saliency}"))
    assert records[0]["density"] == pytest.approx(0.2, abs=1e-5)
    assert phase in {m.metadata.message_type for m in grid.sent}


def test_upload_is_k_scalars_per_step_plus_a_fixed_framing_and_a_holder_downloads_only_scalars(tiny_run_config):
    ups, downs = {}, {}
    for k in (4, 12):
        _, records, grid, _ = run(config(tiny_run_config, rounds=2, extra=f"ntk_zo.num_perturbations={k}"))
        up = [r["bytes_up_train"] / r["train_num_nodes"] for r in records[1:]]
        assert up[0] == up[1]
        ups[k] = up[0]
        downs[k] = [r["bytes_down_train"] / r["train_num_nodes"] for r in records[1:]]
        reply_arrays = [m for m in grid.sent if m.metadata.message_type == "train"]
        assert all(m.content[protocol.CONFIG][protocol.ZO_SEEDS] for m in reply_arrays)
    assert ups[12] - ups[4] == 4 * (12 - 4)  # one step, float32 scalars: only the values grow
    assert ups[4] < 1000
    # round 1 sends the masked model, round 2 only the previous round's seed and 4 scalars
    assert downs[4][1] < 0.01 * downs[4][0] and downs[4][1] < 600


def test_train_flops_are_forward_passes_scaled_by_density(tiny_run_config):
    rounds = {}
    for difference, forwards in (("forward", 5), ("central", 8)):
        strategy, records, _, _ = run(config(tiny_run_config, rounds=1, extra=f"ntk_zo.difference={difference}"))
        model = new_model(strategy.experiment)
        masks = {k: torch.from_numpy(v) for k, v in strategy.masks.items()}
        per_example = count_flops(model, torch.zeros(1, 1, 28, 28), masks).effective
        assert records[1]["train_flops"] == pytest.approx(3 * forwards * 16 * per_example)
        rounds[difference] = records[1]
    assert rounds["forward"]["train_peak_memory"] > 0


def tamper_scalars(make):
    def tamper(ins, reply):
        if reply.has_error():
            return reply
        metrics, arrays = dict(reply.content["metrics"]), reply.content["arrays"]
        arrays, metrics = make(arrays, metrics)
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=ins)
    return tamper


def forged(values):
    return lambda arrays, metrics: (protocol.pack({protocol.ZO_SCALARS: torch.tensor(values, dtype=torch.float32)}),
                                    metrics)


@pytest.mark.parametrize("make", [
    forged([[float("nan")] * 4]),
    forged([[0.0] * 5]),
    forged([[1e9, 0.0, 0.0, 0.0]]),
    lambda arrays, metrics: (arrays, {**metrics, protocol.ZO_VERSION: 7}),
], ids=["non-finite", "wrong-count", "too-large", "wrong-version"])
def test_a_bad_scalar_reply_is_rejected_and_never_moves_the_model(tiny_run_config, make):
    strategy, records, _, _ = run(config(tiny_run_config, rounds=1), tamper=tamper_scalars(make), fails=True)
    assert records[1]["rejected_replies"] == 3 and strategy.version == 0
    initial = new_model(strategy.experiment).state_dict()
    for name, value in strategy.global_arrays.items():
        mask = strategy.masks.get(name, np.ones(value.shape, bool))
        assert np.array_equal(value, np.where(mask, initial[name].numpy(), 0))


def test_a_node_that_lost_its_state_gets_the_model_again(tiny_run_config):
    def forget(server_round, grid):
        if server_round == 1:
            grid.contexts[next(iter(grid.contexts))].state = RecordDict()

    strategy, records, grid, versions = run(config(tiny_run_config, rounds=3), after_round=forget)
    assert records[2]["failed_replies"] == 0 and records[2]["train_num_nodes"] == 3
    assert records[2]["zo_models_sent"] == 1 and records[2]["zo_replays_sent"] == 3  # 3 replays, one refused
    for node in grid.contexts:
        version, arrays = stored_model(grid, node)
        assert all(np.array_equal(arrays[k], versions[version][k]) for k in arrays)


def test_a_killed_run_resumes_to_the_bitwise_same_final_model(tiny_run_config, tmp_path, monkeypatch):
    rc = config(tiny_run_config, rounds=3)
    whole, resumed = whole_and_resumed(rc, 3, tmp_path, monkeypatch, at_round=2)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    checkpoint = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert checkpoint["method"]["scalars"].shape == (3, 1, 4)
    last = json.loads((tmp_path / "killed" / "rounds.jsonl").read_text().splitlines()[-1])
    assert last["zo_version"] == 3 and last["zo_models_sent"] == 3  # the resumed run's nodes start empty


def test_each_clients_scalars_are_clipped_before_averaging(tiny_run_config):
    """A client that sends large (but allowed) scalars moves the model no more than ``clip`` allows."""
    liar = forged([[900.0, -900.0, 900.0, -900.0]])
    first = {}

    def tamper(ins, reply):
        node = ins.metadata.dst_node_id
        first.setdefault("node", node)
        return tamper_scalars(liar)(ins, reply) if node == first["node"] else reply

    strategy, records, _, _ = run(config(tiny_run_config, rounds=1, extra="ntk_zo.clip=0.5"), tamper=tamper)
    assert records[1]["rejected_replies"] == 0 and records[1]["train_num_nodes"] == 3
    seeds, scalars = strategy.history[0]
    assert np.abs(scalars).max() <= 0.5 and len(seeds) == 1
