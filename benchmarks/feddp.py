"""FedDP against dense FedAvg: accuracy and counted inference FLOPs per keep ratio r, the local
correction rules, the threshold variant's upload bytes, and the skipping inference's CPU time.

``python -m benchmarks.feddp`` (``make bench``) runs, in the in-process federation
(benchmarks/sweep.py: the real strategies and ClientApp, no Ray), two runs at a time, seeds 0, 1, 2:

* per Dirichlet split (alpha 0.1 and 0.5) of a fixed Fashion-MNIST subset: dense FedAvg with the
  small CNN with BatchNorm (``cnn-bn``, the reference of every comparison), and FedDP with the gated
  small CNN (``gated-cnn``) at r = 0.625, 0.5 and 0.25 (0.625: the largest r of the FLOPs curve whose
  counted inference FLOPs are at most half of dense) under SCAFFOLD (our "adaptive gradient") and
  under the plain FedAvg rule, at r = 0.5 under FedProx (mu 0.01), and at r = 1 (the gated model
  with every channel kept: what the gates alone cost against dense FedAvg) under the plain rule;
* the threshold variant (the authors' second code version) on a convolution-heavy model as theirs
  (``resnet20``, Dirichlet 0.5, ``--threshold-rounds`` rounds): tau = 1e-3 (their default) and 1e-2
  against dense FedAvg with the same model; upload bytes per client-round as measured by the ledger.

Every difference and ratio is taken against the dense FedAvg run of the same seed and split, then
averaged. After the sweep, without training: inference FLOPs per sample counted on the skipping path
(pruning.accounting.count_flops) for r from 1 to 0.25, and the CPU time (``time.thread_time``, one
thread) of the skipping path against the dense path (the same exported weights, every channel
computed) and against the PyTorch module itself, at batch 1 and batch 64, on test images:
repetitions interleaved (the two paths alternate, in alternating order), medians and quartiles,
paired per repetition. Models: the trained gated CNN of each FedDP run at seed 0 (Dirichlet 0.5),
and, for the architecture's effect, the gated ResNet-20 and VGG-11 at their initial weights
(BatchNorm statistics from a few training batches). It writes benchmarks/results/feddp.json with
the top-level ``summary``.

The setting is small so that it finishes within the hour on 2 shared cores: ``--train-size``
training and ``--test-size`` test images, 10 clients, half of them per round, ``--rounds`` rounds of
one local epoch (SGD lr 0.01, momentum 0.9, weight decay 1e-5 as the authors, batch 32).
``--quick`` runs a tiny version (a smoke test of the script itself). ``--inference-only`` keeps the
runs of benchmarks/results/feddp.json and measures the inference part again on their saved models
(the run directories under ``--out``), for a change to the skipping inference alone.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import report, sweep

ALPHAS = (0.1, 0.5)
RATIOS = (0.625, 0.5, 0.25)
SWEPT = ("scaffold", "none")
"""Correction rules run at every r of RATIOS (FedProx at r = 0.5 only)."""
FLOP_RATIOS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)
THRESHOLDS = (1e-3, 1e-2)
BATCHES = (1, 64)
CLIENT = "client.lr=0.01 client.momentum=0.9 client.weight_decay=0.00001 client.batch_size=32"


def plan(rounds: int, threshold_rounds: int, nodes: int, data: str) -> list[dict]:
    """The runs: per split dense FedAvg and the FedDP variants; the threshold runs on ResNet-20."""
    common = f"{data} {CLIENT} sampling.fraction_train=0.5 sampling.fraction_evaluate=0"
    specs = []

    def add(name: str, method: str, extra: str, reference: str, n_rounds: int, **labels) -> None:
        specs.append({"name": name, "method": method, "reference": reference, "nodes": nodes, **labels,
                      "config": {"experiment": f"configs/{method}.yaml", "num-server-rounds": n_rounds,
                                 "overrides": f"{common} {extra}"}})

    for alpha in ALPHAS:
        split = f"partition.alpha={alpha}"
        dense = f"fedavg-dir{alpha}"
        add(dense, "fedavg", f"{split} model.name=cnn-bn", dense, rounds, alpha=alpha, model="cnn-bn")
        variants = [(r, c) for c in SWEPT for r in RATIOS] + [(0.5, "fedprox")]
        for r, correction in [*variants, (1.0, "none")]:  # r = 1: the gated model, no channel skipped
            add(f"feddp-r{r}-{correction}-dir{alpha}", "feddp",
                f"{split} model.name=gated-cnn feddp.keep_ratio={r} feddp.correction={correction}", dense, rounds,
                alpha=alpha, model="gated-cnn", keep_ratio=r, correction=correction)
    dense = "fedavg-resnet20-dir0.5"
    add(dense, "fedavg", "partition.alpha=0.5 model.name=resnet20", dense, threshold_rounds, alpha=0.5,
        model="resnet20")
    for tau in THRESHOLDS:
        add(f"threshold-{tau:g}-resnet20-dir0.5", "feddp",
            f"partition.alpha=0.5 model.name=resnet20 feddp.keep_ratio=1.0 feddp.correction=none "
            f"feddp.threshold={tau}", dense, threshold_rounds, alpha=0.5, model="resnet20", threshold=tau,
            correction="none")
    return specs


def row(spec: dict, seed: int, summary: dict, records: list[dict]) -> dict:
    """One run: accuracy, training bytes per client-round both ways, counted training FLOPs per
    example, the share of zero convolution weights uploaded."""
    trained = [r for r in records if r["round"] >= 1]
    client_rounds = sum(r["train_num_nodes"] for r in trained)
    out = {
        "final_test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": summary["best_test_accuracy"],
        "accuracy_by_round": [r["test_accuracy"] for r in records],
        "bytes_down_per_client_round": sum(sweep.traffic(r, ("train",), ("down",)) for r in trained) / client_rounds,
        "bytes_up_per_client_round": sum(sweep.traffic(r, ("train",), ("up",)) for r in trained) / client_rounds,
        "train_flops_per_example": sum(r["train_flops"] for r in trained) / sum(r["train_num_examples"]
                                                                                for r in trained),
        "client_peak_memory": max(r["train_peak_memory"] for r in trained),
        "rejected_replies": sum(r["rejected_replies"] + r["failed_replies"] for r in records),
    }
    if "feddp_conv_zero_share_up" in trained[-1]:
        out["conv_zero_share_up"] = statistics.fmean(r["feddp_conv_zero_share_up"] for r in trained)
    return out


def compare(row: dict, dense: dict) -> dict:
    """Against dense FedAvg of the same seed and split: accuracy in points, bytes and FLOPs as ratios."""
    return {"acc_minus_dense": 100 * (row["final_test_accuracy"] - dense["final_test_accuracy"]),
            **{f"{k}_ratio": sweep.ratio(row[k], dense[k]) for k in
               ("bytes_down_per_client_round", "bytes_up_per_client_round", "train_flops_per_example",
                "wall_seconds")}}


# ---------------------------------------------------------------------------------------------- inference

def interleaved_times(paths: dict[str, Callable[[], object]], repeats: int, inner: int) -> dict[str, list[float]]:
    """CPU seconds per call of each path (``time.thread_time``, ``inner`` calls per sample),
    ``repeats`` samples each, the paths alternating, their order reversed every repetition."""
    names = list(paths)
    for fn in paths.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.thread_time()
            for _ in range(inner):
                paths[name]()
            times[name].append((time.thread_time() - start) / inner)
    return times


def quartiles(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2]}


def measure(model, x, repeats: int, inner: int) -> dict:
    """Counted FLOPs (dense and skipping path) and CPU time of the skipping path, the dense path and
    the module, on ``x``; the time saved per repetition, paired with that repetition's dense time."""
    import torch

    from pruning.accounting import count_flops
    from pruning.skipping import export

    dense, skip = export(model, skip=False), export(model, skip=True)
    with torch.no_grad():
        times = interleaved_times({"dense": lambda: dense(x), "skip": lambda: skip(x),
                                   "module": lambda: model(x)}, repeats, inner)
    flops = {k: count_flops(net, x).effective / len(x) for k, net in (("dense", dense), ("skip", skip))}
    flops_saved = 1 - flops["skip"] / flops["dense"]
    saved = [1 - s / d for s, d in zip(times["skip"], times["dense"])]
    return {"flops_per_sample_dense": flops["dense"], "flops_per_sample_skip": flops["skip"],
            "flops_saved": flops_saved, "time_saved": quartiles(saved),
            "time_saved_vs_module": quartiles([1 - s / m for s, m in zip(times["skip"], times["module"])]),
            "time_saved_over_flops_saved": statistics.median(saved) / flops_saved if flops_saved else None,
            "seconds": {k: quartiles(v) for k, v in times.items()}, "repeats": repeats, "inner": inner}


def inference(runs: list[dict], out: Path, dataset: str, root: str | None, quick: bool) -> dict:
    """FLOPs per sample against r, and the timing table (see the module docstring)."""
    import torch

    from fedprune.data import SPECS, load_dataset, normalize
    from fedprune.gated import build_gated
    from pruning.accounting import count_flops
    from pruning.gates import set_keep_ratio
    from pruning.skipping import export

    torch.set_num_threads(1)
    spec = SPECS[dataset]
    splits = load_dataset(dataset, root)
    test_x = normalize(splits.test_x[:64], spec)
    train_x = normalize(splits.train_x[:256], spec)
    repeats = {1: 6, 64: 3} if quick else {1: 40, 64: 15}

    def trained(r: float):
        name = next(s["name"] for s in runs if s.get("keep_ratio") == r and s.get("correction") == "scaffold"
                    and s["alpha"] == 0.5)
        seed = min(p["seed"] for p in next(s for s in runs if s["name"] == name)["per_seed"])
        path = out / f"{name}-s{seed}" / "final_model.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no saved model of run {name}, seed {seed}; --inference-only measures "
                                    "the models of a finished sweep (python -m benchmarks.feddp) under --out")
        model = build_gated("gated-cnn", spec.channels, spec.num_classes, spec.size)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()

    def initial(name: str, r: float):
        torch.manual_seed(0)
        model = set_keep_ratio(build_gated(name, spec.channels, spec.num_classes, spec.size), r).train()
        with torch.no_grad():
            for batch in train_x.split(64):
                model(batch)
        return model.eval()

    counting = trained(RATIOS[0])
    curve = {}
    for r in FLOP_RATIOS:
        set_keep_ratio(counting, r)
        curve[str(r)] = count_flops(export(counting, skip=True), test_x[:1]).effective
    rows = []
    models = [("gated-cnn", r, "trained (FedDP, seed 0, Dirichlet 0.5)", lambda r=r: trained(r)) for r in RATIOS]
    if not quick:
        models += [(name, r, "initial weights", lambda name=name, r=r: initial(name, r))
                   for name in ("gated-resnet20", "gated-vgg11") for r in RATIOS]
    for name, r, weights, build in models:
        model = build()
        for b in BATCHES:
            inner = 10 if b == 1 and name == "gated-cnn" else 1
            rows.append({"model": name, "keep_ratio": r, "weights": weights, "batch": b,
                         **measure(model, test_x[:b], repeats[b], inner)})
            print(f"{name} r={r} batch {b}: time saved {rows[-1]['time_saved']['median']:.3f}, FLOPs saved "
                  f"{rows[-1]['flops_saved']:.3f}", flush=True)
    return {"flops_per_sample": curve, "flops_ratio": {r: f / curve["1.0"] for r, f in curve.items()},
            "timing": rows}


# ---------------------------------------------------------------------------------------------- summary

def summary(runs: list[dict], measured: dict) -> dict:
    """The issue's figures: per correction rule with an r sweep, the smallest r whose mean accuracy
    loss against dense FedAvg is at most 1 point under both splits and its counted FLOPs ratio; the
    time saved over FLOPs saved per batch size (gated CNN at the smallest such r of any rule, or at
    r = 0.5 when none qualifies); the threshold variant's upload ratio per tau; the correction rules
    at r = 0.5; the gated model with every channel kept (r = 1) against dense FedAvg."""
    by_name = {r["name"]: r for r in runs}

    def mean(name: str, key: str):
        return by_name[name]["mean"].get(key) if name in by_name else None

    drops = {c: {str(r): {str(a): mean(f"feddp-r{r}-{c}-dir{a}", "acc_minus_dense") for a in ALPHAS} for r in RATIOS}
             for c in SWEPT}
    chosen = {c: min((r for r in RATIOS if all(d is not None and d >= -1.0 for d in drops[c][str(r)].values())),
                     default=None) for c in SWEPT}
    at = min((r for r in chosen.values() if r is not None), default=0.5)
    timing = {str(t["batch"]): t["time_saved_over_flops_saved"] for t in measured["timing"]
              if t["model"] == "gated-cnn" and t["keep_ratio"] == at}
    return {
        "acc_minus_dense_points": drops,
        "keep_ratio_within_1_point": chosen,
        "inference_flops_ratio_at_that_r": {c: None if r is None else measured["flops_ratio"].get(str(r))
                                            for c, r in chosen.items()},
        "inference_flops_ratio": measured["flops_ratio"],
        "time_saved_over_flops_saved": timing,
        "time_saved_over_flops_saved_keep_ratio": at,
        "threshold_upload_bytes_ratio": {f"{tau:g}": mean(f"threshold-{tau:g}-resnet20-dir0.5",
                                                         "bytes_up_per_client_round_ratio") for tau in THRESHOLDS},
        "threshold_conv_zero_share_up": {f"{tau:g}": mean(f"threshold-{tau:g}-resnet20-dir0.5", "conv_zero_share_up")
                                         for tau in THRESHOLDS},
        "corrections_at_r0.5": {c: {str(a): mean(f"feddp-r0.5-{c}-dir{a}", "acc_minus_dense") for a in ALPHAS}
                                for c in ("none", "fedprox", "scaffold")},
        "gated_unpruned_minus_dense_points": {str(a): mean(f"feddp-r1.0-none-dir{a}", "acc_minus_dense")
                                              for a in ALPHAS},
    }


def table(results: dict) -> str:
    """The README table: accuracy and costs per run against dense FedAvg, then inference FLOPs and time."""
    runs = {r["name"]: r for r in results["runs"]}
    lines = ["| run | model | r | correction | tau | test acc Dir(0.1) | vs dense | test acc Dir(0.5) | vs dense "
             "| KB up / client-round (ratio) | KB down / client-round (ratio) | train MFLOPs / example |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys(r["name"].rsplit("-dir", 1)[0] for r in results["runs"]))
    for key in keys:
        both = {a: runs.get(f"{key}-dir{a}") for a in ALPHAS}
        first = next(r for r in both.values() if r)
        cells = []
        for a in ALPHAS:
            r = both[a]
            cells += (["n/a", "n/a"] if r is None else
                      [report.pm(r, "final_test_accuracy"),
                       "-" if r["reference"] == r["name"] else report.pm(r, "acc_minus_dense", "{:+.2f}")])
        m = first["mean"]
        ratio = (lambda k: "" if first["reference"] == first["name"] else
                 f" ({report.pm(first, k + '_ratio', '{:.3f}')})")
        lines.append(
            f"| {key} | {first['model']} | {first.get('keep_ratio', '-')} | {first.get('correction', '-')} | "
            f"{first.get('threshold', '-')} | {' | '.join(cells)} | "
            f"{m['bytes_up_per_client_round'] / 1e3:.0f}{ratio('bytes_up_per_client_round')} | "
            f"{m['bytes_down_per_client_round'] / 1e3:.0f}{ratio('bytes_down_per_client_round')} | "
            f"{m['train_flops_per_example'] / 1e6:.1f} |")
    inf = results["inference"]
    lines += ["", "| r | " + " | ".join(inf["flops_ratio"]) + " |", "|---|" + "---|" * len(inf["flops_ratio"]),
              "| gated CNN inference FLOPs / dense (counted, skipping path) | "
              + " | ".join(f"{v:.3f}" for v in inf["flops_ratio"].values()) + " |"]
    lines += ["", "| model | weights | r | batch | FLOPs saved | CPU time saved vs dense path (median [p25, p75]) "
              "| time saved / FLOPs saved | time saved vs PyTorch module | dense path ms | skipping path ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for t in inf["timing"]:
        ts, s = t["time_saved"], t["seconds"]
        lines.append(
            f"| {t['model']} | {t['weights']} | {t['keep_ratio']} | {t['batch']} | {t['flops_saved']:.3f} | "
            f"{ts['median']:.3f} [{ts['p25']:.3f}, {ts['p75']:.3f}] | {t['time_saved_over_flops_saved']:.2f} | "
            f"{t['time_saved_vs_module']['median']:.3f} | {s['dense']['median'] * 1e3:.3f} | "
            f"{s['skip']['median'] * 1e3:.3f} |")
    sm = results["summary"]
    within = "; ".join(f"{c}: {'none' if r is None else f'r = {r} (inference FLOPs / dense {f:.3f})'}" for (c, r), f in
                       zip(sm["keep_ratio_within_1_point"].items(), sm["inference_flops_ratio_at_that_r"].values()))
    lines += ["", f"Setting: {results['setting']['description']}{report.seeds_note(results)} Smallest r within 1 "
              f"point of dense FedAvg under both splits, per correction rule: {within}. Time saved / FLOPs saved "
              f"(gated CNN, r = {sm['time_saved_over_flops_saved_keep_ratio']}): "
              + ", ".join(f"batch {b}: {v:.2f}" for b, v in sm["time_saved_over_flops_saved"].items())
              + f". {report.total_note(results)}. Command: `{results['command']}`"
              + (f"; inference measured again with `{inf['command']}`." if "command" in inf else ".")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = sweep.parser(__doc__, "feddp", rounds=15, nodes=10)
    parser.add_argument("--threshold-rounds", type=int, default=2, help="rounds of the ResNet-20 threshold runs")
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--inference-only", action="store_true",
                        help="keep the committed runs; measure the inference again on their models under --out")
    args = sweep.parse(parser, argv)
    if args.inference_only:
        return inference_again(args)
    if args.quick:
        args.threshold_rounds = 1
        dataset, root = "mnist", str(args.data_root)
        data = f"dataset.name=mnist dataset.root={root} partition.min_partition_size=5"
    else:
        dataset, root = "fashion-mnist", str(sweep.fashion_subset(args.out / "data", args.train_size, args.test_size))
        data = f"dataset.root={root}"
    results = sweep.run(plan(args.rounds, args.threshold_rounds, args.nodes, data), args, row, compare)
    results["inference"] = inference(results["runs"], args.out, dataset, root, args.quick)
    results["summary"] = summary(results["runs"], results["inference"])
    source = ("tiny MNIST-format files" if args.quick else
              f"Fashion-MNIST, a fixed random subset of {args.train_size} training and {args.test_size} test images")
    results["setting"].update(
        data=data, client=CLIENT, threshold_rounds=args.threshold_rounds, description=(
            f"{source}, {args.nodes} clients (10% of each held out), Dirichlet 0.1 or 0.5, half of them sampled per "
            f"round, {args.rounds} rounds of 1 local epoch (threshold runs: ResNet-20, Dirichlet 0.5, "
            f"{args.threshold_rounds} rounds), SGD lr 0.01 momentum 0.9 weight decay 1e-5, batch 32; dense FedAvg "
            "with cnn-bn, FedDP with gated-cnn; in-process federation (real strategies and ClientApp), "
            f"{args.workers} runs at a time. Inference timing: CPU time of one thread, repetitions interleaved."))
    return sweep.publish(results, args)


def inference_again(args) -> int:
    """The committed results with their inference part (FLOPs curve, timing) and summary measured
    again on the run directories of the sweep that produced them."""
    results = json.loads((report.RESULTS / "feddp.json").read_text())
    root = str(sweep.fashion_subset(args.out / "data", args.train_size, args.test_size))
    results["inference"] = inference(results["runs"], args.out, "fashion-mnist", root, quick=False)
    results["inference"]["command"] = args.command
    results["summary"] = summary(results["runs"], results["inference"])
    sweep.write_json(report.RESULTS / "feddp.json", results)
    report.update_readme(["feddp"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
