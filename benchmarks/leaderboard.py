"""One leaderboard: every registered method against dense FedAvg, same data, partitions and seeds.

``python -m benchmarks.leaderboard`` (``make bench``) runs, on a Dirichlet(0.5) and a
pathological (2 classes per client) split of a fixed Fashion-MNIST subset, each with seeds 0, 1
and 2, in the in-process federation (benchmarks/sweep.py: the real strategies and ClientApp, no
Ray), two runs at a time:

* every masked method of fedprune/methods.py (random, magnitude, SNIP, SynFlow, gradual
  magnitude, FedTiny, NTK-ZO) at each density of ``--densities`` (default 0.1 and 0.3);
* the methods with their own notion of what is kept at their config's default: FedLP-Homo (p),
  FedLP-Hetero (depth levels), FedDP (r), AutoFLIP (q, q_s); and dense zeroth-order training;
* dense FedAvg as the reference of every method: the same model and client (optimizer, learning
  rate, batch, weight decay) as the method's config, so that a difference is the method's alone.
  The small CNN with configs/fedavg.yaml's client for most methods; FedTiny's reference trains
  ``cnn-bn`` with Adam (its config), FedDP's the dense ``cnn-bn`` (its gated CNN without gates)
  with its SGD, FedLP's the authors' CNN (``fedlp-cnn``) with Adam. Zeroth-order methods
  (ntk-zo, zo-dense) are compared with the backprop FedAvg of the small CNN, and get their own
  round budget (``--zo-rounds``: a ZO round is a few forward passes per client).

Every method keeps its config's defaults except the federation (data, split, 20 clients so that
the pathological split covers every class, a quarter of them sampled per round, no client-side
evaluation, rounds) and what the short schedule needs: magnitude cuts after round
min(2, rounds - 1), gradual magnitude prunes over rounds 1..rounds-2 (as benchmarks/baselines.py),
FedTiny adjusts after every round up to rounds - 2 without its memory budget (as
benchmarks/fedtiny.py; the peak is measured instead), AutoFLIP explores for ``--explore-epochs``
epochs with patience 2 (as benchmarks/autoflip.py).

Per run and seed: final test accuracy, bytes down and up (every message of the run, setup
included), counted training FLOPs (client training, AutoFLIP's exploration included), the
largest measured client peak memory of a training step, wall time; each also as a ratio to the
reference of the same seed and split (then averaged over seeds); and per round, for the plots
(benchmarks/plots.py), test accuracy, cumulative bytes and cumulative training FLOPs. It writes
benchmarks/results/leaderboard.json (``--quick`` too, labelled as such in its setting) and the
plots, and regenerates the README table when benchmarks/report.py knows it.

The full leaderboard (20 rounds, ZO 50, 6000 training images, two densities) takes about an hour
on 2 shared cores. ``--quick`` is the same leaderboard made small enough for about 15 minutes:
1500 training and 500 test images, 3 rounds (ZO: 5), one density (0.1), AutoFLIP exploring 1
epoch; still three seeds. Its numbers are a smoke test of the whole pipeline, not a ranking.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from itertools import accumulate

import yaml

from benchmarks import plots, report, sweep
from benchmarks.autoflip import PARTITIONS
from fedprune.experiment import experiment_from_run_config, load_experiment
from fedprune.methods import METHODS

DENSITIES = (0.1, 0.3)
DENSE_TWIN = {"gated-cnn": "cnn-bn"}
"""The dense model of a method's model, for its FedAvg reference (FedDP's gated CNN is cnn-bn with gates)."""
COSTS = ("bytes_down", "bytes_up", "train_flops", "client_peak_memory", "wall_seconds")
"""Costs also given as ratios to the dense FedAvg reference (``<field>_ratio``, per seed)."""
DEAREST = ("ntk-zo", "zo-dense", "autoflip", "fedlp-homo", "fedlp-hetero")
"""Run first in each split, so that the workers finish close together."""
QUICK = {"rounds": 3, "nodes": 20, "seeds": sweep.DEFAULT_SEEDS, "zo_rounds": 5, "densities": [0.1],
         "train_size": 1500, "test_size": 500, "explore_epochs": 1}


@dataclass(frozen=True)
class Entry:
    """A method on the leaderboard: ``masked`` methods run at every density; the others at their
    config's default, described by ``knob`` (the experiment -> text)."""
    method: str
    label: str
    knob: Callable | None = None
    zeroth_order: bool = False

    @property
    def masked(self) -> bool:
        return METHODS[self.method].masked


ENTRIES = (
    Entry("random", "random mask"),
    Entry("magnitude", "magnitude"),
    Entry("snip", "SNIP"),
    Entry("synflow", "SynFlow"),
    Entry("gradual-magnitude", "gradual magnitude"),
    Entry("fedtiny", "FedTiny"),
    Entry("autoflip", "AutoFLIP", lambda e: f"q = {e.autoflip.quantile}, q_s = {e.autoflip.structured_quantile}"),
    Entry("fedlp-homo", "FedLP-Homo", lambda e: f"p = {e.fedlp.p}"),
    Entry("fedlp-hetero", "FedLP-Hetero", lambda e: f"levels {e.fedlp.preferred_level or 'uniform'}"),
    Entry("feddp", "FedDP", lambda e: f"r = {e.feddp.keep_ratio}, {e.feddp.correction}"),
    Entry("ntk-zo", "NTK-ZO", zeroth_order=True),
    Entry("zo-dense", "dense ZO", lambda e: "dense", zeroth_order=True),
)
"""Every registered method but dense FedAvg (tests/test_leaderboard.py checks that none is missing)."""


@cache
def config(method: str):
    """The method's default experiment (configs/<method>.yaml)."""
    return load_experiment(METHODS[method].config)


def reference_of(entry: Entry) -> tuple[str, dict]:
    """The dense FedAvg twin of a method: its model (dense) and its client config. Zeroth-order
    methods have no backprop client: theirs is configs/fedavg.yaml's."""
    source = config("fedavg" if entry.zeroth_order else entry.method)
    model = DENSE_TWIN.get(source.model.name, source.model.name)
    if model.startswith("gated-"):
        raise ValueError(f"{entry.method}: no dense twin of {model}; add it to DENSE_TWIN")
    return model, asdict(source.client)


def yaml_value(value) -> str:
    """``value`` as an override reads it back (YAML: 1e-05 would be a string, 1.0e-05 is a number)."""
    return yaml.safe_dump(value).removesuffix("\n...\n").strip()


def method_overrides(entry: Entry, rounds: int, explore_epochs: int) -> str:
    """What the short schedule needs (see the module docstring)."""
    return {"magnitude": f"pruning.warmup_rounds={min(2, rounds - 1)}",
            "gradual-magnitude": f"pruning.start_round=1 pruning.end_round={max(1, rounds - 2)}",
            "fedtiny": f"fedtiny.delta=1 fedtiny.t_end={max(2, rounds - 2)} fedtiny.memory_budget=null",
            "autoflip": f"autoflip.explore_epochs={explore_epochs} autoflip.patience=2",
            }.get(entry.method, "")


def federation(root) -> str:
    """The overrides every run shares: the data, a quarter of the clients per round, no client-side evaluation."""
    return f"dataset.name=fashion-mnist dataset.root={root} sampling.fraction_train=0.25 sampling.fraction_evaluate=0"


def plan(args, common: str) -> list[dict]:
    """Per split: the references first (dense FedAvg of the small CNN is ``fedavg-<split>``), then
    every entry at each density (masked) or at its default; the dearest runs first within a split."""
    specs = []
    for part, split in PARTITIONS.items():
        references: dict[str, str] = {}  # overrides -> name
        runs = []
        for entry in ENTRIES:
            model, client = reference_of(entry)
            twin = f"model.name={model} " + " ".join(f"client.{k}={yaml_value(v)}" for k, v in client.items())
            if twin not in references:
                name = f"fedavg-{part}" if not references else f"fedavg-{model}-{client['optimizer']}-{part}"
                references[twin] = name if name not in references.values() else f"{name}-{len(references)}"
                client_text = f"{client['optimizer']} lr {client['lr']:g} batch {client['batch_size']}"
                specs.append(spec(references[twin], "fedavg", "dense FedAvg", part, None, client_text, model,
                                  args.rounds, args.nodes, f"{common} {split} {twin}", references[twin]))
            rounds = args.zo_rounds if entry.zeroth_order else args.rounds
            extra = f"{common} {split} {method_overrides(entry, rounds, args.explore_epochs)}"
            knob = entry.knob(config(entry.method)) if entry.knob else None
            for density in args.densities if entry.masked else [None]:
                name = f"{entry.method}{'' if density is None else f'-d{density}'}-{part}"
                runs.append(spec(name, entry.method, entry.label, part, density, knob, config(entry.method).model.name,
                                 rounds, args.nodes, extra + ("" if density is None else f" pruning.density={density}"),
                                 references[twin]))
        specs += sorted(runs, key=lambda s: s["method"] not in DEAREST)
    return specs


def spec(name, method, label, part, density, knob, model, rounds, nodes, overrides, reference) -> dict:
    return {"name": name, "method": method, "label": label, "partition": part, "target_density": density,
            "knob": knob, "model": model, "reference": reference, "nodes": nodes,
            "config": {"experiment": METHODS[method].config, "num-server-rounds": rounds,
                       "overrides": " ".join(overrides.split())}}


def row(spec: dict, seed: int, summary: dict, records: list[dict]) -> dict:
    """One run: accuracy, bytes, counted training FLOPs (exploration included), client peak memory;
    per round: test accuracy, cumulative bytes (down + up) and cumulative training FLOPs."""
    trained = [r for r in records if r["round"] >= 1]
    flops = [r.get("train_flops", 0.0) + r.get("autoflip_explore_flops", 0.0) for r in records]
    return {
        "final_test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": summary["best_test_accuracy"],
        "density": records[-1]["density"],
        "bytes_down": sum(r["bytes_down"] for r in records),
        "bytes_up": sum(r["bytes_up"] for r in records),
        "train_flops": sum(flops),
        "client_peak_memory": max(r.get("train_peak_memory", 0) for r in trained),
        "rejected_replies": sum(r["rejected_replies"] + r["failed_replies"] for r in records),
        "accuracy_by_round": [r["test_accuracy"] for r in records],
        "cumulative_bytes_by_round": list(accumulate(r["bytes_down"] + r["bytes_up"] for r in records)),
        "cumulative_flops_by_round": list(accumulate(flops)),
    }


def compare(row: dict, dense: dict) -> dict:
    """Against the dense FedAvg reference of the same seed and split: accuracy in points, costs as ratios."""
    return {"acc_minus_dense": 100 * (row["final_test_accuracy"] - dense["final_test_accuracy"]),
            **{f"{k}_ratio": sweep.ratio(row[k], dense[k]) for k in COSTS}}


def table(results: dict) -> str:
    """The README leaderboard: per split, every run with its costs and their ratios to its reference."""
    lines = ["| split | method | model | density / setting | rounds | test acc | vs dense (points) | MB down (ratio) | "
             "MB up (ratio) | train GFLOPs (ratio) | client peak MB (ratio) | wall s (ratio) | reference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        m = r["mean"]
        dense = r["reference"] == r["name"]

        def cost(key: str, scale: float, fmt: str) -> str:
            value = fmt.format(m[key] / scale)
            return value if dense else f"{value} ({report.pm(r, key + '_ratio', '{:.3f}')})"

        setting = (f"dense, {r['knob']}" if dense else r["knob"] or f"{r['target_density']} ({m['density']:.3f})")
        lines.append(
            f"| {r['partition']} | {r['label']} | {r['model']} | {setting} | {r['config']['num-server-rounds']} | "
            f"{report.pm(r, 'final_test_accuracy')} | {'-' if dense else report.pm(r, 'acc_minus_dense', '{:+.2f}')} | "
            f"{cost('bytes_down', 1e6, '{:.1f}')} | {cost('bytes_up', 1e6, '{:.1f}')} | "
            f"{cost('train_flops', 1e9, '{:.1f}')} | {cost('client_peak_memory', 1e6, '{:.1f}')} | "
            f"{cost('wall_seconds', 1, '{:.0f}')} | {'-' if dense else r['reference']} |")
    lines += ["", f"Setting: {results['setting']['description']}{report.seeds_note(results)} The reference of a run is "
              "the dense FedAvg run named in the last column (same model and client as the method's config). "
              "Bytes: every message of the run, setup rounds included; training FLOPs: counted forward + "
              "backward of the clients' training (zeroth order: forward passes), AutoFLIP's exploration "
              "included; client peak: the largest measured peak of one client training step; wall: the whole "
              f"run in a worker sharing 2 cores. {report.total_note(results)}. Command: "
              f"`{results['command']}`."]
    return "\n".join(lines)


def description(args, data: str) -> str:
    return (f"{'QUICK MODE (--quick, a smoke-size leaderboard): ' if args.quick else ''}{data}, {args.nodes} "
            f"clients (10% of each held out), Dirichlet(0.5) or pathological (2 classes per client), a quarter "
            f"sampled per round, {args.rounds} rounds of 1 local epoch (zeroth order: {args.zo_rounds} rounds), no "
            f"client-side evaluation; masked methods at densities {', '.join(map(str, args.densities))}, the others "
            f"at their config's default; AutoFLIP explores {args.explore_epochs} epoch(s); each method's own model "
            "and client (configs/<method>.yaml); seeds "
            f"{', '.join(map(str, args.seeds))}; in-process federation (real strategies and ClientApp), "
            f"{args.workers} runs at a time.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = sweep.parser(__doc__, "leaderboard", rounds=20, nodes=20)
    parser.add_argument("--zo-rounds", type=int, default=50, help="rounds of the zeroth-order methods")
    parser.add_argument("--densities", type=lambda s: [float(x) for x in s.split(",")], default=list(DENSITIES))
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--explore-epochs", type=int, default=3, help="AutoFLIP's exploration epochs (at most)")
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    args = sweep.parse(parser, argv)
    root = sweep.fashion_subset(args.out / "data", args.train_size, args.test_size)
    data = f"Fashion-MNIST, a fixed random subset of {args.train_size} training and {args.test_size} test images"
    specs = sweep.select(plan(args, federation(root)), args.only)
    for s in specs:  # a bad run config fails here, not after an hour of runs
        experiment_from_run_config({**s["config"], "seed": 0})
    results = sweep.run(specs, args, row, compare)
    results["setting"].update(quick=args.quick, zo_rounds=args.zo_rounds, densities=args.densities,
                              train_size=args.train_size, test_size=args.test_size,
                              explore_epochs=args.explore_epochs, description=description(args, data))
    partial = bool(args.only) or bool(results.get("failed_runs"))  # never replaces the committed results
    path = (args.out if partial else report.RESULTS) / "leaderboard.json"
    sweep.write_json(path, results)
    print(table(results))
    written = plots.render(results, path.parent)
    if not partial and "leaderboard" in report.TABLES:
        report.update_readme(["leaderboard"])
    print(f"wrote {path} and {', '.join(p.name for p in written)} in {results['total_seconds']:.0f} s")
    return sweep.report_failures(results)


if __name__ == "__main__":
    sys.exit(main())
