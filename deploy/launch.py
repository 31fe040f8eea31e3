"""A local federation of real processes: one SuperLink, N SuperNodes, one experiment, then stop.

``python -m deploy.launch [--nodes 2] [--experiment configs/fedavg.yaml] [--secure] ...``

What it does, in order (docs/deployment.md has the walk-through):

1. makes a work directory (a temporary one unless ``--workdir``) with one Flower home per process,
   as separate machines would have: ``superlink/``, ``supernode-<i>/`` and ``cli/`` (the ``flwr``
   CLI's home, whose ``config.toml`` gets a connection named ``fedprune-local`` to this SuperLink),
   and the processes' logs in ``logs/``;
2. starts ``flower-superlink`` on a free port of 127.0.0.1 and waits for its ``/health``;
3. with ``--secure``: makes a CA, a SuperLink certificate and one key pair per SuperNode (or takes
   the ones in ``--certs``), starts the SuperLink with TLS and ``--enable-supernode-auth`` and
   registers every SuperNode's public key with ``flwr supernode register``;
4. starts N ``flower-supernode`` processes, node i with ``--node-config "partition-id=i
   num-partitions=N data-root=... cache-dir=... num-threads=1"`` (TLS and its private key in secure
   mode; ``cache-dir``, in the node's home, is where its ClientApp processes keep the node's
   normalized partition between messages), and waits until all of them are online; with
   ``--supernode-poll SECONDS`` each runs through deploy/supernode.py, which caps Flower's 3 s
   wait between a SuperNode's pulls at that many seconds; with ``--warm-clientapps`` they run with
   ``--isolation process`` and each gets a SuperExec (deploy/superexec.py) that forks its ClientApp
   processes from one that has already imported torch and Flower;
5. submits the experiment with ``flwr run . fedprune-local --stream`` and follows its log;
6. reports the run's final status from ``flwr ls`` (``flwr run`` exits 0 even when the run failed)
   and where the results are;
7. stops exactly the processes it started (and what they started), by pid, also on Ctrl-C, on
   SIGTERM or on an error.

Exit status 0 only when the run finished with status ``finished:completed``. The work directory is
removed afterwards unless ``--workdir`` or ``--keep-workdir`` is given or something failed (then it
holds the logs and its path is printed).

:class:`LocalFederation` is the same thing as a Python context manager (tests and
benchmarks/deployment.py use it).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from deploy.certs import Certificates, generate
from deploy.supernode import check_poll
from fedprune.experiment import APP_ROOT, ExperimentError, experiment_from_run_config
from fedprune.simulate import RunOutcome, run_config_arg, flower_env, run_status

CONNECTION = "fedprune-local"
"""The name of the SuperLink connection written into the CLI's config.toml."""

STOP_GRACE_SECONDS = 10.0

SUPERNODE_SCRIPT = Path(__file__).resolve().with_name("supernode.py")
"""``flower-supernode`` with shorter idle waits (``supernode_poll``, ``--supernode-poll``)."""
SUPEREXEC_SCRIPT = Path(__file__).resolve().with_name("superexec.py")
"""``flower-superexec`` whose ClientApp processes start warm (``warm_clientapps``, ``--warm-clientapps``)."""


def say(text: str) -> None:
    print(f"[launch] {text}", flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it when binding to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------ processes


def _proc_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (to tell a process from a later one with the same pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def descendants(pid: int) -> list[tuple[int, int | None]]:
    """(pid, start time) of every live descendant of ``pid``, children before grandchildren.

    Reads /proc (Linux). Elsewhere it returns nothing: Flower's own helpers (SuperExec,
    flwr-serverapp, flwr-clientapp) watch their parent's pid and exit when it is gone.
    """
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        out.append((child, _proc_start_time(child)))
        todo.extend(children.get(child, []))
    return out


def alive(pid: int, start_time: int | None) -> bool:
    now = _proc_start_time(pid)
    if now is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return start_time is None
    return start_time is None or now == start_time


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _timestamp_lines(stream: IO[bytes], log: Path) -> None:
    """Copy a process's output to its log file, each line with the wall-clock time it arrived."""
    with stream, log.open("ab") as out:
        for line in stream:
            now = time.time()
            stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d} "
            out.write(stamp.encode() + line)
            out.flush()


@dataclass
class Proc:
    """A process this launcher started; its output goes to ``log``."""

    name: str
    popen: subprocess.Popen
    log: Path
    expected_exit: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = STOP_GRACE_SECONDS, sig: int = signal.SIGTERM) -> None:
        """``sig`` to this process, SIGKILL after ``grace`` seconds; then the same for what it started."""
        tree = descendants(self.pid)  # before it dies: afterwards its children are re-parented
        if self.running():
            _signal(self.pid, sig)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                _signal(self.pid, signal.SIGKILL)
                self.popen.wait()
        else:
            self.popen.wait()
        left = [(p, t) for p, t in tree if alive(p, t)]
        for p, t in left:
            _signal(p, sig)
        deadline = time.monotonic() + grace
        while (left := [(p, t) for p, t in left if alive(p, t)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for p, _ in left:
            _signal(p, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the process and everything it started, at once (a device losing power)."""
        self.expected_exit = True
        tree = descendants(self.pid)
        _signal(self.pid, signal.SIGKILL)
        for p, t in tree:
            if alive(p, t):
                _signal(p, signal.SIGKILL)
        self.popen.wait()


# ------------------------------------------------------------------------------ federation


def dataset_directory(name: str, root: str | None = None) -> Path | None:
    """The directory on this machine that holds ``name``'s files, as the apps would find it."""
    from fedprune.data import SPECS, find_cifar, find_idx, search_roots

    spec = SPECS[name]
    for base in search_roots(name, root):
        for sub in spec.subdirs:
            directory = base / sub if sub else base
            found = find_cifar(directory) if name == "cifar10" else find_idx(directory)
            if found:
                return directory.resolve()
    return None


def node_data_copy(source: Path, target: Path) -> Path:
    """A node's own copy of the dataset in ``source``: IDX files decompressed (every ClientApp
    process reads them again, and gunzip costs half a second each time), anything else linked."""
    target.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.iterdir()):
        if file.suffix == ".gz" and "-idx" in file.name:
            plain = target / file.stem
            if not plain.exists():
                with gzip.open(file) as src, open(plain.with_suffix(".part"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
                plain.with_suffix(".part").rename(plain)
        elif file.is_file() and not (target / file.name).exists():
            (target / file.name).symlink_to(file.resolve())
    return target


@dataclass
class NodeSpec:
    index: int
    port: int
    home: Path
    node_config: dict[str, object]
    private_key: Path | None = None

    def node_config_arg(self) -> str:
        return " ".join(f"{k}={json.dumps(v)}" for k, v in self.node_config.items())


@dataclass
class LocalFederation:
    """One SuperLink and ``num_nodes`` SuperNodes as processes on 127.0.0.1.

    ``with LocalFederation(2) as fed: outcome = fed.run({...})``: entering starts everything and
    waits until the nodes are online; leaving stops every process it started, whatever happened.
    """

    num_nodes: int = 2
    num_partitions: int | None = None
    """Partitions the data is split into (default ``num_nodes``); node i holds partition i."""
    workdir: Path | None = None
    secure: bool = False
    certs_dir: Path | None = None
    data_root: str | None = "auto"
    """``auto``: every node gets its own copy of this machine's dataset in its home (``data/``);
    a path (may contain ``{partition_id}``): that directory; ``None``: no ``data-root`` at all."""
    dataset: str = "fashion-mnist"
    dataset_root: str | None = None
    """The experiment's ``dataset.root``, where ``auto`` looks first."""
    num_threads: int = 1
    isolation: str = "subprocess"
    supernode_poll: float | None = None
    """Seconds a SuperNode waits at most between its pulls (deploy/supernode.py); ``None``: Flower's 3 s."""
    warm_clientapps: bool = False
    """Fork each node's ClientApp processes from one that has imported the libraries (deploy/superexec.py);
    the SuperNodes then run with ``--isolation process`` and their SuperExecs are started here."""
    node_config_extra: dict[str, object] = field(default_factory=dict)
    echo: bool = True
    keep_workdir: bool = False

    procs: list[Proc] = field(default_factory=list, init=False)
    events: list[str] = field(default_factory=list, init=False)
    """What the launcher reported, in order (also printed when ``echo``)."""
    nodes: list[NodeSpec] = field(default_factory=list, init=False)
    port: int = field(default=0, init=False)
    superlink: Proc | None = field(default=None, init=False)
    certs: Certificates | None = field(default=None, init=False)
    failed: bool = field(default=False, init=False)
    _own_workdir: bool = field(default=False, init=False)

    # -------------------------------------------------------------- setup

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes: got {self.num_nodes}; allowed: >= 1")
        self.num_partitions = self.num_partitions or self.num_nodes
        if self.num_partitions < self.num_nodes:
            raise ValueError(f"num_partitions: got {self.num_partitions}; allowed: >= num_nodes ({self.num_nodes})")
        if self.isolation not in ("subprocess", "process"):
            raise ValueError(f"isolation: got {self.isolation!r}; allowed: subprocess, process")
        if self.warm_clientapps:
            self.isolation = "process"  # the SuperNode then leaves its SuperExec to us
        if self.supernode_poll is not None:
            check_poll(self.supernode_poll, "supernode_poll")
        if self.certs_dir is not None:
            self.secure = True
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="fedprune-federation-"))
            self._own_workdir = True
        self.workdir = Path(self.workdir).resolve()
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cli_home = self.workdir / "cli"
        self.cli_env = self._env(self.cli_home)

    def _say(self, text: str) -> None:
        self.events.append(text)
        if self.echo:
            say(text)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _env(self, home: Path) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        env = flower_env(home)
        env["FLWR_HOME"] = str(home)  # flower_env keeps an inherited FLWR_HOME; each process has its own
        env["PYTHONUNBUFFERED"] = "1"
        # A SuperExec looks for new ClientApp/ServerApp tasks every second by default; on loopback
        # that second is a visible share of a round (Flower reads this variable itself).
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
        return env

    def _spawn(self, name: str, cmd: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> Proc:
        log = self.logs / f"{name}.log"
        popen = subprocess.Popen(list(cmd), env=env, cwd=cwd or self.workdir, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)  # a terminal's Ctrl-C reaches only us
        assert popen.stdout is not None
        threading.Thread(target=_timestamp_lines, args=(popen.stdout, log), daemon=True).start()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        # for the one case nothing here can handle: the launcher itself killed with SIGKILL
        (self.workdir / "pids.json").write_text(json.dumps({p.name: p.pid for p in self.procs}, indent=1))
        self._say(f"started {name} (pid {popen.pid}); log {log}")
        return proc

    def _cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        out = subprocess.run(["flwr", *args], cwd=APP_ROOT, env=self.cli_env, capture_output=True,
                             text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"`flwr {' '.join(args)}` failed ({out.returncode}):\n{out.stdout}{out.stderr}")
        return out

    def _write_cli_config(self) -> None:
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        if self.secure:
            assert self.certs is not None
            lines.append(f"root-certificates = {json.dumps(str(self.certs.ca_cert))}")
        else:
            lines.append("insecure = true")
        (self.cli_home / "config.toml").write_text("\n".join(lines) + "\n")

    def _wait_healthy(self, proc: Proc, timeout: float = 90) -> None:
        scheme = "https" if self.secure else "http"
        context = ssl.create_default_context(cafile=str(self.certs.ca_cert)) if self.secure and self.certs else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.running():
                raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.tail()}")
            try:
                with urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=2, context=context):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"{proc.name} did not answer on {scheme}://{self.address}/health within {timeout:.0f} s:\n"
                           f"{proc.tail()}")

    def _data_root(self, index: int, home: Path) -> str | None:
        if self.data_root is None:
            return None
        if self.data_root != "auto":
            return str(Path(self.data_root.format(partition_id=index)).expanduser().resolve())
        source = dataset_directory(self.dataset, self.dataset_root)
        if source is None:
            return None  # the ClientApp searches its usual places and says what is missing
        return str(node_data_copy(source, home / "data"))

    # -------------------------------------------------------------- start

    def start_superlink(self) -> Proc:
        self.port = free_port()
        home = self.workdir / "superlink"
        cmd = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
               "--isolation", self.isolation, "--disable-runtime-dependency-installation"]
        if self.secure:
            self.certs = (generate(self.certs_dir, self.num_nodes) if self.certs_dir is not None
                          else generate(self.workdir / "certs", self.num_nodes))
            cmd += ["--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.server_cert),
                    "--ssl-keyfile", str(self.certs.server_key), "--enable-supernode-auth"]
        else:
            cmd += ["--insecure"]
        proc = self.superlink = self._spawn("superlink", cmd, self._env(home), cwd=home)
        self._wait_healthy(proc)
        self._write_cli_config()
        if self.isolation == "process":
            self._spawn("superexec-serverapp", self._superexec_cmd(self.address), self._env(home), cwd=home)
        return proc

    def _superexec_cmd(self, runtime_address: str) -> list[str]:
        # The ServerApp's SuperExec talks to the SuperLink's one port, which has TLS in secure mode;
        # a SuperNode's Runtime API stays plain on 127.0.0.1 (the SuperExec runs on the same device).
        tls = (["--root-certificates", str(self.certs.ca_cert)]
               if self.secure and self.certs and runtime_address == self.address else ["--insecure"])
        return ["flower-superexec", *tls, "--runtime-api-address", runtime_address]

    def register(self, public_key: Path) -> str:
        """``flwr supernode register``; returns the node id the SuperLink gave the key."""
        out = self._cli("supernode", "register", str(public_key), CONNECTION)
        text = " ".join((out.stdout + out.stderr).split())
        if not (m := re.search(r"SuperNode (\d+) registered", text)):
            raise RuntimeError(f"`flwr supernode register {public_key}` did not register it: {text}")
        return m.group(1)

    def node_spec(self, index: int, private_key: Path | None = None) -> NodeSpec:
        home = self.workdir / f"supernode-{index}"
        home.mkdir(parents=True, exist_ok=True)
        config: dict[str, object] = {"partition-id": index, "num-partitions": self.num_partitions}
        if (root := self._data_root(index, home)) is not None:
            config["data-root"] = root
        config["cache-dir"] = str(home / "cache")
        config["num-threads"] = self.num_threads
        config.update(self.node_config_extra)
        if private_key is None and self.certs is not None and index < self.certs.num_nodes:
            private_key = self.certs.node_key(index)
        return NodeSpec(index, free_port(), home, config, private_key)

    def start_supernode(self, spec: NodeSpec, name: str | None = None) -> Proc:
        cmd = ["flower-supernode", "--superlink", self.address, "--host", "127.0.0.1", "--port", str(spec.port),
               "--isolation", self.isolation, "--node-config", spec.node_config_arg()]
        if self.supernode_poll is not None:
            cmd[:1] = [sys.executable, str(SUPERNODE_SCRIPT), "--poll", str(self.supernode_poll)]
        if self.secure:
            assert self.certs is not None
            cmd += ["--root-certificates", str(self.certs.ca_cert)]
            if spec.private_key is not None:
                cmd += ["--auth-supernode-private-key", str(spec.private_key)]
        else:
            cmd += ["--insecure"]
        name = name or f"supernode-{spec.index}"
        env = self._env(spec.home)
        proc = self._spawn(name, cmd, env, cwd=spec.home)
        if self.isolation == "process":
            superexec = self._superexec_cmd(f"127.0.0.1:{spec.port}")
            if self.warm_clientapps:
                superexec[:1] = [sys.executable, str(SUPEREXEC_SCRIPT)]
            self._spawn(f"superexec-{name}", superexec, env, cwd=spec.home)
        return proc

    def online_nodes(self) -> list[dict]:
        """The SuperLink's list of SuperNodes (``flwr supernode list``) that are online."""
        out = self._cli("supernode", "list", CONNECTION, "--format", "json", check=False)
        try:
            nodes = json.loads(out.stdout).get("nodes", [])
        except (json.JSONDecodeError, AttributeError):
            return []
        return [n for n in nodes if str(n.get("status", "")).lower() == "online"]

    def wait_online(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if len(self.online_nodes()) >= count:
                return
            time.sleep(1.0)
        raise RuntimeError(f"only {len(self.online_nodes())} of {count} SuperNodes came online within "
                           f"{timeout:.0f} s; see the logs in {self.logs}")

    def start(self) -> "LocalFederation":
        self._say(f"work directory {self.workdir}")
        self.start_superlink()
        self._say(f"SuperLink on {self.address} ({'TLS + SuperNode authentication' if self.secure else 'insecure'}, "
                  f"{self.isolation} isolation)")
        for i in range(self.num_nodes):
            spec = self.node_spec(i)
            if self.secure:
                node_id = self.register(self.certs.node_public_key(i))
                self._say(f"registered {self.certs.node_public_key(i)} (SuperNode {node_id})")
            self.nodes.append(spec)
        for spec in self.nodes:
            self.start_supernode(spec)
        self.wait_online(self.num_nodes)
        self._say(f"{self.num_nodes} SuperNodes online")
        return self

    def check_alive(self) -> None:
        """Raise if a process died that was not meant to (naming it and its last log lines)."""
        for proc in self.procs:
            if not proc.expected_exit and not proc.running():
                proc.expected_exit = True
                raise RuntimeError(f"{proc.name} (pid {proc.pid}) exited with code {proc.popen.returncode}:\n"
                                   f"{proc.tail()}")

    # -------------------------------------------------------------- run

    def run(self, run_config: dict[str, object], *, timeout: float = 3600.0,
            on_line: Callable[[str], None] | None = None) -> RunOutcome:
        """Submit one run with ``flwr run . fedprune-local --stream`` and wait for it to end.

        Returns the status from ``flwr ls`` and the run directory (from the ServerApp's log).
        ``on_line`` sees every line of the streamed log as it arrives. A SuperNode that dies during
        the run is reported here and the run goes on without it; the SuperLink dying ends it.
        """
        if self.superlink is None:
            raise RuntimeError("the federation is not started (use `with LocalFederation(...) as fed:`)")
        cmd = ["flwr", "run", ".", CONNECTION, "--stream", "--run-config", run_config_arg(run_config)]
        log = self.logs / "run.log"
        popen = subprocess.Popen(cmd, cwd=APP_ROOT, env=self.cli_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                 start_new_session=True)
        runner = Proc("flwr-run", popen, log)
        self.procs.append(runner)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump(stream: IO[str]) -> None:
            for line in stream:
                lines.put(line)
            lines.put(None)

        assert popen.stdout is not None
        threading.Thread(target=pump, args=(popen.stdout,), daemon=True).start()
        run_id, run_dir, tail, reported = None, None, [], set()
        deadline = time.monotonic() + timeout
        timed_out = False
        with log.open("a") as out:
            while True:
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line:
                    out.write(line)
                    out.flush()
                    tail = (tail + [line])[-30:]
                    if self.echo:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                    if on_line is not None:
                        on_line(line)
                    if m := re.search(r"Successfully started run (\d+)", line):
                        run_id = m.group(1)
                    if m := re.search(r"results in (\S+)", line):
                        run_dir = Path(m.group(1))
                for proc in self.procs:
                    if proc.name.startswith("supernode-") and not proc.running() and proc.pid not in reported:
                        reported.add(proc.pid)
                        self._say(f"{proc.name} (pid {proc.pid}) is gone (exit code {proc.popen.returncode}); "
                            "the run goes on with the nodes left")
                if not self.superlink.running():
                    self._say(f"the SuperLink exited with code {self.superlink.popen.returncode}; the run cannot go on")
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    self._say(f"the run did not end within {timeout:.0f} s; stopping it")
                    if run_id is not None:
                        self._cli("stop", run_id, CONNECTION, check=False, timeout=60)
                    break
        runner.expected_exit = True
        runner.stop(grace=5)
        if run_id is None:
            return RunOutcome(None, "not-started", "".join(tail[-20:]), None)
        status, details = self._final_status(run_id)
        if timed_out:
            details = f"timed out after {timeout:.0f} s; {details}".strip("; ")
        return RunOutcome(run_id, status, details, run_dir)

    def _final_status(self, run_id: str, wait: float = 30) -> tuple[str, str]:
        """``flwr ls`` status; waits a little for ``finished:*`` (the log stream can end first)."""
        deadline = time.monotonic() + wait
        while True:
            status, details = run_status(run_id, self.cli_env)
            if status.startswith("finished") or time.monotonic() > deadline or not self.superlink.running():
                return status, details
            time.sleep(1.0)

    def kill_node(self, index: int) -> Proc:
        """SIGKILL SuperNode ``index`` and everything it started (as when a device loses power)."""
        for proc in self.procs:
            if proc.name in (f"supernode-{index}", f"superexec-supernode-{index}") and proc.running():
                proc.kill()
        return next(p for p in self.procs if p.name == f"supernode-{index}")

    # -------------------------------------------------------------- stop

    def stop(self) -> None:
        """Stop every process this federation started: SuperNodes first, the SuperLink last."""
        main = threading.current_thread() is threading.main_thread()
        # a second Ctrl-C must not cut this short
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            for proc in reversed(self.procs):
                proc.stop()
            if self.procs:
                self._say(f"stopped {len(self.procs)} processes: "
                          + ", ".join(f"{p.name} ({p.pid})" for p in self.procs))
        finally:
            if main:  # a handler not set from Python (None) cannot be put back: Python's default instead
                signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if self._own_workdir and not self.keep_workdir and not self.failed:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            self._say(f"logs and Flower homes kept in {self.workdir}")

    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.failed = True
            self.stop()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.failed = True
        self.stop()


# ------------------------------------------------------------------------------ CLI


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2, help="number of SuperNodes")
    parser.add_argument("--num-partitions", type=int, default=0,
                        help="partitions of the data (0: one per node); node i holds partition i")
    parser.add_argument("--experiment", default="configs/fedavg.yaml")
    parser.add_argument("--num-server-rounds", type=int, default=0, help="0: the experiment's")
    parser.add_argument("--seed", type=int, default=-1, help="-1: the experiment's")
    parser.add_argument("--overrides", default="", help='e.g. "client.lr=0.01 partition.alpha=0.1"')
    parser.add_argument("--run-name", default="")
    parser.add_argument("--output-dir", default=str(APP_ROOT / "outputs"))
    parser.add_argument("--secure", action="store_true", help="TLS and SuperNode authentication")
    parser.add_argument("--certs", type=Path, default=None,
                        help="use (or create) the CA, SuperLink certificate and node keys in this "
                             "directory (see python -m deploy.certs); implies --secure")
    parser.add_argument("--data-root", default="auto",
                        help="each node's data directory (may contain {partition_id}); 'auto': a copy "
                             "of this machine's dataset in every node's home; 'none': leave it to the "
                             "ClientApp")
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads per ClientApp")
    parser.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess",
                        help="process: start a flower-superexec per SuperLink and SuperNode (as docker-compose does)")
    parser.add_argument("--supernode-poll", type=float, default=None, metavar="SECONDS",
                        help="cap Flower's idle waits of each SuperNode (3 s between empty pulls) at this many "
                             "seconds (deploy/supernode.py); default: Flower's")
    parser.add_argument("--warm-clientapps", action="store_true",
                        help="fork each node's ClientApp processes from one that has imported torch and Flower "
                             "(deploy/superexec.py) instead of starting each afresh; implies --isolation process")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped")
    parser.add_argument("--resume", default="", metavar="RUN_DIR",
                        help="continue this run directory from its last checkpoint (same experiment)")
    args = parser.parse_args(argv)

    run_config = {"experiment": args.experiment, "num-server-rounds": args.num_server_rounds, "seed": args.seed,
                  "overrides": args.overrides, "run-name": args.run_name,
                  "output-dir": str(Path(args.output_dir).resolve()),
                  "resume": str(Path(args.resume).resolve()) if args.resume else ""}
    try:
        experiment = experiment_from_run_config(run_config)  # bad input fails here, before any process
    except ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Ctrl-C and SIGTERM stop everything this launcher started, whatever this process inherited
    # (a parent that ignores or blocks SIGINT passes that on to its children)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    federation = LocalFederation(
        args.nodes, num_partitions=args.num_partitions or None, workdir=args.workdir, secure=args.secure, certs_dir=args.certs,
        data_root=None if args.data_root == "none" else args.data_root, dataset=experiment.dataset.name,
        dataset_root=experiment.dataset.root,
        num_threads=args.num_threads, isolation=args.isolation, supernode_poll=args.supernode_poll,
        warm_clientapps=args.warm_clientapps, keep_workdir=args.keep_workdir)
    try:
        with federation as fed:
            outcome = fed.run(run_config, timeout=args.timeout)
            if not outcome.ok:
                fed.failed = True
    except KeyboardInterrupt:
        say("interrupted; everything this launcher started is stopped")
        return 130
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    say(f"run {outcome.run_id}: {outcome.status}" + (f" ({outcome.details})" if not outcome.ok else ""))
    if outcome.run_dir is not None:
        say(f"results in {outcome.run_dir}")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
