"""Run an experiment in Flower's simulation through ``flwr run .``, and tell whether it worked.

``python -m fedprune.simulate [--experiment configs/fedavg.yaml] [--num-supernodes 10] ...``

What it takes care of (see shared/reference/flower-api.md):

* a Flower home inside the project (``.flwr-home``) unless $FLWR_HOME is set;
* the SuperLink's runtime dependency install turned off and Ray's log noise silenced, in the
  environment of the managed local SuperLink that ``flwr run`` starts;
* one CPU per simulated client (``client-resources-num-cpus=1``);
* the run's real status from ``flwr ls`` (``flwr run`` exits 0 even when the run failed);
* the managed SuperLink: reused when one is already running, and stopped afterwards when this
  command started it (``--keep-superlink`` leaves it running for the next run);
* ``--ray-address HOST:PORT``: the simulation's ClientApps run on an existing Ray cluster (one
  started with ``ray start --head``, plus workers) instead of a Ray instance of its own. Flower's
  Ray backend calls ``ray.init()``, which joins the cluster named by ``$RAY_ADDRESS``; the managed
  SuperLink (and the simulation it starts) get that variable, so it must be started by this command
  (docs/ray-cluster.md).

Exit status 0 only when the run finished with status ``finished:completed``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fedprune.experiment import APP_ROOT

QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "PYTHONWARNINGS": "ignore",
}
LOCAL_HEALTH = "http://127.0.0.1:{port}/health"


@dataclass
class RunOutcome:
    run_id: str | None
    status: str
    details: str
    run_dir: Path | None

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_HOME", str(APP_ROOT / ".flwr-home"))
    env.update(QUIET_ENV)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def _local_superlink_up(env: dict[str, str]) -> bool:
    port = env.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")
    try:
        with urllib.request.urlopen(LOCAL_HEALTH.format(port=port), timeout=2):
            return True
    except OSError:
        return False


def superlink_pids(env: dict[str, str]) -> list[int]:
    """PIDs of managed SuperLinks of this Flower home (their log file lives inside it)."""
    marker = str(Path(env["FLWR_HOME"]) / "local-superlink")
    out = subprocess.run(["pgrep", "-f", f"flower-superlink.*{re.escape(marker)}"],
                         capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def stop_local_superlink(env: dict[str, str]) -> None:
    for pid in superlink_pids(env):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while superlink_pids(env) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in superlink_pids(env):
        os.kill(pid, signal.SIGKILL)


def run_config_arg(run_config: dict[str, object]) -> str:
    parts = []
    for key, value in run_config.items():
        if isinstance(value, str) and "'" in value:
            raise ValueError(f"run config {key}: {value!r} may not contain a single quote")
        parts.append(f"{key}='{value}'" if isinstance(value, str) else f"{key}={json.dumps(value)}")
    return " ".join(parts)


def run_status(run_id: str, env: dict[str, str]) -> tuple[str, str]:
    out = subprocess.run(["flwr", "ls", "--run-id", run_id, "--format", "json"], cwd=APP_ROOT, env=env,
                         capture_output=True, text=True)
    try:
        run = json.loads(out.stdout)["runs"][0]
        return run["status"], run.get("status-details", "")
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown", (out.stdout + out.stderr).strip()


def _environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def simulate(run_config: dict[str, object], num_supernodes: int = 10, *, flwr_home: Path | None = None,
             keep_superlink: bool = False, echo: bool = True, ray_address: str | None = None) -> RunOutcome:
    """``flwr run . --stream`` with ``run_config``; returns the run's final status and directory.

    ``ray_address``: run the ClientApps on the Ray cluster there (``HOST:PORT`` of its head).
    """
    env = flower_env(flwr_home)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    started_here = not _local_superlink_up(env)
    if not started_here and ray_address and any(
            _environ_of(pid).get("RAY_ADDRESS") != ray_address for pid in superlink_pids(env)):
        raise RuntimeError(
            f"a managed SuperLink of {env['FLWR_HOME']} is already running without RAY_ADDRESS={ray_address}: its "
            "simulations would start a Ray instance of their own. Stop it (its pid: pgrep -f flower-superlink), "
            "or use another Flower home ($FLWR_HOME) and ports ($FLWR_LOCAL_SUPERLINK_HTTP_API_PORT, "
            "$FLWR_LOCAL_CONTROL_API_PORT)")
    cmd = ["flwr", "run", ".", "--stream", "--run-config", run_config_arg(run_config),
           "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus=1"]
    run_id, run_dir, lines = None, None, []
    try:
        proc = subprocess.Popen(cmd, cwd=APP_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            if m := re.search(r"Successfully started run (\d+)", line):
                run_id = m.group(1)
            if m := re.search(r"results in (\S+)", line):
                run_dir = Path(m.group(1))
        proc.wait()
        if run_id is None:
            return RunOutcome(None, "not-started", "".join(lines[-20:]), None)
        status, details = run_status(run_id, env)
        return RunOutcome(run_id, status, details, run_dir)
    finally:
        if started_here and not keep_superlink:
            stop_local_superlink(env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="configs/fedavg.yaml")
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--num-server-rounds", type=int, default=0)
    parser.add_argument("--seed", type=int, default=-1)
    parser.add_argument("--overrides", default="", help='e.g. "client.lr=0.01 partition.alpha=0.1"')
    parser.add_argument("--run-name", default="")
    parser.add_argument("--output-dir", default=str(APP_ROOT / "outputs"))
    parser.add_argument("--resume", default="", metavar="RUN_DIR",
                        help="continue this run directory from its last checkpoint (same experiment)")
    parser.add_argument("--keep-superlink", action="store_true")
    parser.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS", ""), metavar="HOST:PORT",
                        help="run on this existing Ray cluster (default: $RAY_ADDRESS; none: a Ray instance "
                             "of the run's own)")
    args = parser.parse_args(argv)
    outcome = simulate(
        {"experiment": args.experiment, "num-server-rounds": args.num_server_rounds, "seed": args.seed,
         "overrides": args.overrides, "run-name": args.run_name,
         "output-dir": str(Path(args.output_dir).resolve()),
         "resume": str(Path(args.resume).resolve()) if args.resume else ""},
        args.num_supernodes, keep_superlink=args.keep_superlink, ray_address=args.ray_address or None,
    )
    print(f"run {outcome.run_id}: {outcome.status}" + (f" ({outcome.details})" if not outcome.ok else ""))
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
