"""Two CPU paths every run takes: glibc's allocator thresholds and the 2x2 max-pool.

``python -m benchmarks.cpu_paths [--repeats 3]`` measures, on this machine, one torch thread:

* **allocator**: a fresh process (as a deployed ClientApp is) trains the small CNN for ``--steps``
  steps of batch 32 (SGD, momentum 0.9) and evaluates it on 10,000 images in batches of 256, with
  and without :func:`fedprune.allocator.keep_freed_memory`; CPU seconds and minor page faults of
  each part. Runs alternate, each in its own process.
* **max-pool**: the small CNN's forward on a batch of 256 without autograd and a training step of
  batch 32, with torch's ``nn.MaxPool2d(2)`` against :class:`fedprune.models.MaxPool2x2` in
  both of its paths (strided views; torch's kernel under autograd), median of ``--steps`` calls.

Writes benchmarks/results/cpu_paths.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.sweep import write_json
from fedprune.experiment import APP_ROOT

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_paths.json"


def _cpu_and_faults() -> tuple[float, int]:
    return time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def fresh_process_costs(keep: bool, steps: int) -> dict:
    """In this (fresh) process: CPU seconds and page faults of training and of evaluation."""
    from fedprune.allocator import keep_freed_memory
    from fedprune.models import build_model

    torch.set_num_threads(1)
    applied = keep_freed_memory() if keep else False
    g = torch.Generator().manual_seed(0)
    model = build_model("cnn", 1, 10, 28)
    x, y = torch.randn(steps * 32, 1, 28, 28, generator=g), torch.randint(0, 10, (steps * 32,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cpu, faults = _cpu_and_faults()
    for xb, yb in zip(x.split(32), y.split(32)):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    cpu_train, faults_train = _cpu_and_faults()
    model.eval()
    with torch.no_grad():
        for xb in torch.randn(10_000, 1, 28, 28, generator=g).split(256):
            model(xb)
    cpu_eval, faults_eval = _cpu_and_faults()
    return {"keep_freed_memory": applied, "train_cpu_seconds": cpu_train - cpu,
            "train_page_faults": faults_train - faults, "evaluate_cpu_seconds": cpu_eval - cpu_train,
            "evaluate_page_faults": faults_eval - faults_train}


def allocator(repeats: int, steps: int) -> dict:
    runs: dict[str, list[dict]] = {"default": [], "keep_freed_memory": []}
    for _ in range(repeats):
        for name, keep in (("default", False), ("keep_freed_memory", True)):
            out = subprocess.run([sys.executable, "-m", "benchmarks.cpu_paths", "--child", str(int(keep)),
                                  "--steps", str(steps)], cwd=APP_ROOT, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "keep_freed_memory"}
           for name, rs in runs.items()}
    return {"runs": runs, "median": med,
            "train_cpu_ratio": med["keep_freed_memory"]["train_cpu_seconds"] / med["default"]["train_cpu_seconds"],
            "evaluate_cpu_ratio": (med["keep_freed_memory"]["evaluate_cpu_seconds"]
                                   / med["default"]["evaluate_cpu_seconds"])}


def _median_seconds(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def max_pool(calls: int) -> dict:
    from fedprune.allocator import keep_freed_memory
    from fedprune.models import MaxPool2x2, build_model

    torch.set_num_threads(1)
    keep_freed_memory()
    ours = build_model("cnn", 1, 10, 28)
    theirs = copy.deepcopy(ours)
    for name, layer in list(theirs.features.named_children()):
        if isinstance(layer, MaxPool2x2):
            theirs.features.add_module(name, nn.MaxPool2d(2))
    g = torch.Generator().manual_seed(0)
    xe = torch.randn(256, 1, 28, 28, generator=g)
    xb, yb = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)

    def forward(model):
        def run():
            with torch.no_grad():
                model.eval()(xe)
        return run

    def step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)

        def run():
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model.train()(xb), yb).backward()
            opt.step()
        return run

    out = {"forward_256_seconds": {"torch": _median_seconds(forward(theirs), calls),
                                   "strided_views": _median_seconds(forward(ours), calls)},
           "train_step_32_seconds": {"torch": _median_seconds(step(theirs), calls),
                                     "ours_under_autograd": _median_seconds(step(ours), calls)}}
    out["forward_ratio"] = out["forward_256_seconds"]["strided_views"] / out["forward_256_seconds"]["torch"]
    out["train_step_ratio"] = (out["train_step_32_seconds"]["ours_under_autograd"]
                               / out["train_step_32_seconds"]["torch"])
    return out


def table(results: dict) -> str:
    """The README table: CPU seconds with each path, and the ratio."""
    a, p = results["allocator"]["median"], results["max_pool"]
    rows = [("training, 100 steps of batch 32 (fresh process)", "glibc default", "keep_freed_memory",
             a["default"]["train_cpu_seconds"], a["keep_freed_memory"]["train_cpu_seconds"]),
            ("evaluation, 10,000 images in batches of 256 (fresh process)", "glibc default", "keep_freed_memory",
             a["default"]["evaluate_cpu_seconds"], a["keep_freed_memory"]["evaluate_cpu_seconds"]),
            ("forward without autograd, batch 256", "nn.MaxPool2d", "MaxPool2x2 (strided views)",
             p["forward_256_seconds"]["torch"], p["forward_256_seconds"]["strided_views"]),
            ("training step, batch 32", "nn.MaxPool2d", "MaxPool2x2 (torch's kernel)",
             p["train_step_32_seconds"]["torch"], p["train_step_32_seconds"]["ours_under_autograd"])]
    lines = ["| small CNN, 1 thread | before | after | CPU s before | CPU s after | ratio |",
             "|---|---|---|---:|---:|---:|"]
    lines += [f"| {what} | {b} | {a_} | {x:.3f} | {y:.3f} | {y / x:.2f} |" for what, b, a_, x, y in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--child", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(fresh_process_costs(bool(args.child), args.steps)))
        return 0
    results = {
        "what": "CPU time of training and evaluation of the small CNN with glibc's default and with fixed "
                "allocator thresholds (fresh processes), and of its forward and training step with torch's "
                "max-pool kernel against the strided-view path",
        "command": "python -m benchmarks.cpu_paths " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "setting": {"repeats": args.repeats, "steps": args.steps, "torch_threads": 1},
        "allocator": allocator(args.repeats, args.steps),
        "max_pool": max_pool(args.steps),
    }
    write_json(args.out, results)
    a, p = results["allocator"], results["max_pool"]
    print(f"[cpu_paths] allocator: training CPU x{a['train_cpu_ratio']:.2f}, "
          f"evaluation CPU x{a['evaluate_cpu_ratio']:.2f}; "
          f"max-pool: forward x{p['forward_ratio']:.2f}, training step x{p['train_step_ratio']:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
