"""End to end through `flwr run .` in Flower's simulation (Ray), as a user runs it.

Slow (a managed SuperLink, Ray, 3 runs of 2 rounds on small MNIST-format files): about 2 minutes.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from benchmarks.inprocess import run_inprocess
from deploy.launch import descendants
from fedprune.simulate import superlink_pids, flower_env, simulate, stop_local_superlink


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
        broken = {**base, "seed": 5, "run-name": "broken",
                  "overrides": base["overrides"].replace("partition.scheme=iid", "partition.scheme=dirichlet "
                                                         "partition.alpha=0.5 partition.min_partition_size=250")}
        outcomes["broken"] = simulate(broken, num_supernodes=3, flwr_home=home, keep_superlink=True, echo=False)
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
    assert all(outcomes[n].ok for n in "abc")
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


def test_a_federation_whose_partition_plan_cannot_be_built_fails_before_round_1(runs):
    outcomes, out = runs
    assert outcomes["broken"].status == "finished:failed"
    summary = json.loads((out / "broken" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds"] == 0
    assert "partition.alpha" in summary["error"] and "0 usable nodes" in summary["error"]


def test_a_failing_run_is_reported_as_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(free_port()))
    monkeypatch.setenv("FLWR_LOCAL_CONTROL_API_PORT", str(free_port()))
    outcome = simulate({"experiment": "configs/fedavg.yaml", "num-server-rounds": 1,
                        "overrides": "dataset.name=mnist dataset.root=/nonexistent partition.scheme=iid",
                        "output-dir": str(tmp_path)}, num_supernodes=2, flwr_home=tmp_path / "home",
                       echo=False)
    assert not outcome.ok and outcome.status == "finished:failed"


def test_a_killed_run_resumes_to_the_bitwise_same_final_model(tmp_path, monkeypatch, tiny_mnist):
    """SIGKILL the SuperLink (and the simulation under it) after round 2, resume with --resume."""
    monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(free_port()))
    monkeypatch.setenv("FLWR_LOCAL_CONTROL_API_PORT", str(free_port()))
    env = flower_env(tmp_path / "home")
    out, rounds = tmp_path / "out", 10
    overrides = f"dataset.name=mnist dataset.root={tiny_mnist} partition.scheme=iid"
    args = [sys.executable, "-m", "fedprune.simulate", "--num-supernodes", "3", "--num-server-rounds", str(rounds),
            "--seed", "5", "--run-name", "killed", "--output-dir", str(out), "--overrides", overrides]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    log = out / "killed" / "rounds.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and '"round": 2,' in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, "the run did not reach round 2"
        time.sleep(0.05)
    for pid in superlink_pids(env):
        for victim in [pid, *(p for p, _ in descendants(pid))]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "killed" / "summary.json").exists()
    outcome = simulate({"experiment": "configs/fedavg.yaml", "num-server-rounds": rounds, "seed": 5,
                        "overrides": overrides, "output-dir": str(out), "resume": str(out / "killed")},
                       num_supernodes=3, flwr_home=tmp_path / "home", echo=False)
    assert outcome.ok, outcome.details
    run_inprocess({"experiment": "configs/fedavg.yaml", "num-server-rounds": rounds, "seed": 5,
                   "overrides": overrides}, 3, tmp_path / "whole")
    whole = torch.load(tmp_path / "whole" / "final_model.pt", weights_only=True)
    resumed = torch.load(out / "killed" / "final_model.pt", weights_only=True)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert [r["round"] for r in rounds_of(out / "killed")] == list(range(rounds + 1))


def rounds_of(run_dir):
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
