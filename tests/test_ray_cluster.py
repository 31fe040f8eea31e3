"""The simulation on an existing Ray cluster: a head and a worker started with ``ray start`` on this
machine's loopback, a tiny federation run on them with ``simulate(..., ray_address=...)``.

The cluster lives in its own temporary directory and on free ports, and is stopped in the fixture's
teardown whatever happened (the ``ray start --block`` processes by pid, then whatever is left of
their sessions). The test is skipped, with Ray's own words, where Ray cannot start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from deploy.launch import free_port
from fedprune.simulate import simulate

RAY = Path(sys.executable).parent / "ray"
START_SECONDS = 90


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[4]) == sid:
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM ``ray start --block`` (it stops what it started), then SIGKILL its session's leftovers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while (left := _session_pids(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start(name: str, args: list[str], logs: Path, procs: list[subprocess.Popen]) -> None:
    log = logs / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", "--num-cpus=1",
                                 "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}",
                                 *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""})
    procs.append(proc)
    deadline = time.monotonic() + START_SECONDS
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
            how = f"exited with {proc.returncode}" if proc.poll() is not None else "timed out"
            pytest.skip(f"Ray cannot start here ({name}: `ray start` {how}):\n{tail}")
        time.sleep(0.5)


@pytest.fixture
def ray_cluster():
    """The address of a head and a worker node, one CPU each."""
    if not RAY.is_file():
        pytest.skip(f"no `ray` command next to {sys.executable}")
    # a short path: Ray's unix sockets live below it (at most 107 characters)
    temp = Path(tempfile.mkdtemp(prefix="fp-ray-", dir="/tmp"))
    procs: list[subprocess.Popen] = []
    port = free_port()
    try:
        _start("head", ["--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
                        f"--ray-client-server-port={free_port()}"], temp, procs)
        _start("worker", [f"--address=127.0.0.1:{port}"], temp, procs)
        yield f"127.0.0.1:{port}"
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


# Ray's public state API (`ray list ...`) needs the dashboard of ray[default], which this project
# does not install; the cluster's control store (GCS) answers the same questions to a driver.
CLUSTER_STATE = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps({"nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
                  "drivers": [j.get("Entrypoint", "") for j in state.jobs()],
                  "actors": [[a["ActorClassName"], a["Address"]["NodeID"]] for a in state.actors().values()]}))
"""


def cluster_state(address: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CLUSTER_STATE, address], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_simulation_runs_its_clients_on_both_nodes_of_an_existing_cluster(ray_cluster, tiny_mnist, tmp_path,
                                                                            monkeypatch):
    address = ray_cluster
    monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(free_port()))
    monkeypatch.setenv("FLWR_LOCAL_CONTROL_API_PORT", str(free_port()))
    outcome = simulate({"experiment": "configs/fedavg.yaml", "num-server-rounds": 1, "seed": 7, "run-name": "ray",
                        "output-dir": str(tmp_path / "out"),
                        "overrides": f"dataset.name=mnist dataset.root={tiny_mnist} partition.scheme=iid "
                                     "client.batch_size=16"},
                       num_supernodes=4, flwr_home=tmp_path / "home", echo=False, ray_address=address)
    assert outcome.ok, outcome.details
    assert json.loads((tmp_path / "out" / "ray" / "summary.json").read_text())["rounds"] == 1

    state = cluster_state(address)
    assert len(state["nodes"]) == 2
    assert any("flwr-simulation" in d for d in state["drivers"]), "the simulation did not join the cluster"
    # one ClientApp actor per CPU of the cluster: one on the head, one on the worker
    assert {node for name, node in state["actors"] if name == "ClientAppActor"} == set(state["nodes"])
