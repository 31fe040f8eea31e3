"""FedTiny against dense FedAvg, its own static coarse mask, magnitude and SNIP, over three seeds.

``python -m benchmarks.fedtiny`` (``make bench``) runs, with seeds 0, 1 and 2, in the in-process
federation (benchmarks/sweep.py, benchmarks/inprocess.py: the real strategies and ClientApp, no
Ray), two runs at a time:

* dense FedAvg (the reference of every ratio, same partition and seed);
* FedTiny (adaptive BatchNorm selection + progressive pruning) at densities 0.05 and 0.01;
* at 0.01: FedTiny's static coarse mask (``fedtiny.adjust_rate: 0``); the authors' baselines under
  FedTiny's constraint (``fedtiny.baseline``, their ``--baseline Mag`` / ``SNIP``: no client trains
  the dense model, the server prunes its warmed-up model per layer by ``|w|`` or by SNIP on its own
  images, static mask); and our baselines, which break that constraint: magnitude pruning after
  ``pruning.warmup_rounds`` dense rounds on the clients (global top-k as configs/magnitude.yaml, and
  uniform per layer) and SNIP (global, on the clients' data at initialisation);
* the selection ablations at both densities, one round each (only the starting point matters):
  ``fedtiny.selection: no-recalibration`` (the candidate chosen and started with the warmed-up
  dense model's BatchNorm statistics) and ``random`` (a random candidate, with its recalibrated
  statistics).

The setting is small, so that the sweep fits in about an hour on 2 shared cores: a fixed random
subset of Fashion-MNIST (``--train-size`` training and ``--test-size`` test images, written as IDX
files under the output directory), Dirichlet(0.5) over 10 clients, 5 sampled per round,
``--rounds`` rounds of one local epoch, cnn-bn (the small CNN with BatchNorm), the authors'
optimizer (Adam, lr 1e-3, weight decay 1e-4, batch 64), no client-side evaluation; every method
keeps the first and the last layer dense (the same maskable weights for all). FedTiny's schedule,
shortened to the run: an adjustment after every round up to round ``rounds - 2``.

It also measures, without training, one client training step (``fedprune.fedtiny.step_memory``:
the same batch, optimizer and measurement as the runs) of the dense model and of FedTiny's sparse
state at each density: the measured peak and its breakdown (weights, gradients, optimizer state,
activations). ``memory_ratio`` is the largest measured client peak of a FedTiny run over this
dense peak (the FedAvg runs' recorded peaks also count the storage of the client's whole training
set, so they are not divided by). ``flops_ratio`` is counted training FLOPs per training example,
FedTiny over the FedAvg run of the same seed. Results: benchmarks/results/fedtiny.json and the
README table ``fedtiny``. ``--quick`` runs a tiny version (a smoke test of the script itself).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks import report, sweep

DENSITIES = (0.05, 0.01)
ABLATION_DENSITY = 0.01
"""Where FedTiny meets its static coarse mask, magnitude and SNIP."""


def overrides(data_root: Path | None, dataset: str, rounds: int) -> str:
    parts = [f"dataset.name={dataset}", "model.name=cnn-bn", "client.optimizer=adam", "client.lr=0.001",
             "client.weight_decay=0.0001", "client.batch_size=64", "client.local_epochs=1",
             "sampling.fraction_train=0.5", "sampling.fraction_evaluate=0", "pruning.include_first=false",
             "pruning.include_last=false", f"pruning.warmup_rounds={min(2, rounds - 1)}",
             "fedtiny.delta=1", f"fedtiny.t_end={max(2, rounds - 2)}"]
    if data_root is not None:
        parts.append(f"dataset.root={data_root}")
    if dataset == "mnist":
        parts += ["partition.scheme=iid", "client.batch_size=16"]
    return " ".join(parts)


def plan(rounds: int, nodes: int, common: str) -> list[dict]:
    """Every run: dense FedAvg, FedTiny per density, the comparisons at 0.01, the selection
    ablations (one round)."""
    runs = [dict(kind="fedavg", method="fedavg", density=1.0)]
    runs += [dict(kind="fedtiny", method="fedtiny", density=d) for d in DENSITIES]
    runs += [dict(kind="static", method="fedtiny", density=ABLATION_DENSITY, extra="fedtiny.adjust_rate=0"),
             dict(kind="magnitude", method="magnitude", density=ABLATION_DENSITY),
             dict(kind="magnitude-uniform", method="magnitude", density=ABLATION_DENSITY,
                  extra="pruning.allocation=uniform"),
             dict(kind="snip", method="snip", density=ABLATION_DENSITY)]
    runs += [dict(kind=f"server-{b}", method="fedtiny", density=ABLATION_DENSITY,
                  extra=f"fedtiny.baseline={b} fedtiny.adjust_rate=0") for b in ("magnitude", "snip")]
    runs += [dict(kind=f"select-{s}", method="fedtiny", density=d, extra=f"fedtiny.selection={s}", rounds=1)
             for d in DENSITIES for s in ("no-recalibration", "random")]
    specs = []
    for run in runs:
        extra = f" pruning.density={run['density']}" if run["method"] != "fedavg" else ""
        specs.append({"name": f"{run['kind']}-d{run['density']}", "kind": run["kind"], "method": run["method"],
                      "target_density": run["density"], "reference": "fedavg-d1.0", "nodes": nodes,
                      "config": {"experiment": f"configs/{run['method']}.yaml",
                                 "num-server-rounds": run.get("rounds", rounds),
                                 "overrides": f"{common}{extra} {run.get('extra', '')}".strip()}})
    return specs


def row(spec: dict, seed: int, summary: dict, records: list[dict]) -> dict:
    """One run: accuracy, the starting model's test loss, cost per training example, FedTiny's
    selection and top-K traffic."""
    trained = [r for r in records if r["round"] >= 1]
    examples = sum(r.get("train_num_examples", 0) for r in trained)
    out = {"density": records[-1]["density"], "final_test_accuracy": summary["final_test_accuracy"],
           "best_test_accuracy": summary["best_test_accuracy"], "start_test_loss": records[0]["test_loss"],
           "start_test_accuracy": records[0]["test_accuracy"],
           "accuracy_by_round": [r["test_accuracy"] for r in records],
           "train_flops_per_example": sum(r.get("train_flops", 0) for r in trained) / max(examples, 1),
           "client_peak_memory": max(r.get("train_peak_memory", 0) for r in trained),
           "total_bytes": sum(r["bytes_down"] + r["bytes_up"] for r in records),
           "rejected_replies": sum(r["rejected_replies"] + r["failed_replies"] for r in records)}
    if "fedtiny_candidate_losses" in records[0]:
        losses = records[0]["fedtiny_candidate_losses"]
        out.update(chosen_val_loss=losses[records[0]["fedtiny_chosen"]], mean_candidate_val_loss=float(np.mean(losses)),
                   topk_bytes=sum(r.get("bytes_up_topk_grads", 0) for r in records),
                   dense_gradient_bytes=sum(r.get("fedtiny_dense_gradient_bytes", 0) for r in records),
                   regrown=sum(r.get("fedtiny_grown", 0) for r in records), setup_bytes=records[0]["bytes_down"]
                   + records[0]["bytes_up"])
        out["topk_bytes_ratio"] = sweep.ratio(out["topk_bytes"], out["dense_gradient_bytes"])
    return out


def compare(row: dict, dense: dict) -> dict:
    return {"acc_minus_dense": 100 * (row["final_test_accuracy"] - dense["final_test_accuracy"]),
            "flops_ratio": sweep.ratio(row["train_flops_per_example"], dense["train_flops_per_example"])}


def memory_costs(common: str) -> list[dict]:
    """One measured training step, dense and under FedTiny's sparse state at each density (a
    magnitude mask of the initial model per layer: the step's memory depends on the kept counts)."""
    from fedprune.data import SPECS
    from fedprune.experiment import load_experiment, parse_overrides
    from fedprune.fedtiny import step_memory
    from fedprune.task import maskable_names, new_model
    from pruning.selection import layerwise_topk
    from pruning.sparse_training import sparsify

    exp = load_experiment("configs/fedtiny.yaml", parse_overrides(common))
    model = new_model(exp)
    names = maskable_names(exp, model)
    spec = SPECS[exp.dataset.name]
    x = torch.randn(exp.client.batch_size, spec.channels, spec.size, spec.size)
    y = torch.zeros(exp.client.batch_size, dtype=torch.int64)
    rows = []
    for d in (1.0, *DENSITIES):
        net = copy.deepcopy(model)
        if d < 1.0:
            sparsify(net, layerwise_topk({k: p.detach().abs() for k, p in net.named_parameters() if k in names}, d))
        r = step_memory(net, x, y, exp.client)
        rows.append({"density": d, "peak": r.peak, "weights": r.weights, "grads": r.grads,
                     "optimizer_state": r.optimizer_state, "activations": r.activations,
                     "state": r.weights + r.grads + r.optimizer_state})
    for r in rows:
        r["peak_ratio"], r["state_ratio"] = r["peak"] / rows[0]["peak"], r["state"] / rows[0]["state"]
    return rows


def summary(results: dict) -> dict:
    """The issue's figures per density: memory and FLOPs ratios, top-K bytes, start losses, accuracy."""
    runs = {r["name"]: r for r in results["runs"]}
    dense_peak = results["memory"][0]["peak"]
    out: dict = {"memory_ratio": {}, "state_memory_ratio": {}, "flops_ratio": {}, "topk_bytes_ratio": {},
                 "start_test_loss": {}, "final_test_accuracy": {}}
    for d in DENSITIES:
        key, tiny = str(d), runs.get(f"fedtiny-d{d}")
        if tiny is None:
            continue
        out["memory_ratio"][key] = tiny["mean"]["client_peak_memory"] / dense_peak
        out["state_memory_ratio"][key] = next(m["state_ratio"] for m in results["memory"] if m["density"] == d)
        out["flops_ratio"][key] = tiny["mean"].get("flops_ratio")
        out["topk_bytes_ratio"][key] = tiny["mean"].get("topk_bytes_ratio")
        out["start_test_loss"][key] = {kind: runs[n]["mean"]["start_test_loss"] for kind, n in (
            ("abns", f"fedtiny-d{d}"), ("no-recalibration", f"select-no-recalibration-d{d}"),
            ("random", f"select-random-d{d}")) if n in runs}
    out["final_test_accuracy"] = {r["name"]: r["mean"]["final_test_accuracy"] for r in results["runs"]
                                  if not r["kind"].startswith("select")}
    return out


def pm(run: dict, key: str, fmt: str) -> str:
    if key not in run["mean"] or run["mean"][key] is None:
        return "n/a"
    std = f" +- {fmt.replace('+', '').format(run['std'][key])}" if key in run.get("std", {}) else ""
    return fmt.format(run["mean"][key]) + std


LABELS = {"fedavg": "dense FedAvg", "fedtiny": "FedTiny", "static": "FedTiny, static coarse mask",
          "magnitude": "magnitude (global, after dense client rounds)",
          "magnitude-uniform": "magnitude (per layer, after dense client rounds)",
          "snip": "SNIP (global, clients' data)",
          "server-magnitude": "magnitude (per layer, server warm-up: the authors' baseline)",
          "server-snip": "SNIP (per layer, server images: the authors' baseline)",
          "select-no-recalibration": "selection without recalibration",
          "select-random": "random candidate"}


def table(results: dict) -> str:
    """The README table: accuracy and costs per run, the memory breakdown, the summary."""
    lines = ["| run | density (target / real) | rounds | test acc | acc - dense (points) | start test loss | "
             "train FLOPs / example (ratio) | top-K bytes / dense-gradient bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        m = r["mean"]
        lines.append(
            f"| {LABELS[r['kind']]} | {r['target_density']:.2f} / {m['density']:.4f} | "
            f"{r['config']['num-server-rounds']} | {pm(r, 'final_test_accuracy', '{:.4f}')} | "
            f"{pm(r, 'acc_minus_dense', '{:+.2f}')} | {pm(r, 'start_test_loss', '{:.3f}')} | "
            f"{m['train_flops_per_example'] / 1e6:.2f} M ({pm(r, 'flops_ratio', '{:.4f}')}) | "
            f"{pm(r, 'topk_bytes_ratio', '{:.4f}')} |")
    lines += ["", "| client training step | measured peak MB (ratio) | weights + grads + optimizer state MB (ratio) "
              "| activations MB |", "|---|---|---|---|"]
    for m in results["memory"]:
        label = "dense" if m["density"] == 1.0 else f"FedTiny sparse state, density {m['density']}"
        lines.append(f"| {label} | {m['peak'] / 1e6:.2f} ({m['peak_ratio']:.3f}) | {m['state'] / 1e6:.3f} "
                     f"({m['state_ratio']:.4f}) | {m['activations'] / 1e6:.2f} |")
    s = results["summary"]
    lines.append("")
    lines.append(
        f"Setting: {results['setting']['description']} Mean +- sample std over seeds "
        f"{', '.join(map(str, results['seeds']))}; differences and FLOPs ratios per seed against the FedAvg run of "
        "the same seed. Start test loss: the model before round 1 (FedTiny: the chosen candidate with its "
        "statistics). Summary: memory ratio (measured client peak / dense) "
        + ", ".join(f"{d}: {v:.3f}" for d, v in s["memory_ratio"].items()) + "; state memory ratio "
        + ", ".join(f"{d}: {v:.4f}" for d, v in s["state_memory_ratio"].items()) + "; FLOPs ratio "
        + ", ".join(f"{d}: {v:.4f}" for d, v in s["flops_ratio"].items() if v is not None)
        + f". {report.total_note(results)}. Command: `{results['command']}`.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = sweep.parser(__doc__, "fedtiny", rounds=20, nodes=10)
    p.add_argument("--train-size", type=int, default=12000, help="Fashion-MNIST training images (default 12000)")
    p.add_argument("--test-size", type=int, default=2000, help="Fashion-MNIST test images (default 2000)")
    args = sweep.parse(p, argv)
    if args.quick:
        dataset, data_root = "mnist", args.data_root
    else:
        dataset, data_root = "fashion-mnist", sweep.fashion_subset(args.out / "data", args.train_size, args.test_size)
    common = overrides(data_root, dataset, args.rounds)
    results = sweep.run(plan(args.rounds, args.nodes, common), args, row, compare)
    results["memory"] = memory_costs(common)
    data = ("tiny MNIST-format files, iid" if args.quick else
            f"Fashion-MNIST, a fixed random subset of {args.train_size} training and {args.test_size} test images, "
            "Dirichlet(0.5)")
    results["setting"].update(overrides=common, description=(
        f"{data}, {args.nodes} clients, half sampled per round, {args.rounds} rounds of 1 local epoch, cnn-bn, "
        "Adam (lr 1e-3, weight decay 1e-4, batch 64), first and last layer dense, FedTiny: 5 candidates, "
        f"adjustments after every round up to round {max(2, args.rounds - 2)}, alpha 0.2, granularity entire; "
        f"in-process federation (real strategies and ClientApp), {args.workers} runs at a time on 2 shared cores."))
    results["summary"] = summary(results)
    return sweep.publish(results, args)


if __name__ == "__main__":
    sys.exit(main())
