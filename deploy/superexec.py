"""``flower-superexec`` whose ClientApp processes start warm: forked from one that has imported the libraries.

``python deploy/superexec.py <flower-superexec arguments>``

Flower 1.41's SuperExec starts every ClientApp task, one per message, as a fresh ``flwr-clientapp``
process (``SubprocessExecutor.launch``), which imports Flower (about 1 s on this machine's cores) and,
through our app, PyTorch (about 1.3 s) before it can train: seconds of every message that the
simulation, whose workers live for the whole run, does not pay. This entry point first starts a
*zygote*, a process that imports those libraries (:data:`PRELOAD`) once and then waits; it then
runs Flower's own ``flower-superexec`` unchanged, except that a ``flwr-clientapp`` command is not
started with ``subprocess.Popen`` but sent to the zygote, which forks a child that runs Flower's
own ``flwr-clientapp`` entry point with the same arguments. Any other command starts as Flower
starts it.

The child is a ClientApp process like any other: same arguments, environment and working
directory, its own address space (copy-on-write from the zygote), the app imported from its FAB as
usual; Python's ``random`` is reseeded at the fork, and our app draws every other random number from
the run's seed. The zygote imports libraries only, never the app, and holds none of Flower's
runtime state (no connection, no exit handler, no thread but the BLAS pool numpy starts, which
re-forms itself after a fork, as it does under ``multiprocessing``): nothing a fork must not copy. If it is
gone, ClientApps start as Flower starts them.

A SuperNode started with ``--isolation process`` leaves starting its SuperExec to the operator;
``deploy.launch --warm-clientapps`` starts the SuperNodes that way and their SuperExecs through this
file. Run it as a file, not with ``-m``, like deploy/supernode.py: its directory joins only this
process's import path.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import traceback
from typing import BinaryIO

import flwr.supercore.superexec.executor.subprocess_executor as executor_module
from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

CLIENTAPP = "flwr-clientapp"
PRELOAD = ("numpy", "yaml", "torch", "flwr.supernode.cli.flwr_clientapp")
"""What the zygote imports before its first fork: what every ClientApp of ours imports, but the app
(flwr-datasets, only needed to build a node's partition before its cache exists, is left out: its
pyarrow starts a thread of its own)."""


def zygote(requests: BinaryIO) -> None:
    """Import :data:`PRELOAD`, then fork a ClientApp per request line (JSON ``{"argv", "quiet"}``) until EOF."""
    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    for line in requests:
        request = json.loads(line)
        if os.fork() == 0:
            requests.close()
            _run_clientapp(request["argv"], request.get("quiet", False))


def _run_clientapp(argv: list[str], quiet: bool) -> None:
    """In the forked child: be ``flwr-clientapp`` with ``argv``; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2) if quiet else (0,):
            os.dup2(devnull, fd)
        sys.argv = list(argv)
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        flwr_clientapp()
        code = 0
    except SystemExit as exc:  # Flower's flwr_exit ends every run this way
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # noqa: BLE001 - reported, then the child ends with status 1
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ZygoteStarter:
    """Stands in for the ``subprocess`` module of Flower's SubprocessExecutor: a ``flwr-clientapp``
    command goes to the zygote; the rest is ``subprocess``'s."""

    def __init__(self) -> None:
        self.zygote = subprocess.Popen([sys.executable, __file__, "--zygote"], stdin=subprocess.PIPE)

    def Popen(self, args, **kwargs):  # noqa: N802 - the name Flower calls
        if list(args)[:1] != [CLIENTAPP] or self.zygote.poll() is not None:
            return subprocess.Popen(args, **kwargs)
        quiet = kwargs.get("stdout") == subprocess.DEVNULL
        assert self.zygote.stdin is not None
        try:
            self.zygote.stdin.write(json.dumps({"argv": list(args), "quiet": quiet}).encode() + b"\n")
            self.zygote.stdin.flush()
        except BrokenPipeError:  # the zygote ended between poll() and write()
            return subprocess.Popen(args, **kwargs)
        return None  # Flower's executor keeps no handle of the process it starts

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def start_clientapps_warm() -> ZygoteStarter:
    """Start the zygote and make Flower's SubprocessExecutor send ``flwr-clientapp`` commands to it."""
    if executor_module.subprocess is not subprocess or TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] != CLIENTAPP:
        raise RuntimeError(f"{executor_module.__name__} no longer starts {CLIENTAPP} with subprocess.Popen; this "
                           "wrapper was written for flwr 1.41 and needs a look before it can start that version's "
                           "ClientApps")
    starter = ZygoteStarter()
    executor_module.subprocess = starter
    return starter


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--zygote"]:
        zygote(sys.stdin.buffer)
        return
    start_clientapps_warm()
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv = ["flower-superexec", *argv]
    flower_superexec()


if __name__ == "__main__":
    main()
