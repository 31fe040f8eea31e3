"""AutoFLIP against dense FedAvg, its warm start and random masks, under strong non-IID splits.

``python -m benchmarks.autoflip`` (``make bench``) runs, for a pathological split (2 classes per
client) and a Dirichlet(0.5) split of Fashion-MNIST over 20 clients, 25% of them per round, each
with seeds 0, 1 and 2, in the in-process federation (benchmarks/sweep.py: the real strategies and
ClientApp, no Ray), two runs at a time:

* ``fedavg``: dense FedAvg (the project's baseline, every comparison is against it);
* ``fedavgm``: dense FedAvg with the authors' server momentum, no exploration (the authors' own
  FedAvg baseline: ``autoflip.prune=false autoflip.warm_start=false``);
* ``warm-fedavg``: dense, with the same exploration warm start and server momentum as AutoFLIP
  (``autoflip.prune=false``): AutoFLIP minus its mask;
* ``autoflip-q0.3``: AutoFLIP, hybrid (q = 0.3, q_s = 0.2, kept widths multiples of 8), and on
  the pathological split a sweep of q over 0.1, 0.2, 0.4, 0.5;
* ``random-shape-q0.3``: the AutoFLIP pipeline with a random mask of the guided mask's shape
  (same units removed per layer, same kept positions per tensor): AutoFLIP minus its guidance;
* ``random``: the project's random-mask baseline (no exploration, no momentum) at AutoFLIP
  q = 0.3's density (the mean over seeds, so it runs after the others).

Every difference and ratio is taken against dense FedAvg of the same seed and split, then averaged.
After the sweep, the CPU time of one training step (batch 32, one thread, the model each client
really trains: the smaller model when whole units are removed, with its masks enforced) is
measured against the dense model's step, interleaved, for every masked run. It writes
benchmarks/results/autoflip.json with a top-level ``summary`` per split (and, after each of its
three stages: the comparison, the random baseline, the q sweep, ``<out>/autoflip.json`` with
everything so far).

The setting is small so that the sweep finishes on 2 shared cores: a fixed random subset of
Fashion-MNIST (``--train-size`` training, ``--test-size`` test images), 20% of each client's data
held out as its validation split (as the paper), 2 local epochs of SGD at lr 0.01 (at the default
0.05 plain FedAvg oscillates on the pathological split), exploration of at most 5 epochs with
patience 2 (the paper: 150 and 40), ``--rounds`` rounds. ``--quick`` runs a tiny
version (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import report, sweep

PARTITIONS = {"pathological": "partition.scheme=pathological partition.classes_per_partition=2",
              "dirichlet": "partition.scheme=dirichlet partition.alpha=0.5"}
Q = 0.3
SWEEP = (0.1, 0.2, 0.4, 0.5)
COSTS = ("total_bytes", "round_bytes", "total_flops", "round_flops", "total_compute_seconds",
         "round_compute_seconds")
"""Costs also given as ratios to dense FedAvg (``<field>_ratio``, per seed)."""


def setting_overrides(data_root, dataset: str, explore_epochs: int) -> str:
    return (f"dataset.name={dataset} dataset.root={data_root} sampling.fraction_train=0.25 "
            "sampling.fraction_evaluate=0 partition.val_fraction=0.2 client.local_epochs=2 client.lr=0.01 "
            "pruning.include_bias=true "
            f"autoflip.explore_epochs={explore_epochs} autoflip.patience=2")


def plan(rounds: int, nodes: int, overrides: str) -> list[dict]:
    """The comparison at q = 0.3 on both splits: the runs with exploration first (the dearest)."""
    runs = [("autoflip", Q, f"autoflip.quantile={Q}"),
            ("random-shape", Q, f"autoflip.quantile={Q} autoflip.mask=random"),
            ("warm-fedavg", None, "autoflip.prune=false"),
            ("fedavgm", None, "autoflip.prune=false autoflip.warm_start=false"), ("fedavg", None, "")]
    return [spec(key, q, part, rounds, nodes, overrides, extra) for part in PARTITIONS for key, q, extra in runs]


def sweep_plan(rounds: int, nodes: int, overrides: str, partitions: list[str]) -> list[dict]:
    """AutoFLIP at the other quantiles."""
    return [spec("autoflip", q, part, rounds, nodes, overrides, f"autoflip.quantile={q}")
            for part in partitions for q in SWEEP]


def spec(key: str, q: float | None, part: str, rounds: int, nodes: int, overrides: str, extra: str) -> dict:
    return {"name": f"{key}{'' if q is None else f'-q{q}'}-{part}", "key": key, "partition": part, "quantile": q,
            "reference": f"fedavg-{part}", "nodes": nodes,
            "config": {"experiment": f"configs/{'autoflip' if key not in ('fedavg', 'random') else key}.yaml",
                       "num-server-rounds": rounds, "overrides": f"{overrides} {PARTITIONS[part]} {extra}"}}


def random_plan(runs: list[dict], rounds: int, nodes: int, overrides: str) -> list[dict]:
    """The random-mask baseline at the mean density of AutoFLIP q = 0.3 on each split."""
    density = {r["partition"]: round(r["mean"]["density"], 4) for r in runs if r["name"].startswith(f"autoflip-q{Q}-")}
    return [spec("random", None, part, rounds, nodes, overrides, f"pruning.density={d}") for part, d in density.items()]


def row(spec: dict, seed: int, summary: dict, records: list[dict]) -> dict:
    """One run: accuracy; bytes, counted training FLOPs and client CPU seconds for the whole run
    (exploration included) and per training round; AutoFLIP's exploration and units kept."""
    setup, trained = records[0], [r for r in records if r["round"] >= 1]
    out = {
        "final_test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": summary["best_test_accuracy"],
        "last5_test_accuracy": sum(r["test_accuracy"] for r in records[-5:]) / len(records[-5:]),
        "accuracy_by_round": [r["test_accuracy"] for r in records],
        "density": records[-1]["density"],
        "total_bytes": sum(r["bytes_down"] + r["bytes_up"] for r in records),
        "round_bytes": sum(r["bytes_down"] + r["bytes_up"] for r in trained) / len(trained),
        "explore_bytes": sweep.traffic(setup, ("explore",)),
        "round_flops": sum(r["train_flops"] for r in trained) / len(trained),
        "total_flops": sum(r["train_flops"] for r in trained) + setup.get("autoflip_explore_flops", 0.0),
        "round_compute_seconds": sum(r["train_compute_seconds"] for r in trained) / len(trained),
        "total_compute_seconds": sum(r["train_compute_seconds"] for r in trained)
        + setup.get("autoflip_explore_compute_seconds", 0.0),
        "client_peak_memory": max(r["train_peak_memory"] for r in trained),
        "rejected_replies": sum(r["rejected_replies"] + r["failed_replies"] for r in records),
    }
    for key in ("explore_epochs", "units_kept", "executed_flops_ratio", "counted_flops_ratio"):
        if f"autoflip_{key}" in setup:
            out[key] = setup[f"autoflip_{key}"]
    return out


def compare(row: dict, dense: dict) -> dict:
    """Against dense FedAvg of the same seed and split: accuracy in points, costs as ratios."""
    return {"acc_minus_fedavg": 100 * (row["final_test_accuracy"] - dense["final_test_accuracy"]),
            **{f"{k}_ratio": sweep.ratio(row[k], dense[k]) for k in COSTS}}


def step_seconds(masks: dict[str, torch.Tensor], blocks: int = 11, steps: int = 10) -> tuple[float, float]:
    """Median CPU seconds of one training step (batch 32, SGD with momentum, one thread) of the model
    a client trains under ``masks`` (the smaller model when whole units go, masks enforced after
    every step) and of the dense model, measured in alternating blocks."""
    from client_app.autoflip import slim_of
    from fedprune.models import build_model
    from pruning.masks import apply_masks, mask_gradients

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    dense = build_model("cnn", 1, 10, 28)
    model = build_model("cnn", 1, 10, 28)
    slim = slim_of(model, masks, x[:1])
    net, net_masks = (slim.model, slim.masks(masks)) if slim else (model, masks)

    def block(m: torch.nn.Module, keep) -> float:
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        start = time.process_time()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            if keep:
                mask_gradients(m, keep)
            opt.step()
            if keep:
                apply_masks(m, keep)
        return (time.process_time() - start) / steps

    block(net, net_masks), block(dense, None)  # warm-up
    times = [(block(net, net_masks), block(dense, None)) for _ in range(blocks)]
    return statistics.median(t for t, _ in times), statistics.median(t for _, t in times)


def add_step_times(rows: dict[tuple[str, int], dict], out: Path) -> None:
    """``step_seconds``, ``dense_step_seconds`` and ``step_time_ratio`` for every masked run and
    seed that lacks them, from the mask in its final checkpoint."""
    for (name, seed), r in rows.items():
        if r["density"] < 1.0 and "step_seconds" not in r:
            state = torch.load(out / f"{name}-s{seed}" / "checkpoint.pt", weights_only=True)
            r["step_seconds"], r["dense_step_seconds"] = step_seconds(state["masks"])
            r["step_time_ratio"] = r["step_seconds"] / r["dense_step_seconds"]


GAPS = (("autoflip_vs_fedavg", f"autoflip-q{Q}", "fedavg"),
        ("autoflip_vs_random", f"autoflip-q{Q}", "random"),
        ("autoflip_vs_random_shape", f"autoflip-q{Q}", f"random-shape-q{Q}"),
        ("mask", f"autoflip-q{Q}", "warm-fedavg"),
        ("warm_start", "warm-fedavg", "fedavgm"),
        ("server_momentum", "fedavgm", "fedavg"))
"""The accuracy gaps that answer the paper's claim, ``(name, run, minus run)``: AutoFLIP against
FedAvg and the random masks, and the decomposition FedAvg -> + server momentum (fedavgm) -> + warm
start (warm-fedavg) -> + the mask (autoflip)."""


def gaps(runs: list[dict], part: str, field: str) -> dict[str, dict[str, float]]:
    """Per gap of :data:`GAPS` on ``part``: mean and sample std over seeds of the per-seed difference
    of ``field``, in points."""
    seeds = {r["name"]: {s["seed"]: s[field] for s in r["per_seed"]} for r in runs}
    out = {}
    for gap, a, b in GAPS:
        x, y = seeds.get(f"{a}-{part}", {}), seeds.get(f"{b}-{part}", {})
        diffs = [100 * (x[s] - y[s]) for s in sorted(x.keys() & y.keys())]
        if diffs:
            out[gap] = {"mean": statistics.fmean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else None,
                        "seeds": len(diffs)}
    return out


def summary(runs: list[dict]) -> dict:
    """Per split: the mean final accuracy of AutoFLIP q = 0.3 and its controls, the gaps of
    :data:`GAPS` (final and mean of the last 5 rounds), and AutoFLIP's costs as ratios to dense
    FedAvg."""
    by_name = {r["name"]: r for r in runs}
    names = (("autoflip_acc", f"autoflip-q{Q}"), ("fedavg_acc", "fedavg"), ("fedavgm_acc", "fedavgm"),
             ("warm_fedavg_acc", "warm-fedavg"), ("random_acc", "random"), ("random_shape_acc", f"random-shape-q{Q}"))
    out = {}
    for part in PARTITIONS:
        if f"autoflip-q{Q}-{part}" not in by_name:
            continue
        af = by_name[f"autoflip-q{Q}-{part}"]["mean"]

        def stat(field: str, kind: str = "mean") -> dict:
            return {key: by_name[f"{name}-{part}"][kind].get(field) for key, name in names
                    if f"{name}-{part}" in by_name}

        out[part] = {**stat("final_test_accuracy"), "std": stat("final_test_accuracy", "std"),
                     "last5": stat("last5_test_accuracy"), "last5_std": stat("last5_test_accuracy", "std"),
                     "gaps_points": gaps(runs, part, "final_test_accuracy"),
                     "gaps_points_last5": gaps(runs, part, "last5_test_accuracy"),
                     "density": af["density"],
                     "bytes_ratio": af.get("total_bytes_ratio"), "flops_ratio": af.get("total_flops_ratio"),
                     "round_bytes_ratio": af.get("round_bytes_ratio"), "round_flops_ratio": af.get("round_flops_ratio"),
                     "executed_flops_ratio": af.get("executed_flops_ratio"),
                     "step_time_ratio": af.get("step_time_ratio"),
                     "round_compute_seconds_ratio": af.get("round_compute_seconds_ratio"),
                     "units_kept": next(r for r in runs if r["name"] == f"autoflip-q{Q}-{part}")["per_seed"][0].get(
                         "units_kept")}
    return out


def table(results: dict) -> str:
    """The AutoFLIP table: per split, each run's accuracy and its costs against dense FedAvg."""
    lines = ["| split | run | q | density | test acc | vs FedAvg (points) | bytes / FedAvg: run (round) | "
             "counted training FLOPs / FedAvg: run (round) | executed FLOPs / dense | step CPU time / dense | "
             "client CPU s per round / FedAvg | explore epochs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        m = r["mean"]
        explore = f"{m['explore_epochs']:.1f}" if "explore_epochs" in m else "-"
        step = report.pm(r, "step_time_ratio", "{:.3f}") if "step_time_ratio" in m else "1 (dense)"
        lines.append(
            f"| {r['partition']} | {r['key']} | {'' if r['quantile'] is None else r['quantile']} | "
            f"{m['density']:.3f} | {report.pm(r, 'final_test_accuracy')} | "
            f"{report.pm(r, 'acc_minus_fedavg', '{:+.2f}')} | {report.pm(r, 'total_bytes_ratio', '{:.3f}')} "
            f"({report.pm(r, 'round_bytes_ratio', '{:.3f}')}) | {report.pm(r, 'total_flops_ratio', '{:.3f}')} "
            f"({report.pm(r, 'round_flops_ratio', '{:.3f}')}) | {m.get('executed_flops_ratio', 1.0):.3f} | {step} | "
            f"{report.pm(r, 'round_compute_seconds_ratio', '{:.3f}')} | {explore} |")
    lines += ["", "| split | accuracy gap | points: final round / mean of the last 5 rounds (mean +- std over seeds "
              "of the per-seed differences) |", "|---|---|---|"]
    labels = {"autoflip_vs_fedavg": "AutoFLIP - FedAvg", "autoflip_vs_random": "AutoFLIP - random mask (baseline)",
              "autoflip_vs_random_shape": "AutoFLIP - random mask of its shape (same pipeline)",
              "mask": "the mask: AutoFLIP - warm FedAvg", "warm_start": "the warm start: warm FedAvg - FedAvgM",
              "server_momentum": "server momentum: FedAvgM - FedAvg"}

    def pm(g: dict | None) -> str:
        if g is None:
            return "n/a"
        return f"{g['mean']:+.2f}" + ("" if g["std"] is None else f" +- {g['std']:.2f}")

    for part, s in results.get("summary", {}).items():
        for key, label in labels.items():
            lines.append(f"| {part} | {label} | {pm(s['gaps_points'].get(key))} / "
                         f"{pm(s['gaps_points_last5'].get(key))} |")
    s = results["setting"]
    lines += ["", f"Setting: {s['description']}.{report.seeds_note(results)} Bytes: every message of the run, "
              "exploration included (in brackets: the mean training round); counted FLOPs: forward + backward, "
              "scaled by each layer's kept share, exploration included (in brackets: per training round); "
              "executed FLOPs: what dense kernels run per training example, the smaller model's when whole units "
              "are removed; step CPU time: median of one training step of the model a client trains against the "
              "dense model's, measured after the sweep; client CPU s: the clients' measured training time per "
              f"round. {report.total_note(results)}. Command: `{results['command']}`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = sweep.parser(__doc__, "autoflip", rounds=20, nodes=20)
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--explore-epochs", type=int, default=5)
    parser.add_argument("--sweep-partitions", type=lambda s: [x for x in s.split(",") if x], default=["pathological"],
                        help="splits that get the q sweep (default pathological; empty: no sweep)")
    parser.add_argument("--sweep-seeds", type=lambda s: [int(x) for x in s.split(",")],
                        help="seeds of the q sweep (default: --seeds)")
    args = sweep.parse(parser, argv)
    if args.quick:
        dataset, data_root, args.explore_epochs = "mnist", args.data_root, 2
    else:
        dataset, data_root = "fashion-mnist", sweep.fashion_subset(args.out / "data", args.train_size, args.test_size)
    overrides = setting_overrides(data_root, dataset, args.explore_epochs)
    data = (f"Fashion-MNIST, a fixed random subset of {args.train_size} training and {args.test_size} test images"
            if not args.quick else "tiny MNIST-format files")
    description = (
        f"{data}, {args.nodes} clients (20% of each held out for validation), pathological (2 classes per client) "
        f"or Dirichlet(0.5), {max(int(args.nodes * 0.25), 2)} sampled per round, {args.rounds} rounds of 2 local "
        "epochs, SGD lr 0.01 momentum 0.9, batch 32, the small CNN, biases masked as the authors do; AutoFLIP: "
        f"every client explores (rho 1) for at most {args.explore_epochs} epochs with patience 2, q_s 0.2 (widths "
        "rounded down to multiples of 8), "
        "min-max guidance, server momentum 0.9; q sweep on "
        f"{', '.join(args.sweep_partitions) or 'no split'}, seeds {','.join(map(str, args.sweep_seeds or args.seeds))}"
        f"; in-process federation (real strategies and ClientApp), {args.workers} runs at a time")
    rows: dict[tuple[str, int], dict] = {}
    specs: list[dict] = []
    results: dict = {"command": args.command, "total_seconds": 0.0, "reused_runs": 0,
                     "setting": {"rounds": args.rounds, "nodes": args.nodes, "workers": args.workers}}

    def stage(plan_: list[dict], seeds: list[int]) -> list[dict]:
        """Run a stage (with --reuse, only the runs not finished in ``args.out``) and write everything
        so far (a stopped sweep keeps the stages it finished); the stage's runs, aggregated."""
        plan_ = sweep.select(plan_, args.only)
        ran = sweep.run(plan_, argparse.Namespace(**{**vars(args), "seeds": seeds}), row)
        rows.update({(r["name"], s["seed"]): s for r in ran["runs"] for s in r["per_seed"]})
        if ran.get("failed_runs"):
            results.setdefault("failed_runs", []).extend(ran["failed_runs"])
        results["reused_runs"] += ran.get("reused_runs", 0)
        results["total_seconds"] += ran["total_seconds"]
        specs.extend(plan_)
        add_step_times(rows, args.out)
        runs = sweep.aggregate(specs, rows, compare)
        results.update(runs=runs, seeds=args.seeds, summary=summary(runs))
        results["setting"].update(overrides=overrides, train_size=args.train_size, test_size=args.test_size,
                                  sweep_seeds=args.sweep_seeds or args.seeds, description=description)
        sweep.write_json(args.out / "autoflip.json", results)
        names = {s["name"] for s in plan_}
        return [r for r in runs if r["name"] in names]

    first = stage(plan(args.rounds, args.nodes, overrides), args.seeds)
    stage(random_plan(first, args.rounds, args.nodes, overrides), args.seeds)
    if args.sweep_partitions:
        stage(sweep_plan(args.rounds, args.nodes, overrides, args.sweep_partitions), args.sweep_seeds or args.seeds)
    return sweep.publish(results, args)


if __name__ == "__main__":
    sys.exit(main())
