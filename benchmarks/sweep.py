"""The sweep runner every benchmark shares: runs x seeds in the in-process federation, one row per
run and seed, mean and std per run across seeds, the results file and its README table.

A benchmark is a list of run specs, a row function and a table (benchmarks/report.py); its
``main`` is a few lines::

    args = sweep.parse(sweep.parser(__doc__, "baselines", rounds=6, nodes=10), argv)
    results = sweep.run(plan(args), args, row, compare)
    results["setting"]["description"] = "..."
    return sweep.publish(results, args)

A run spec is a dict: ``name`` (unique), ``config`` (the run config for
benchmarks.inprocess.run_inprocess: ``experiment``, ``num-server-rounds``, ``overrides``; the
sweep sets ``seed``), ``nodes``, optionally ``reference`` (the name of the run every seed of this
one is compared against, e.g. dense FedAvg) and whatever labels the table needs (method,
density, ...).

Every (run, seed) pair is one task of a spawn Pool (one torch thread per worker) and writes
``<out>/<name>-s<seed>/``. ``row(spec, seed, summary, records)`` (records: the parsed
rounds.jsonl) turns it into a flat dict; the sweep adds ``seed`` and ``wall_seconds`` (the whole
run_inprocess call). ``compare(row, reference_row)`` adds fields computed against the reference's
row of the same seed (accuracy differences, cost ratios), so their mean is the mean of per-seed
differences and ratios. Per run, ``mean`` and ``std`` hold every numeric field that every seed
has; std is the sample standard deviation (ddof=1) and absent with a single seed.

``--reuse`` takes every (run, seed) pair already finished under ``--out`` with the same experiment
(its config.yaml) and as many rounds instead of running it again: a sweep that gains runs, or
was stopped, runs only what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from benchmarks import report
from fedprune.files import write_atomically

QUICK_DATA = Path("/tmp/fedprune-quick-mnist")
DEFAULT_SEEDS = [0, 1, 2]

Row = Callable[[dict, int, dict, list[dict]], dict]
Compare = Callable[[dict, dict], dict]


def parser(doc: str, name: str, *, rounds: int, nodes: int, workers: int = 2) -> argparse.ArgumentParser:
    """The options every sweep shares; a benchmark may add its own before :func:`parse`.
    ``name`` is the benchmark's module, results file and README table."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.split("\n\n")[0])
    p.add_argument("--rounds", type=int, help=f"server rounds (default {rounds}; --quick: 2)")
    p.add_argument("--nodes", type=int, help=f"clients (default {nodes}; --quick: 3)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")],
                   help="comma-separated run seeds (default 0,1,2; --quick: 0,1)")
    p.add_argument("--workers", type=int, default=workers, help=f"runs at a time (default {workers})")
    p.add_argument("--only", type=lambda s: s.split(","), default=[],
                   help="comma-separated substrings of run names: only those runs and their references")
    p.add_argument("--out", type=Path, default=report.ROOT / "outputs" / f"bench-{name}",
                   help="run directories, and the results of a partial sweep (--quick, --only)")
    p.add_argument("--quick", action="store_true", help="tiny MNIST-format data, 2 rounds, 3 nodes, seeds 0,1")
    p.add_argument("--reuse", action="store_true",
                   help="take the runs already finished in --out with the same experiment instead of rerunning them")
    p.set_defaults(name=name, full_defaults=(rounds, nodes, DEFAULT_SEEDS))
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with --quick's defaults; ``args.data_root``: --quick's MNIST files (else None),
    ``args.command``: the command line for the results file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    defaults = (2, 3, [0, 1]) if args.quick else args.full_defaults
    args.rounds, args.nodes, args.seeds = (d if v is None else v for v, d in
                                           zip((args.rounds, args.nodes, args.seeds), defaults))
    args.data_root = None
    if args.quick:
        from tests.conftest import write_mnist

        args.data_root = write_mnist(QUICK_DATA)
    args.command = " ".join([p.prog, *argv])
    return args


def select(specs: list[dict], only: list[str]) -> list[dict]:
    """The specs whose name contains one of ``only`` (all when empty), plus their references."""
    names = [s["name"] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique: {names}")
    if not only:
        return specs
    chosen = {s["name"] for s in specs if any(o in s["name"] for o in only)}
    chosen |= {s["reference"] for s in specs if s["name"] in chosen and s.get("reference")}
    return [s for s in specs if s["name"] in chosen]


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _execute(job: tuple[dict, int, str, Row]) -> tuple[str, int, float | None, dict]:
    """One run: (name, seed, final accuracy, its row); a run that raises gives accuracy None and
    ``{"seed", "wall_seconds", "error"}`` instead, so that the other runs go on."""
    spec, seed, out, row = job
    from benchmarks.inprocess import run_inprocess

    run_dir = Path(out) / f"{spec['name']}-s{seed}"
    start = time.monotonic()
    try:
        summary = run_inprocess({**spec["config"], "seed": seed}, spec["nodes"], run_dir)
        records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
        result = row(spec, seed, summary, records)
    except Exception as exc:  # noqa: BLE001 - any failure of one run is reported with the results
        return spec["name"], seed, None, {"seed": seed, "wall_seconds": time.monotonic() - start,
                                          "error": f"{type(exc).__name__}: {exc}"}
    return spec["name"], seed, summary["final_test_accuracy"], {
        "seed": seed, "wall_seconds": time.monotonic() - start, **result}


NEUTRAL_KEYS = (("evaluation", "batch_size"),)
"""Experiment settings a finished run may differ in and still be reused: how many test images are
evaluated at once changes no prediction (it was 1000 before it became 256)."""


def finished(spec: dict, seed: int, out: Path, row: Row) -> dict | None:
    """The row of a run of ``spec`` and ``seed`` that finished in ``out`` with the same experiment
    (but for :data:`NEUTRAL_KEYS`; a key the run's config.yaml lacks, added since, counts with its
    default) and as many rounds, else None."""
    from fedprune.experiment import ExperimentError, experiment_from_mapping, experiment_from_run_config

    run_dir = out / f"{spec['name']}-s{seed}"
    try:
        result = json.loads((run_dir / "summary.json").read_text())
        records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
        done = experiment_from_mapping(yaml.safe_load((run_dir / "config.yaml").read_text())).to_dict()
    except (FileNotFoundError, ExperimentError):  # not run, or a key since removed or restricted
        return None
    experiment = experiment_from_run_config({**spec["config"], "seed": seed})
    wanted = experiment.to_dict()
    for section, key in NEUTRAL_KEYS:
        done.get(section, {}).pop(key, None)
        wanted.get(section, {}).pop(key, None)
    if (result.get("status") != "completed" or done != wanted
            or len(records) != experiment.num_server_rounds + 1):
        return None
    return {"seed": seed, "wall_seconds": result["wall_seconds"], **row(spec, seed, result, records)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarize(per_seed: list[dict]) -> dict:
    """``mean`` and ``std`` (sample, ddof=1; empty with one seed) of every numeric field that every
    row has, ``seed`` aside."""
    keys = [k for k in per_seed[0] if k != "seed" and all(_number(r.get(k)) for r in per_seed)]
    return {"mean": {k: statistics.fmean(r[k] for r in per_seed) for k in keys},
            "std": {k: statistics.stdev(r[k] for r in per_seed) for k in keys} if len(per_seed) > 1 else {}}


def aggregate(specs: list[dict], rows: dict[tuple[str, int], dict], compare: Compare | None = None) -> list[dict]:
    """One entry per spec that has rows, in the specs' order: the spec, ``per_seed`` (its rows by
    seed, each with ``compare`` against the reference's row of the same seed), ``mean``, ``std``."""
    runs = []
    for spec in specs:
        per_seed = []
        for seed in sorted(seed for name, seed in rows if name == spec["name"]):
            row, reference = rows[spec["name"], seed], rows.get((spec.get("reference"), seed))
            per_seed.append({**row, **(compare(row, reference) if compare and reference else {})})
        if per_seed:
            runs.append({**spec, "per_seed": per_seed, **summarize(per_seed)})
    return runs


def ratio(x: float, reference: float) -> float | None:
    """``x / reference``, None when the reference is 0."""
    return x / reference if reference else None


def traffic(record: dict, purposes: tuple[str, ...], directions: tuple[str, ...] = ("down", "up")) -> int:
    """A round record's bytes for these purposes (``bytes_<direction>_<purpose>``; absent: 0)."""
    return sum(record.get(f"bytes_{d}_{p}", 0) for d in directions for p in purposes)


def run(specs: list[dict], args: argparse.Namespace, row: Row, compare: Compare | None = None) -> dict:
    """Every (run, seed) pair of the selected specs, ``args.workers`` at a time, one progress line
    each; the results: command, setting (rounds, nodes, workers), seeds, total_seconds, runs (and
    ``reused_runs``: how many pairs ``--reuse`` took from finished run directories instead).
    ``total_seconds`` counts only the runs made now."""
    specs = select(specs, args.only)
    rows: dict[tuple[str, int], dict] = {}
    jobs = []
    for seed in args.seeds:
        for spec in specs:
            if getattr(args, "reuse", False) and (done := finished(spec, seed, Path(args.out), row)) is not None:
                rows[spec["name"], seed] = done
            else:
                jobs.append((spec, seed, str(args.out), row))
    reused = len(rows)
    if reused:
        print(f"[sweep] {reused} runs taken from {args.out} (--reuse), {len(jobs)} to run", flush=True)
    failed: list[dict] = []
    started = time.monotonic()
    with mp.get_context("spawn").Pool(args.workers, initializer=_one_thread) as pool:
        for done, (name, seed, accuracy, result) in enumerate(pool.imap_unordered(_execute, jobs), 1):
            if accuracy is None:
                failed.append({"name": name, **result})
            else:
                rows[name, seed] = result
            eta = (time.monotonic() - started) / done * (len(jobs) - done)
            elapsed = time.monotonic() - started
            outcome = f"acc {accuracy:.4f}" if accuracy is not None else f"FAILED ({result['error'][:80]})"
            print(f"[{'#' * (20 * done // len(jobs)):<20}] {done}/{len(jobs)}  {name:<36} seed {seed:<3} "
                  f"{outcome}  {result['wall_seconds']:5.0f} s  elapsed {elapsed / 60:.0f} min  "
                  f"ETA {eta / 60:.0f} min", flush=True)
    results = {"command": args.command,
               "setting": {"rounds": args.rounds, "nodes": args.nodes, "workers": args.workers},
               "seeds": args.seeds, "total_seconds": time.monotonic() - started,
               "runs": aggregate(specs, rows, compare)}
    if reused:
        results["reused_runs"] = reused
    if failed:
        results["failed_runs"] = failed
    return results


def write_json(path: Path, data: dict) -> None:
    """``path`` replaced atomically (a reader sees the old file or the new one)."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def report_failures(results: dict) -> int:
    """Each failed run with its error on stderr; the exit status: 1 when a run failed, else 0."""
    for run in results.get("failed_runs", []):
        print(f"FAILED: {run['name']} seed {run['seed']}: {run['error']}", file=sys.stderr)
    return 1 if results.get("failed_runs") else 0


def partial(results: dict, args: argparse.Namespace) -> bool:
    """Whether a sweep's results stay out of benchmarks/results/: a --quick or --only sweep, or one
    where runs failed."""
    return args.quick or bool(args.only) or bool(results.get("failed_runs"))


def publish(results: dict, args: argparse.Namespace) -> int:
    """A full sweep: benchmarks/results/<name>.json and its README table. A :func:`partial` one:
    <out>/<name>.json, and the table printed (when a run finished). Returns the exit status
    (:func:`report_failures`)."""
    kept_out = partial(results, args)
    path = (args.out if kept_out else report.RESULTS) / f"{args.name}.json"
    write_json(path, results)
    if not kept_out:
        report.update_readme([args.name])
    elif results["runs"]:
        print(report.TABLES[args.name][1](results))
    print(f"wrote {path}{'' if kept_out else ' and the README table'} in {results['total_seconds']:.0f} s")
    return report_failures(results)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes, as (Fashion-)MNIST ships them."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fashion_subset(directory: Path, train_size: int, test_size: int) -> Path:
    """A fixed random subset of Fashion-MNIST as IDX files (seeded; the same on every machine), so a
    sweep of many runs fits the machine."""
    from fedprune.data import load_dataset
    from fedprune.seeding import numpy_rng

    splits = load_dataset("fashion-mnist")
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, x, y, n in (("train", splits.train_x, splits.train_y, train_size),
                            ("t10k", splits.test_x, splits.test_y, test_size)):
        # the purpose string predates the helper; kept so that committed results stay reproducible
        idx = np.sort(numpy_rng(0, "fedlp-bench-subset", prefix).choice(len(y), size=min(n, len(y)), replace=False))
        write_idx(directory / f"{prefix}-images-idx3-ubyte", x.numpy()[idx, 0])
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", y.numpy()[idx])
    return directory
