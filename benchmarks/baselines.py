"""Dense FedAvg and every pruning baseline, side by side on the same partition and seed.

``python -m benchmarks.baselines`` (``make bench``) runs dense FedAvg and random, magnitude,
SNIP, SynFlow and gradual magnitude pruning at densities 0.5, 0.2, 0.1 and 0.05 with fp32 values,
and each baseline at 0.1 with fp16 values, in the in-process federation (benchmarks/inprocess.py:
the real strategies and ClientApp, no Ray), two experiments at a time. It writes
benchmarks/results/baselines.json and regenerates the README table.

The setting is smaller than the default federation so that the sweep fits in about 30 minutes on
2 cores: 10 clients on Fashion-MNIST with Dirichlet(0.5), 5 of them sampled per round, no
client-side evaluation. ``--quick`` runs a tiny version (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

from benchmarks import report

RESULTS = report.RESULTS / "baselines.json"
METHODS = ("random", "magnitude", "snip", "synflow", "gradual-magnitude")
DENSITIES = (0.5, 0.2, 0.1, 0.05)


def plan(rounds: int) -> list[dict]:
    """Every run of the sweep: (name, method, density, value dtype)."""
    runs = [{"method": "fedavg", "density": 1.0, "value_dtype": "float32"}]
    for method in METHODS:
        for density in DENSITIES:
            runs.append({"method": method, "density": density, "value_dtype": "float32"})
        runs.append({"method": method, "density": 0.1, "value_dtype": "float16"})
    for run in runs:
        run["name"] = f"{run['method']}-d{run['density']}-{run['value_dtype']}"
    return runs


def setting_overrides(rounds: int, quick: bool) -> str:
    common = (f"sampling.fraction_train=0.5 sampling.fraction_evaluate=0 pruning.warmup_rounds=2 "
              f"pruning.start_round=1 pruning.end_round={max(1, rounds - 2)}")
    if quick:
        return common + f" dataset.name=mnist dataset.root={Path('/tmp/fedprune-quick-mnist')} partition.scheme=iid"
    return common


def execute(args: tuple[dict, int, int, str, str]) -> dict:
    run, rounds, nodes, overrides, out_dir = args
    import torch

    from benchmarks.inprocess import run_inprocess

    torch.set_num_threads(1)
    experiment = "configs/fedavg.yaml" if run["method"] == "fedavg" else f"configs/{run['method']}.yaml"
    extra = f" transport.value_dtype={run['value_dtype']}"
    if run["method"] != "fedavg":
        extra += f" pruning.density={run['density']}"
    start = time.monotonic()
    summary = run_inprocess({"experiment": experiment, "num-server-rounds": rounds, "seed": 42,
                             "overrides": overrides + extra}, nodes, Path(out_dir) / run["name"])
    wall = time.monotonic() - start
    records = [json.loads(line) for line in (Path(out_dir) / run["name"] / "rounds.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["round"] >= 1]
    return {
        **{k: run[k] for k in ("name", "method", "value_dtype")},
        "target_density": run["density"],
        "density": records[-1]["density"],
        "final_test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": summary["best_test_accuracy"],
        "bytes_down_per_round": sum(r["bytes_down"] for r in trained) / len(trained),
        "bytes_up_per_round": sum(r["bytes_up"] for r in trained) / len(trained),
        "last_round_bytes_down": trained[-1]["bytes_down"],
        "last_round_bytes_up": trained[-1]["bytes_up"],
        "setup_bytes": records[0]["bytes_down"] + records[0]["bytes_up"],
        "train_flops_per_round": sum(r.get("train_flops", 0) for r in trained) / len(trained),
        "client_peak_memory": max(r.get("train_peak_memory", 0) for r in trained),
        "wall_seconds": wall,
        "accuracy_by_round": [r["test_accuracy"] for r in records],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(report.ROOT / "outputs" / "bench-baselines"))
    parser.add_argument("--quick", action="store_true", help="tiny data and 2 rounds: checks the script")
    args = parser.parse_args(argv)
    if args.quick:
        from tests.conftest import write_mnist

        write_mnist(Path("/tmp/fedprune-quick-mnist"))
        args.rounds, args.nodes = 2, 3
    overrides = setting_overrides(args.rounds, args.quick)
    runs = plan(args.rounds)
    started = time.monotonic()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        rows = []
        for row in pool.imap(execute, [(r, args.rounds, args.nodes, overrides, args.out) for r in runs]):
            rows.append(row)
            print(f"{row['name']:<32} acc {row['final_test_accuracy']:.4f}  density {row['density']:.3f}  "
                  f"{row['wall_seconds']:.0f} s", flush=True)
    results = {
        "command": "make bench (python -m benchmarks.baselines)" + (" --quick" if args.quick else ""),
        "setting": {
            "rounds": args.rounds, "nodes": args.nodes, "overrides": overrides, "seed": 42,
            "description": (f"{'tiny MNIST-format files' if args.quick else 'Fashion-MNIST'}, {args.nodes} clients, "
                            f"Dirichlet(0.5) unless iid, half sampled per round, {args.rounds} rounds, 1 local epoch, "
                            "small CNN, global top-k allocation, in-process federation (real strategies and "
                            f"ClientApp), {args.workers} experiments at a time; bytes per round are means over "
                            "training rounds, setup = round-0 traffic (SNIP's scoring round)."),
        },
        "total_seconds": time.monotonic() - started,
        "runs": rows,
    }
    if args.quick:
        print(json.dumps(results)[:2000])
        return 0
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    report.update_readme(["baselines"])
    print(f"wrote {RESULTS} and the README table in {results['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
