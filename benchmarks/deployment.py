"""The same experiment in Flower's simulation and over real processes: accuracy and time per round.

``python -m benchmarks.deployment [--nodes 2] [--rounds 3] [--repeats 1]``

runs configs/fedavg.yaml (the default experiment, its own seed) with N clients twice per repeat:

* **simulation**: ``fedprune.simulate.simulate`` (``flwr run .`` against a managed local SuperLink
  with the simulation runtime: N virtual SuperNodes on Ray, one CPU each), in a temporary Flower
  home on ports of its own;
* **processes**: ``deploy.launch.LocalFederation`` (a SuperLink and N SuperNodes as processes on
  127.0.0.1, each with its own Flower home and data copy; one ``flwr-clientapp`` process per message,
  as in any deployment);

and writes benchmarks/results/deployment.json: for each, the final test accuracy, every round's
accuracy and wall seconds (from the run's rounds.jsonl, measured by the ServerApp from sending a
round's first message to the end of its central evaluation), the mean seconds per round over all
rounds and over rounds 2.. (round 1 also carries node discovery and, in the simulation, Ray's
start), the whole command's wall time and the load average around it (a busy machine shows there).
It checks the two figures the deployment issue asks for: final accuracy within 0.5 points, and a
round over processes at most 3x a round in the simulation. Runs alternate so drift hits both alike.
About 5 minutes with the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import flwr
import torch

from benchmarks.sweep import write_json
from deploy.launch import LocalFederation, free_port
from fedprune.experiment import APP_ROOT
from fedprune.simulate import simulate

RESULTS = Path(__file__).resolve().parent / "results" / "deployment.json"
EXPERIMENT = "configs/fedavg.yaml"
ACCURACY_TOLERANCE = 0.005
MAX_ROUND_RATIO = 3.0


def read_rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


PHASES = ("train_phase", "evaluate_phase", "central_evaluation")
"""A round's parts, as the ServerApp records them (rounds.jsonl)."""


def phase_seconds(rounds: list[dict]) -> dict[str, list]:
    """``<phase>_seconds``: each phase's seconds, round by round (None where not recorded)."""
    return {f"{phase}_seconds": [r.get(f"{phase}_seconds") for r in rounds] for phase in PHASES}


def summarize(kind: str, outcome, wall: float, load: tuple[float, float]) -> dict:
    if not outcome.ok or outcome.run_dir is None:
        raise SystemExit(f"{kind}: run {outcome.run_id} ended {outcome.status}: {outcome.details}")
    records = read_rounds(outcome.run_dir)
    rounds = [r for r in records if r["round"] >= 1]
    seconds = [r["round_seconds"] for r in rounds]
    return {
        "kind": kind, "run_id": outcome.run_id, "status": outcome.status, "run_dir": str(outcome.run_dir),
        "final_test_accuracy": records[-1]["test_accuracy"],
        "test_accuracy_per_round": [r["test_accuracy"] for r in records],
        "round_seconds": seconds,
        "mean_round_seconds": statistics.fmean(seconds),
        "mean_round_seconds_from_round_2": statistics.fmean(seconds[1:]) if len(seconds) > 1 else None,
        "train_compute_seconds_per_round": [r.get("train_compute_seconds") for r in rounds],
        **phase_seconds(rounds),
        "command_wall_seconds": wall,
        "load_average_1min_before_after": list(load),
    }


def run_simulation(run_config: dict, nodes: int, home: Path) -> dict:
    # a managed SuperLink of our own: own Flower home, own ports (another may be running)
    os.environ["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    os.environ["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    load0, t0 = os.getloadavg()[0], time.monotonic()
    outcome = simulate(run_config, nodes, flwr_home=home, echo=False)
    return summarize("simulation", outcome, time.monotonic() - t0, (load0, os.getloadavg()[0]))


def run_processes(run_config: dict, nodes: int, workdir: Path, isolation: str,
                  supernode_poll: float | None = None, warm_clientapps: bool = False) -> dict:
    """``supernode_poll``: cap the SuperNodes' idle waits (deploy/supernode.py); ``None``: Flower's.
    ``warm_clientapps``: fork the ClientApp processes from a warm zygote (deploy/superexec.py)."""
    load0, t0 = os.getloadavg()[0], time.monotonic()
    with LocalFederation(nodes, workdir=workdir, echo=False, isolation=isolation,
                         supernode_poll=supernode_poll, warm_clientapps=warm_clientapps) as fed:
        outcome = fed.run(run_config, timeout=1800)
    return {**summarize("processes", outcome, time.monotonic() - t0, (load0, os.getloadavg()[0])),
            "supernode_poll_seconds": supernode_poll, "warm_clientapps": warm_clientapps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="clients (2 to 4 keep it under 10 minutes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    pairs = []
    with tempfile.TemporaryDirectory(prefix="fedprune-bench-deploy-") as tmp:
        tmp_path = Path(tmp)
        for rep in range(args.repeats):
            config = {"experiment": EXPERIMENT, "num-server-rounds": args.rounds, "seed": -1, "overrides": "",
                      "output-dir": str(tmp_path / "outputs")}
            print(f"[bench] repeat {rep + 1}/{args.repeats}: simulation, {args.nodes} nodes, {args.rounds} rounds",
                  flush=True)
            sim = run_simulation({**config, "run-name": f"sim-{rep}"}, args.nodes, tmp_path / f"sim-home-{rep}")
            print(f"[bench]   final accuracy {sim['final_test_accuracy']:.4f}, "
                  f"{sim['mean_round_seconds']:.1f} s/round", flush=True)
            print(f"[bench] repeat {rep + 1}/{args.repeats}: processes", flush=True)
            real = run_processes({**config, "run-name": f"processes-{rep}"}, args.nodes,
                                 tmp_path / f"federation-{rep}", args.isolation)
            print(f"[bench]   final accuracy {real['final_test_accuracy']:.4f}, "
                  f"{real['mean_round_seconds']:.1f} s/round", flush=True)
            pairs.append({"simulation": sim, "processes": real})

    def mean_of(kind: str, key: str) -> float:
        return statistics.fmean(p[kind][key] for p in pairs)

    sim_round, real_round = mean_of("simulation", "mean_round_seconds"), mean_of("processes", "mean_round_seconds")
    steady = None
    if args.rounds > 1:
        steady = (mean_of("processes", "mean_round_seconds_from_round_2")
                  / mean_of("simulation", "mean_round_seconds_from_round_2"))
    gaps = [abs(p["processes"]["final_test_accuracy"] - p["simulation"]["final_test_accuracy"]) for p in pairs]
    result = {
        "what": "configs/fedavg.yaml, the same seed, in the simulation and over real processes on loopback",
        "command": "python -m benchmarks.deployment " + " ".join(sys.argv[1:] if argv is None else argv),
        "setting": {"experiment": EXPERIMENT, "nodes": args.nodes, "rounds": args.rounds, "repeats": args.repeats,
                    "isolation": args.isolation, "simulation_client_cpus": 1, "clientapp_torch_threads": 1},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "flwr": flwr.__version__, "torch": torch.__version__},
        "summary": {
            "final_test_accuracy_simulation": [p["simulation"]["final_test_accuracy"] for p in pairs],
            "final_test_accuracy_processes": [p["processes"]["final_test_accuracy"] for p in pairs],
            "max_final_accuracy_gap_points": 100 * max(gaps),
            "mean_round_seconds_simulation": sim_round,
            "mean_round_seconds_processes": real_round,
            "round_time_ratio": real_round / sim_round,
            "round_time_ratio_from_round_2": steady,
            "accuracy_within_0.5_points": max(gaps) <= ACCURACY_TOLERANCE,
            "round_ratio_at_most_3": real_round / sim_round <= MAX_ROUND_RATIO,
            "round_ratio_from_round_2_at_most_3": None if steady is None else steady <= MAX_ROUND_RATIO,
        },
        "runs": pairs,
    }
    for pair in pairs:  # run directories were temporary
        for run in pair.values():
            run["run_dir"] = str(Path(run["run_dir"]).name)
    write_json(args.out, result)
    s = result["summary"]
    print(f"[bench] accuracy: simulation {s['final_test_accuracy_simulation']}, processes "
          f"{s['final_test_accuracy_processes']} (gap {s['max_final_accuracy_gap_points']:.2f} points)")
    print(f"[bench] seconds per round: simulation {sim_round:.1f}, processes {real_round:.1f}, ratio "
          f"{s['round_time_ratio']:.2f} (from round 2: {steady if steady is None else round(steady, 2)})")
    print(f"[bench] wrote {args.out.relative_to(APP_ROOT) if args.out.is_relative_to(APP_ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
