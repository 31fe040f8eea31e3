"""Dense FedAvg and every pruning baseline, side by side on the same partition, over three seeds.

``python -m benchmarks.baselines`` (``make bench``) runs dense FedAvg and random, magnitude,
SNIP, SynFlow and gradual magnitude pruning at densities 0.1 and 0.05 with fp32 values, and each
baseline at 0.1 with fp16 values, each with seeds 0, 1 and 2, in the in-process federation
(benchmarks/sweep.py, benchmarks/inprocess.py: the real strategies and ClientApp, no Ray), two
runs at a time. Every difference and ratio to dense FedAvg is taken against the FedAvg run of the
same seed, then averaged over seeds. It writes benchmarks/results/baselines.json and regenerates
the README table.

The setting is smaller than the default federation so that the 48 runs fit in about an hour on
2 shared cores: a fixed random subset of Fashion-MNIST (``--train-size`` training and
``--test-size`` test images), 10 clients with Dirichlet(0.5), 5 of them sampled per round, no
client-side evaluation. ``--quick`` runs a tiny version (a smoke test of the script itself).
"""

from __future__ import annotations

import sys

from benchmarks import sweep

METHODS = ("random", "magnitude", "snip", "synflow", "gradual-magnitude")
DENSITIES = (0.1, 0.05)
RATIOS = ("total_bytes", "after_cut_bytes", "train_flops_per_round", "client_peak_memory", "wall_seconds")
"""Costs shown as ratios to dense FedAvg (``<field>_ratio``, per seed)."""


def setting_overrides(rounds: int, dataset: str, data_root) -> str:
    """Half the clients per round, no client-side evaluation; magnitude cuts after round 2 and gradual
    magnitude after rounds 1..rounds-2 (earlier when there are fewer rounds); the data."""
    common = (f"sampling.fraction_train=0.5 sampling.fraction_evaluate=0 pruning.warmup_rounds={min(2, rounds - 1)} "
              f"pruning.start_round=1 pruning.end_round={max(1, rounds - 2)} dataset.name={dataset} "
              f"dataset.root={data_root}")
    return common + " partition.scheme=iid" if dataset == "mnist" else common


def plan(rounds: int, nodes: int, overrides: str) -> list[dict]:
    """Every run of the sweep: dense FedAvg, then each method at each density (fp32) and at 0.1 (fp16)."""
    runs = [{"method": "fedavg", "density": 1.0, "value_dtype": "float32"}]
    for method in METHODS:
        runs += [{"method": method, "density": d, "value_dtype": "float32"} for d in DENSITIES]
        runs.append({"method": method, "density": 0.1, "value_dtype": "float16"})
    specs = []
    for run in runs:
        extra = f" transport.value_dtype={run['value_dtype']}"
        if run["method"] != "fedavg":
            extra += f" pruning.density={run['density']}"
        specs.append({"name": f"{run['method']}-d{run['density']}-{run['value_dtype']}",
                      "method": run["method"], "target_density": run["density"],
                      "value_dtype": run["value_dtype"], "reference": "fedavg-d1.0-float32", "nodes": nodes,
                      "config": {"experiment": f"configs/{run['method']}.yaml", "num-server-rounds": rounds,
                                 "overrides": overrides + extra}})
    return specs


def row(spec: dict, seed: int, summary: dict, records: list[dict]) -> dict:
    """One run: accuracy, bytes (all purposes per round, the whole run, round 0, and train + mask of
    the last round, which follows the final cut), counted FLOPs, client peak memory."""
    trained = [r for r in records if r["round"] >= 1]
    return {
        "density": records[-1]["density"],
        "final_test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": summary["best_test_accuracy"],
        "bytes_down_per_round": sum(r["bytes_down"] for r in trained) / len(trained),
        "bytes_up_per_round": sum(r["bytes_up"] for r in trained) / len(trained),
        "total_bytes": sum(r["bytes_down"] + r["bytes_up"] for r in records),
        "setup_bytes": records[0]["bytes_down"] + records[0]["bytes_up"],
        "after_cut_bytes": sweep.traffic(trained[-1], ("train", "mask")),
        "train_flops_per_round": sum(r.get("train_flops", 0) for r in trained) / len(trained),
        "client_peak_memory": max(r.get("train_peak_memory", 0) for r in trained),
        "rejected_replies": sum(r["rejected_replies"] + r["failed_replies"] for r in records),
        "accuracy_by_round": [r["test_accuracy"] for r in records],
    }


def compare(row: dict, dense: dict) -> dict:
    """Against dense FedAvg of the same seed: accuracy difference in points, the costs as ratios."""
    return {"acc_minus_dense": 100 * (row["final_test_accuracy"] - dense["final_test_accuracy"]),
            **{f"{k}_ratio": sweep.ratio(row[k], dense[k]) for k in RATIOS}}


def main(argv: list[str] | None = None) -> int:
    parser = sweep.parser(__doc__, "baselines", rounds=6, nodes=10)
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--test-size", type=int, default=2000)
    args = sweep.parse(parser, argv)
    if args.quick:
        dataset, data_root, data = "mnist", args.data_root, "tiny MNIST-format files, iid"
    else:
        dataset, data_root = "fashion-mnist", sweep.fashion_subset(args.out / "data", args.train_size, args.test_size)
        data = (f"Fashion-MNIST (a fixed random subset of {args.train_size} training and {args.test_size} test "
                "images), Dirichlet(0.5)")
    overrides = setting_overrides(args.rounds, dataset, data_root)
    results = sweep.run(plan(args.rounds, args.nodes, overrides), args, row, compare)
    results["setting"].update(overrides=overrides, train_size=args.train_size, test_size=args.test_size, description=(
        f"{data}, {args.nodes} clients, half sampled per round, {args.rounds} rounds, 1 local epoch, small CNN, "
        "allocation as each method's config (global top-k; gradual magnitude per layer), in-process federation "
        f"(real strategies and ClientApp), {args.workers} runs at a time."))
    return sweep.publish(results, args)


if __name__ == "__main__":
    sys.exit(main())
