"""deploy.launch without a full run: process handling, configuration, and Ctrl-C.

The runs over real processes are in tests/test_deploy_federation.py.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from deploy.launch import (CONNECTION, LocalFederation, NodeSpec, Proc, alive, descendants, dataset_directory,
                           free_port, main)

ROOT = Path(__file__).resolve().parents[1]


def _spawn(tmp_path, script: str) -> Proc:
    popen = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    return Proc("test", popen, tmp_path / "test.log")


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_node_config_round_trips_through_flowers_parser():
    config = {"partition-id": 3, "num-partitions": 10, "data-root": "/tmp/a dir/data", "num-threads": 1}
    spec = NodeSpec(3, 9999, Path("/tmp"), config)
    assert parse_config_args([spec.node_config_arg()]) == config


def test_stop_ends_the_process_and_what_it_started(tmp_path):
    proc = _spawn(tmp_path, "sleep 300 & sleep 300 & wait")
    assert _wait_for(lambda: len(descendants(proc.pid)) == 2)
    tree = descendants(proc.pid)
    proc.stop(grace=5)
    assert not proc.running()
    assert not any(alive(p, t) for p, t in tree)


def test_stop_escalates_to_sigkill(tmp_path):
    proc = _spawn(tmp_path, "trap '' TERM; while true; do sleep 0.1; done")
    time.sleep(0.3)
    start = time.monotonic()
    proc.stop(grace=1)
    assert proc.popen.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 5


def test_stop_leaves_other_processes_alone(tmp_path):
    """Only what this launcher started: an unrelated process with the same command survives."""
    bystander = subprocess.Popen(["sleep", "300"])
    proc = _spawn(tmp_path, "sleep 300 & wait")
    try:
        assert _wait_for(lambda: len(descendants(proc.pid)) == 1)
        proc.stop(grace=5)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_cli_config_points_at_the_superlink(tmp_path):
    fed = LocalFederation(2, workdir=tmp_path, echo=False)
    fed.port = 12345
    fed._write_cli_config()
    config = tomllib.loads((tmp_path / "cli" / "config.toml").read_text())
    assert config["superlink"]["default"] == CONNECTION
    assert config["superlink"][CONNECTION] == {"address": "127.0.0.1:12345", "insecure": True}


def test_node_spec_gives_each_node_its_own_home_and_data_path(tmp_path):
    fed = LocalFederation(3, num_partitions=10, workdir=tmp_path, echo=False, data_root=str(tmp_path / "d{partition_id}"))
    specs = [fed.node_spec(i) for i in range(3)]
    assert len({s.home for s in specs}) == 3 and len({s.port for s in specs}) == 3
    assert [s.node_config["partition-id"] for s in specs] == [0, 1, 2]
    assert {s.node_config["num-partitions"] for s in specs} == {10}
    assert [s.node_config["data-root"] for s in specs] == [str(tmp_path / f"d{i}") for i in range(3)]


def test_auto_data_root_is_a_copy_in_the_nodes_home(tmp_path):
    if dataset_directory("fashion-mnist") is None:
        pytest.skip("no local copy of Fashion-MNIST (make data)")
    fed = LocalFederation(1, workdir=tmp_path, echo=False)
    spec = fed.node_spec(0)
    root = Path(spec.node_config["data-root"])
    assert root.parent == spec.home
    from fedprune.data import find_idx, read_idx

    files = find_idx(root)  # what the ClientApp will read: plain IDX files
    assert files is not None and not any(f.suffix == ".gz" for f in files.values())
    assert read_idx(files["train_y"]).shape == (60000,)


def test_bad_arguments_are_refused_before_anything_starts(tmp_path, capsys):
    with pytest.raises(ValueError, match="num_partitions"):
        LocalFederation(3, num_partitions=2, workdir=tmp_path)
    assert main(["--overrides", "client.lr=-1", "--workdir", str(tmp_path / "w")]) == 2
    assert "client.lr" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_ctrl_c_stops_everything_it_started(tmp_path):
    """SIGINT while the federation is up: exit 130, and no process of its tree is left."""
    cmd = [sys.executable, "-m", "deploy.launch", "--nodes", "1", "--num-server-rounds", "1",
           "--workdir", str(tmp_path / "w"), "--output-dir", str(tmp_path / "out")]
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, tree = [], []
    try:
        assert launcher.stdout is not None
        for line in launcher.stdout:
            lines.append(line)
            if "Successfully started run" in line:  # the whole tree is up: SuperLink, SuperNode, flwr run
                time.sleep(1.0)
                tree = descendants(launcher.pid)
                launcher.send_signal(signal.SIGINT)
                break
        rest, _ = launcher.communicate(timeout=90)
        lines.append(rest)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    output = "".join(lines)
    assert launcher.returncode == 130, output
    started = {int(pid) for pid in re.findall(r"started \S+ \(pid (\d+)\)", output)}
    assert len(started) == 2, output  # superlink, supernode-0
    assert started <= {p for p, _ in tree}
    assert len(tree) >= 4  # and what they started: SuperExecs, the flwr CLI
    assert _wait_for(lambda: not any(alive(p, t) for p, t in tree), timeout=15), \
        [p for p, t in tree if alive(p, t)]
    assert "interrupted" in output
    assert (tmp_path / "w" / "logs" / "superlink.log").is_file()  # the logs stay for a look

