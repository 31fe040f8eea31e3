"""deploy/superexec.py: Flower's SuperExec with ClientApp processes forked from a warm zygote."""

from __future__ import annotations

import inspect
import io
import json
import subprocess
import sys

import pytest

from deploy import superexec
from deploy.launch import SUPEREXEC_SCRIPT, LocalFederation
from fedprune.simulate import flower_env


class FakeZygote:
    def __init__(self) -> None:
        self.stdin = io.BytesIO()
        self.ended = False

    def poll(self):
        return 0 if self.ended else None


def starter_with(zygote: FakeZygote) -> superexec.ZygoteStarter:
    starter = superexec.ZygoteStarter.__new__(superexec.ZygoteStarter)
    starter.zygote = zygote
    return starter


def test_a_clientapp_command_goes_to_the_zygote_and_any_other_starts_as_usual():
    zygote = FakeZygote()
    starter = starter_with(zygote)
    args = ["flwr-clientapp", "--runtime-api-address", "127.0.0.1:9094", "--token", "t", "--insecure"]
    assert starter.Popen(args) is None
    assert starter.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) is None
    requests = [json.loads(line) for line in zygote.stdin.getvalue().splitlines()]
    assert requests == [{"argv": args, "quiet": False}, {"argv": args, "quiet": True}]

    other = starter.Popen([sys.executable, "-c", "print('started')"], stdout=subprocess.PIPE)
    assert other.communicate(timeout=60)[0].strip() == b"started"
    assert len(zygote.stdin.getvalue().splitlines()) == 2  # not sent to the zygote
    assert starter.DEVNULL is subprocess.DEVNULL  # the rest of `subprocess` is untouched


def test_without_a_zygote_clientapps_start_as_flower_starts_them(monkeypatch):
    monkeypatch.setenv("PATH", flower_env()["PATH"])  # Flower's commands, as the launcher's processes find them
    zygote = FakeZygote()
    zygote.ended = True
    proc = starter_with(zygote).Popen(["flwr-clientapp", "--help"], stdout=subprocess.PIPE)
    assert b"--runtime-api-address" in proc.communicate(timeout=120)[0]
    assert zygote.stdin.getvalue() == b""


def test_the_zygote_forks_flowers_clientapp_entry_point_with_the_arguments():
    """The child is Flower's own ``flwr-clientapp``: asked for --help, it prints Flower's help."""
    requests = "".join(json.dumps({"argv": ["flwr-clientapp", "--help"]}) + "\n" for _ in range(2))
    out = subprocess.run([sys.executable, str(SUPEREXEC_SCRIPT), "--zygote"], input=requests, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Run a Flower ClientApp") == 2, out.stdout + out.stderr


def test_flowers_executor_still_starts_clientapps_with_subprocess_popen():
    """What the zygote replaces: if a Flower upgrade changes the executor, this fails before a run does."""
    module = superexec.executor_module
    assert module.subprocess is subprocess and "subprocess.Popen(" in inspect.getsource(module.SubprocessExecutor)


def test_an_executor_that_no_longer_uses_subprocess_is_refused(monkeypatch):
    monkeypatch.setattr(superexec.executor_module, "subprocess", object())
    with pytest.raises(RuntimeError, match="flwr 1.41"):
        superexec.start_clientapps_warm()


def test_the_script_passes_flowers_own_arguments_through():
    out = subprocess.run([sys.executable, str(SUPEREXEC_SCRIPT), "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "--runtime-api-address" in out.stdout


def test_warm_clientapps_run_the_supernodes_in_process_isolation(tmp_path):
    assert LocalFederation(1, workdir=tmp_path, warm_clientapps=True).isolation == "process"
