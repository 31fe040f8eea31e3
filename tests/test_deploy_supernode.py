"""deploy/supernode.py: Flower's SuperNode with its idle waits capped."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from deploy import supernode
from deploy.launch import SUPERNODE_SCRIPT, LocalFederation


@pytest.fixture
def restore_supernode_loop():
    yield
    supernode.supernode_loop.time = time


def test_the_supernode_loop_waits_at_most_the_cap(restore_supernode_loop):
    supernode.cap_waits(0.05)
    t0 = time.monotonic()
    supernode.supernode_loop.time.sleep(3)  # Flower's wait after an empty pull
    assert time.monotonic() - t0 < 0.5
    assert supernode.supernode_loop.time.monotonic() > 0  # the rest of `time` is untouched


def test_flowers_loop_still_waits_with_the_time_module():
    """What the cap replaces: if a Flower upgrade changes the loop, this fails before a run does."""
    import inspect

    source = inspect.getsource(supernode.supernode_loop)
    assert "time.sleep(3)" in source and supernode.supernode_loop.time is time


def test_a_loop_that_no_longer_uses_time_is_refused(monkeypatch):
    monkeypatch.setattr(supernode.supernode_loop, "time", object())
    with pytest.raises(RuntimeError, match="flwr 1.41"):
        supernode.cap_waits(0.1)


@pytest.mark.parametrize("poll", [0, -1, 5])
def test_a_cap_outside_0_to_3_seconds_is_refused(poll, tmp_path):
    with pytest.raises(ValueError, match="poll"):
        supernode.cap_waits(poll)
    with pytest.raises(ValueError, match="supernode_poll"):
        LocalFederation(1, workdir=tmp_path, supernode_poll=poll)


def test_the_script_passes_flowers_own_arguments_through():
    """Run as a file (as the launcher does): Flower's SuperNode parses the remaining arguments."""
    out = subprocess.run([sys.executable, str(SUPERNODE_SCRIPT), "--poll", "0.1", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--superlink" in out.stdout and "--isolation" in out.stdout
