"""Scale: seconds per round and peak memory of the simulation at 100, 1,000 and 10,000 clients, and
real processes against the simulation.

``python -m benchmarks.scale [--clients 100 1000 10000] [--rounds 5] [--per-round 10] [--quick]``

* **Simulation at scale**: configs/fedavg.yaml (Fashion-MNIST, the small CNN, Dirichlet alpha 0.5)
  with N virtual SuperNodes (``fedprune.simulate``: ``flwr run .`` on a managed SuperLink of its
  own, Ray with one CPU per ClientApp actor), ``--per-round`` clients sampled for training and as
  many for evaluation each round (``sampling.fraction_* = per_round / N``), and
  ``partition.min_partition_size=0`` at every N (flwr-datasets takes the first Dirichlet draw: at
  10,000 partitions of 60,000 images, a minimum of 1 is out of reach in its ten draws; the few
  nodes whose partition is empty are refused, and counted here). Seconds per round come from the
  run's rounds.jsonl (the ServerApp's clock, from a round's first message to its central
  evaluation; round 1 also carries the discovery of every node and Ray's start of the actors).
  Peak memory is the largest sum, sampled every half second, of the proportional set size (PSS:
  shared pages split between the processes that map them) of every process of the run: the
  ``flwr run`` command, the SuperLink, the simulation (ServerApp and the nodes' contexts) and Ray
  (its services and ClientApp actors).
* **Processes vs simulation**: the default experiment (configs/fedavg.yaml, 2 nodes, ``--ratio-rounds``
  rounds) in the simulation and over real SuperLink + SuperNode processes on loopback
  (benchmarks/deployment.py's two runners, one ``flwr-clientapp`` process per message), in turn,
  ``--ratio-repeats`` times: the ratio of their mean seconds per round per repeat, and the mean and
  std of those ratios. The processes run three times (:data:`PROCESS_VARIANTS`): with SuperNodes
  whose idle waits are capped at ``SUPERNODE_POLL`` seconds (``deploy.launch --supernode-poll``,
  deploy/supernode.py) and ClientApp processes forked from a warm zygote (``--warm-clientapps``,
  deploy/superexec.py), the ``summary``'s ratio; with the capped waits only (``capped_waits``); and
  as Flower starts them, a SuperNode that waits 3 s after every empty pull and a fresh
  ``flwr-clientapp`` process per message (``stock_supernode``).

For context it also times one central evaluation alone in this process (``torch`` with one thread):
every round's seconds include one.

Writes benchmarks/results/scale.json; its ``summary`` holds what issue 15 names. ``--quick`` runs
100 and 1,000 clients for 2 rounds and the comparison for 1 round (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import flwr
import torch

from benchmarks.deployment import PHASES, phase_seconds, read_rounds, run_processes, run_simulation
from benchmarks.sweep import write_json
from deploy.launch import descendants, free_port
from fedprune.experiment import APP_ROOT
from fedprune.simulate import flower_env, simulate, superlink_pids

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
LOGS = APP_ROOT / "outputs"
"""Each run's streamed log goes to outputs/scale-<clients>.log."""
EXPERIMENT = "configs/fedavg.yaml"
FIRST_ROUND_LIMIT, LATER_ROUND_LIMIT, MEMORY_LIMIT_GB, RATIO_LIMIT = 60.0, 5.0, 8.0, 1.5
SUPERNODE_POLL = 0.1
"""Seconds; as often as the simulation's grid looks for replies."""
PROCESS_VARIANTS = {"processes": {"supernode_poll": SUPERNODE_POLL, "warm_clientapps": True},
                    "capped_waits": {"supernode_poll": SUPERNODE_POLL},
                    "stock_supernode": {}}
"""How the real-process federations start their SuperNodes and ClientApps (``processes``: the summary's ratio)."""
OTHER_VARIANTS = tuple(kind for kind in PROCESS_VARIANTS if kind != "processes")
"""The variants the summary reports beside its own ratio."""


def pss_bytes(pid: int) -> int:
    """A process's proportional set size (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class MemoryPeak:
    """Samples the summed PSS of this process's descendants and of the given roots' trees."""

    def __init__(self, roots, interval: float = 0.5) -> None:
        self.roots, self.interval = roots, interval
        self.peak, self.samples = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = {p for p, _ in descendants(os.getpid())}
            for root in self.roots():
                pids |= {root} | {p for p, _ in descendants(root)}
            self.peak = max(self.peak, sum(pss_bytes(p) for p in pids))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemoryPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_at_scale(clients: int, rounds: int, per_round: int, workdir: Path) -> dict:
    """One simulation of ``clients`` nodes; its rounds' seconds and the run's peak memory."""
    os.environ["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    os.environ["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    home = workdir / f"home-{clients}"
    fraction = per_round / clients
    overrides = (f"sampling.fraction_train={fraction} sampling.fraction_evaluate={fraction} "
                 f"sampling.min_train_nodes={per_round} sampling.min_evaluate_nodes={per_round} "
                 "partition.min_partition_size=0")
    run_config = {"experiment": EXPERIMENT, "num-server-rounds": rounds, "seed": -1, "overrides": overrides,
                  "run-name": f"scale-{clients}", "output-dir": str(workdir / "outputs")}
    env = flower_env(home)
    load0, t0 = os.getloadavg()[0], time.monotonic()
    log = io.StringIO()
    with MemoryPeak(lambda: superlink_pids(env)) as memory, contextlib.redirect_stdout(log):
        outcome = simulate(run_config, clients, flwr_home=home)
    wall = time.monotonic() - t0
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / f"scale-{clients}.log").write_text(log.getvalue())
    if not outcome.ok or outcome.run_dir is None:
        raise SystemExit(f"{clients} clients: run {outcome.run_id} ended {outcome.status}: {outcome.details}")
    records = [r for r in read_rounds(outcome.run_dir) if r["round"] >= 1]
    seconds = [r["round_seconds"] for r in records]
    refused = log.getvalue().count("is refused and will not be sampled")
    return {"clients": clients, "per_round": per_round, "rounds": rounds, "round_seconds": seconds,
            "first_round_seconds": seconds[0], "later_round_seconds_max": max(seconds[1:], default=None),
            "later_round_seconds_mean": statistics.fmean(seconds[1:]) if len(seconds) > 1 else None,
            **phase_seconds(records),
            "peak_memory_bytes": memory.peak, "memory_samples": memory.samples,
            "train_nodes_per_round": [r.get("train_num_nodes") for r in records],
            "val_nodes_per_round": [r.get("val_num_nodes") for r in records],
            "failed_replies": sum(r["failed_replies"] for r in records),
            "rejected_replies": sum(r["rejected_replies"] for r in records),
            "refused_nodes": refused, "describe_bytes_down": sum(r.get("bytes_down_describe", 0) for r in records),
            "final_test_accuracy": records[-1].get("test_accuracy"),
            "command_wall_seconds": wall, "load_average_1min_before_after": [load0, os.getloadavg()[0]]}


def central_evaluation_seconds() -> float:
    """What a round's central evaluation (the ServerApp's, the whole test set) takes alone here."""
    from fedprune.allocator import keep_freed_memory
    from fedprune.experiment import load_experiment
    from fedprune.task import new_model, test_data
    from fedprune.training import evaluate

    keep_freed_memory()  # as the ServerApp does
    experiment = load_experiment(EXPERIMENT)
    x, y = test_data(experiment.dataset.name, experiment.dataset.root)
    model, t0 = new_model(experiment), time.monotonic()
    evaluate(model, x, y, experiment.evaluation.batch_size)
    return time.monotonic() - t0


def run_ratio(rounds: int, repeats: int, workdir: Path) -> dict:
    """The default experiment, 2 nodes, in the simulation and over real processes (each of
    :data:`PROCESS_VARIANTS`), ``repeats`` times; the ratios per repeat, their mean and std."""
    config = {"experiment": EXPERIMENT, "num-server-rounds": rounds, "seed": -1, "overrides": "",
              "output-dir": str(workdir / "outputs")}
    pairs = []
    for rep in range(repeats):
        print(f"[scale]   repeat {rep + 1}/{repeats}", flush=True)
        pair = {"simulation": run_simulation({**config, "run-name": f"ratio-sim-{rep}"}, 2,
                                             workdir / f"ratio-sim-home-{rep}")}
        for kind, options in PROCESS_VARIANTS.items():
            pair[kind] = run_processes({**config, "run-name": f"ratio-{kind}-{rep}"}, 2,
                                       workdir / f"ratio-federation-{kind}-{rep}", "subprocess", **options)
        for kind in ("simulation", *PROCESS_VARIANTS):
            pair[kind]["run_dir"] = Path(pair[kind]["run_dir"]).name
        sim, real = pair["simulation"], pair["processes"]
        pair["ratio"] = real["mean_round_seconds"] / sim["mean_round_seconds"]
        pair["ratio_from_round_2"] = (real["mean_round_seconds_from_round_2"]
                                      / sim["mean_round_seconds_from_round_2"] if rounds > 1 else None)
        for kind in OTHER_VARIANTS:
            pair[f"ratio_{kind}"] = pair[kind]["mean_round_seconds"] / sim["mean_round_seconds"]
        pairs.append(pair)
    out: dict = {"repeats": pairs}
    for key in ("ratio", "ratio_from_round_2", *(f"ratio_{kind}" for kind in OTHER_VARIANTS)):
        values = [p[key] for p in pairs if p[key] is not None]
        out[key] = statistics.fmean(values) if values else None
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
    return out


def summarize(runs: list[dict], ratio: dict | None) -> dict:
    out: dict = {}
    for run in runs:
        n = run["clients"]
        out[f"clients_{n}_first_round_seconds"] = run["first_round_seconds"]
        out[f"clients_{n}_later_round_seconds_max"] = run["later_round_seconds_max"]
        out[f"clients_{n}_peak_memory_gb"] = run["peak_memory_bytes"] / 1e9
    big = next((r for r in runs if r["clients"] == 10_000), None)
    if big is not None:
        out["10000_clients_first_round_under_60_s"] = big["first_round_seconds"] < FIRST_ROUND_LIMIT
        out["10000_clients_later_rounds_under_5_s"] = (big["later_round_seconds_max"] is not None
                                                       and big["later_round_seconds_max"] < LATER_ROUND_LIMIT)
        out["10000_clients_peak_memory_under_8_gb"] = big["peak_memory_bytes"] / 1e9 < MEMORY_LIMIT_GB
    if ratio is not None:
        def mean_round(kind: str) -> float:
            return statistics.fmean(p[kind]["mean_round_seconds"] for p in ratio["repeats"])

        out["ratio_repeats"] = len(ratio["repeats"])
        out["mean_round_seconds_simulation"] = mean_round("simulation")
        out["mean_round_seconds_processes"] = mean_round("processes")
        out["round_time_ratio_processes_to_simulation"] = ratio["ratio"]
        out["round_time_ratio_processes_to_simulation_std"] = ratio["ratio_std"]
        out["round_time_ratio_from_round_2"] = ratio["ratio_from_round_2"]
        out["processes_within_1.5x_simulation"] = ratio["ratio"] <= RATIO_LIMIT
        out["supernode_poll_seconds"] = SUPERNODE_POLL
        out["same_final_accuracy"] = all(
            len({p[kind]["final_test_accuracy"] for kind in ("simulation", *PROCESS_VARIANTS)}) == 1
            for p in ratio["repeats"])
        for kind in OTHER_VARIANTS:
            out[f"mean_round_seconds_{kind}"] = mean_round(kind)
            out[f"round_time_ratio_{kind}"] = ratio[f"ratio_{kind}"]
            out[f"round_time_ratio_{kind}_std"] = ratio[f"ratio_{kind}_std"]
    return out


def table(results: dict) -> str:
    """The README table: one row per federation size, then the processes-vs-simulation line."""
    lines = ["| simulated clients (10 per round) | first round (s) | later rounds, mean / max (s) | of which training "
             "/ federated evaluation / central evaluation, mean (s) | peak memory (GB) | refused nodes |",
             "|---:|---:|---:|---:|---:|---:|"]
    for run in results["runs"]:
        later = ("–" if run["later_round_seconds_max"] is None else
                 f"{run['later_round_seconds_mean']:.2f} / {run['later_round_seconds_max']:.2f}")
        lines.append(f"| {run['clients']:,} | {run['first_round_seconds']:.1f} | {later} | {phases(run)} | "
                     f"{run['peak_memory_bytes'] / 1e9:.2f} | {run['refused_nodes']} |")
    if results.get("ratio"):
        s, pairs = results["summary"], results["ratio"]["repeats"]

        def pm(key: str) -> str:
            std = s.get(f"{key}_std")
            return f"{s[key]:.2f}x" + ("" if std is None else f" +- {std:.2f}")

        text = (f"Real processes (2 SuperNodes, {EXPERIMENT}, idle waits capped at {s['supernode_poll_seconds']} s, "
                f"ClientApps forked from a warm zygote): {s['mean_round_seconds_processes']:.1f} s per round against "
                f"{s['mean_round_seconds_simulation']:.1f} s in the simulation, "
                f"{pm('round_time_ratio_processes_to_simulation')} (mean +- std of {s['ratio_repeats']} alternated "
                f"repeats); from round 2, training / federated evaluation / central evaluation "
                f"{phases([p['processes'] for p in pairs])} s over processes, "
                f"{phases([p['simulation'] for p in pairs])} s in the simulation. With the capped waits only (a "
                f"fresh ClientApp process per message): {s['mean_round_seconds_capped_waits']:.1f} s per round, "
                f"{pm('round_time_ratio_capped_waits')}. As Flower starts them (3 s after every empty pull, a fresh "
                f"process per message): {s['mean_round_seconds_stock_supernode']:.1f} s per round, "
                f"{pm('round_time_ratio_stock_supernode')}. Final accuracy equal in all four: "
                f"{'yes' if s['same_final_accuracy'] else 'no'}.")
        lines += ["", text]
    return "\n".join(lines)


def phases(runs: dict | list[dict]) -> str:
    """Mean seconds of each phase of the rounds after the first, over ``runs``, ``a / b / c`` (– where
    not recorded)."""
    runs = [runs] if isinstance(runs, dict) else runs
    means = []
    for phase in PHASES:
        later = [v for run in runs for v in run.get(f"{phase}_seconds", [])[1:] if v is not None]
        means.append(f"{statistics.fmean(later):.1f}" if later else "–")
    return " / ".join(means)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[100, 1_000, 10_000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--ratio-rounds", type=int, default=3, help="0: skip the processes-vs-simulation runs")
    parser.add_argument("--ratio-repeats", type=int, default=3, help="alternated repeats of that comparison")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.rounds, args.ratio_rounds, args.ratio_repeats = [100, 1_000], 2, 1, 1
    torch.set_num_threads(1)
    runs, ratio = [], None
    evaluation_seconds = central_evaluation_seconds()
    with tempfile.TemporaryDirectory(prefix="fedprune-bench-scale-") as tmp:
        for clients in args.clients:
            print(f"[scale] {clients} clients, {args.per_round} per round, {args.rounds} rounds", flush=True)
            runs.append(run_at_scale(clients, args.rounds, args.per_round, Path(tmp)))
            r = runs[-1]
            print(f"[scale]   first round {r['first_round_seconds']:.1f} s, later max "
                  f"{r['later_round_seconds_max'] or 0:.1f} s, peak {r['peak_memory_bytes'] / 1e9:.2f} GB", flush=True)
        if args.ratio_rounds:
            print(f"[scale] processes vs simulation: {EXPERIMENT}, 2 nodes, {args.ratio_rounds} rounds", flush=True)
            ratio = run_ratio(args.ratio_rounds, args.ratio_repeats, Path(tmp))
            print(f"[scale]   ratio {ratio['ratio']:.2f} (capped waits only: {ratio['ratio_capped_waits']:.2f}; "
                  f"as Flower starts them: {ratio['ratio_stock_supernode']:.2f})", flush=True)
    results = {
        "what": "seconds per round and peak memory of the simulation by federation size; real processes vs "
                "the simulation",
        "command": "python -m benchmarks.scale " + " ".join(sys.argv[1:] if argv is None else argv),
        "setting": {"experiment": EXPERIMENT, "per_round": args.per_round, "rounds": args.rounds,
                    "partition": "dirichlet alpha 0.5, min_partition_size 0", "simulation_client_cpus": 1,
                    "ratio_nodes": 2, "ratio_rounds": args.ratio_rounds,
                    "ratio_repeats": args.ratio_repeats},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "flwr": flwr.__version__, "torch": torch.__version__},
        "summary": summarize(runs, ratio),
        "central_evaluation_seconds_alone": evaluation_seconds,
        "runs": runs,
        "ratio": ratio,
    }
    write_json(args.out, results)
    print(table(results))
    print(f"[scale] wrote {args.out.relative_to(APP_ROOT) if args.out.is_relative_to(APP_ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
