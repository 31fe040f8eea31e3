"""End to end through `flwr run .` in Flower's simulation (Ray), as a user runs it.

Slow (a managed SuperLink, Ray, 3 runs of 2 rounds on small MNIST-format files): about 2 minutes.
"""

import json
import socket

import pytest

from fedprune.simulate import simulate, stop_local_superlink, flower_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_mnist):
    home = tmp_path_factory.mktemp("flwr-home")
    out = tmp_path_factory.mktemp("outputs")
    mp = pytest.MonkeyPatch()
    mp.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(free_port()))
    mp.setenv("FLWR_LOCAL_CONTROL_API_PORT", str(free_port()))
    base = {"experiment": "configs/fedavg.yaml", "num-server-rounds": 2, "output-dir": str(out),
            "overrides": f"dataset.name=mnist dataset.root={tiny_mnist} partition.scheme=iid "
                         "sampling.fraction_train=0.67 sampling.min_train_nodes=1"}
    outcomes = {}
    try:
        for name, seed in (("a", 5), ("b", 5), ("c", 6)):
            outcomes[name] = simulate({**base, "seed": seed, "run-name": name}, num_supernodes=3,
                                      flwr_home=home, keep_superlink=True, echo=False)
        snip = {**base, "experiment": "configs/snip.yaml", "seed": 5, "run-name": "snip",
                "overrides": base["overrides"] + " pruning.density=0.3"}
        outcomes["snip"] = simulate(snip, num_supernodes=3, flwr_home=home, keep_superlink=True, echo=False)
    finally:
        stop_local_superlink(flower_env(home))
        mp.undo()
    return outcomes, out


def rounds(out, name):
    return [json.loads(line) for line in (out / name / "rounds.jsonl").read_text().splitlines()]


def test_run_completes_and_writes_results(runs):
    outcomes, out = runs
    assert outcomes["a"].ok, outcomes["a"].details
    assert outcomes["a"].run_dir == out / "a"
    records = rounds(out, "a")
    assert [r["round"] for r in records] == [0, 1, 2]
    for key in ("test_accuracy", "test_loss", "bytes_down", "bytes_up", "wall_seconds"):
        assert all(key in r for r in records)
    assert records[2]["train_num_nodes"] == 2 and records[2]["bytes_up"] > 0
    assert records[2]["test_accuracy"] > records[0]["test_accuracy"]
    summary = json.loads((out / "a" / "summary.json").read_text())
    assert summary["final_test_accuracy"] == records[-1]["test_accuracy"]
    assert summary["total_bytes_down"] == sum(r["bytes_down"] for r in records)
    for name in ("config.yaml", "accuracy_vs_round.png", "accuracy_vs_bytes.png", "final_model.pt"):
        assert (out / "a" / name).is_file()


def test_same_seed_repeats_other_seed_differs(runs):
    outcomes, out = runs
    assert all(o.ok for o in outcomes.values())
    acc = {n: [r["test_accuracy"] for r in rounds(out, n)] for n in "abc"}
    loss = {n: [r["test_loss"] for r in rounds(out, n)] for n in "abc"}
    assert acc["a"] == acc["b"] and loss["a"] == loss["b"]
    assert loss["a"][1:] != loss["c"][1:]


def test_a_pruning_method_keeps_its_mask_across_rounds_under_ray(runs):
    outcomes, out = runs
    assert outcomes["snip"].ok, outcomes["snip"].details
    records = rounds(out, "snip")
    assert all(abs(r["density"] - 0.3) < 1e-3 for r in records)
    assert records[0]["bytes_up"] > 0  # the scoring round
    # masks live in each node's context.state: in round 2 every node holds it and gets values only
    assert records[2]["bytes_down"] < records[1]["bytes_down"]
    assert all(r["rejected_replies"] == 0 and r["failed_replies"] == 0 for r in records)


def test_a_failing_run_is_reported_as_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(free_port()))
    monkeypatch.setenv("FLWR_LOCAL_CONTROL_API_PORT", str(free_port()))
    outcome = simulate({"experiment": "configs/fedavg.yaml", "num-server-rounds": 1,
                        "overrides": "dataset.name=mnist dataset.root=/nonexistent partition.scheme=iid",
                        "output-dir": str(tmp_path)}, num_supernodes=2, flwr_home=tmp_path / "home",
                       echo=False)
    assert not outcome.ok and outcome.status == "finished:failed"
