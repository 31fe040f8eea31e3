"""Real federations on loopback: a SuperLink and SuperNodes as processes (deploy.launch).

Slow (each test starts its own federation: about a minute or two on 2 cores). Every test uses free
ports, temporary Flower homes and stops every process it started, also when it fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy.certs import make_node_key
from deploy.launch import LocalFederation, alive

ROOT = Path(__file__).resolve().parents[1]
SMALL = 10
"""Partitions the data is split into: the two nodes hold partitions 0 and 1 of ten, a fifth of the
data, so that a round costs less (benchmarks/deployment.py runs the full two-way split)."""
NO_CLIENT_EVALUATION = "sampling.fraction_evaluate=0"
"""One message per node and round instead of two (each message costs a ClientApp process)."""
ONE_NODE_IS_ENOUGH = "sampling.min_train_nodes=1 sampling.min_evaluate_nodes=1 sampling.min_available_nodes=1"


def processes_in(directory: Path) -> list[int]:
    """Pids of the processes whose working directory is in ``directory`` (deleted or not)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "cwd").readlink().as_posix().startswith(directory.as_posix()):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def test_launcher_runs_the_default_experiment(tmp_path):
    """`python -m deploy.launch`: 2 rounds of configs/fedavg.yaml over a SuperLink and 2 SuperNodes
    (run by deploy/supernode.py with short idle waits, their ClientApps forked by deploy/superexec.py;
    the other tests run Flower's own)."""
    out_dir = tmp_path / "outputs"
    cmd = [sys.executable, "-m", "deploy.launch", "--nodes", "2", "--num-partitions", str(SMALL),
           "--num-server-rounds", "2", "--run-name", "deploy-test", "--output-dir", str(out_dir),
           "--supernode-poll", "0.1", "--warm-clientapps"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert re.search(r"\[launch\] run \d+: finished:completed", output), output[-4000:]

    run_dir = out_dir / "deploy-test"
    records = rounds(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert r["train_num_nodes"] == 2 and r["val_num_nodes"] == 2
        assert r["failed_replies"] == 0 and r["rejected_replies"] == 0
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0
    assert records[0]["test_accuracy"] < 0.2 and records[2]["test_accuracy"] > 0.5  # it learned
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_test_accuracy"] == records[2]["test_accuracy"]
    assert (run_dir / "final_model.pt").is_file()

    # every process it started is gone (a SuperLink, 2 SuperNodes and a SuperExec for each), and what
    # those started (the zygotes and the ClientApps they forked ran in the nodes' homes), and its
    # temporary work directory with them
    pids = [int(p) for p in re.findall(r"started \S+ \(pid (\d+)\)", output)]
    assert len(pids) == 6 and not any(alive(p, None) for p in pids)
    workdir = Path(re.search(r"work directory (\S+)", output).group(1))
    assert not workdir.exists()
    assert not processes_in(workdir)


def test_secure_federation_refuses_an_unregistered_node(tmp_path):
    """TLS + SuperNode authentication: registered nodes train, a node with an unknown key is refused."""
    with LocalFederation(2, num_partitions=SMALL, secure=True, workdir=tmp_path / "fed", echo=False) as fed:
        assert fed.certs is not None
        # the SuperLink speaks TLS only
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://{fed.address}/health", timeout=5)

        intruder_key = tmp_path / "intruder"
        make_node_key(intruder_key)
        intruder = fed.start_supernode(fed.node_spec(SMALL - 1, private_key=intruder_key), name="intruder")
        intruder.expected_exit = True
        intruder.popen.wait(timeout=120)
        assert intruder.popen.returncode != 0
        assert "Failed to activate SuperNode" in intruder.log.read_text()
        assert len(fed.online_nodes()) == 2

        out = fed.run({"experiment": "configs/fedavg.yaml", "num-server-rounds": 1, "run-name": "secure",
                       "output-dir": str(tmp_path / "outputs"), "overrides": NO_CLIENT_EVALUATION}, timeout=600)
        assert out.ok, (out.status, out.details)
    records = rounds(tmp_path / "outputs" / "secure")
    assert records[1]["train_num_nodes"] == 2 and records[1]["failed_replies"] == 0
    assert records[1]["test_accuracy"] > records[0]["test_accuracy"]


def test_a_killed_supernode_does_not_stop_the_federation(tmp_path):
    """SIGKILL one of two SuperNodes (and its ClientApp) mid-run: the run finishes with the other."""
    killed = threading.Event()
    lines: list[str] = []
    with LocalFederation(2, num_partitions=SMALL, workdir=tmp_path / "fed", echo=False) as fed:
        node_pids = {p.pid for p in fed.procs if p.name == "supernode-1"}

        def on_line(line: str) -> None:
            lines.append(line)
            if "round 1/2" in line and not killed.is_set():
                killed.set()
                # round 2's training messages go out now; kill the node while it works on its own
                threading.Timer(4.0, fed.kill_node, args=(1,)).start()

        out = fed.run({"experiment": "configs/fedavg.yaml", "num-server-rounds": 2, "run-name": "node-loss",
                       "output-dir": str(tmp_path / "outputs"),
                       "overrides": f"{ONE_NODE_IS_ENOUGH} {NO_CLIENT_EVALUATION}"},
                      timeout=600, on_line=on_line)
        assert killed.is_set()
        assert out.ok, (out.status, out.details)
        assert any("supernode-1" in e and "is gone" in e for e in fed.events)  # the launcher saw it
        assert not any(alive(p, None) for p in node_pids)
    log = "".join(lines)
    assert re.search(r"Node \d+ replied with an error: .*Node Unavailable", log), log[-3000:]  # the ServerApp logged it
    records = rounds(tmp_path / "outputs" / "node-loss")
    assert records[1]["train_num_nodes"] == 2
    assert records[2]["failed_replies"] >= 1
    assert records[2]["train_num_nodes"] == 1
    assert records[2]["test_accuracy"] > records[0]["test_accuracy"]  # the model the node left behind still learned
