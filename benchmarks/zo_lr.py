"""Is masked ZO behind dense ZO only for want of its learning rate? A centralized study.

``python -m benchmarks.zo_lr [--steps 200] [--seeds 0 1]`` trains the small CNN on a fixed
Fashion-MNIST subset (benchmarks.ntk_zo's: 20000 training, 1000 test images) with the ZO estimator
of the federation (pruning/zo.py: K = 20 seeded Gaussian directions, forward differences, sigma
1e-3, scalars clipped to +-5) for ``--steps`` steps of batch 96 (what a federated round of 3 clients
with batch 32 averages into one step), dense and under the data-free NTK-SAP mask at density 0.1
(pruning/ntk.py with Gaussian inputs, 5 iterations on the exponential schedule, as the federated
data-free mask computes it), over a grid of learning rates for each, with a constant step and
with a step that decays from the learning rate to 0 over the run by a half cosine
(``ntk_zo.lr_schedule: cosine``, grids twice as high). No federation: this isolates the optimizer
from the protocol. Test accuracy every quarter of the run; per learning rate the mean and sample
std over seeds. One process per seed, two at a time, one thread each (about 40 minutes on 2
cores). Writes benchmarks/results/zo_lr.json; ``summary`` holds each variant's best final accuracy
and its learning rate, and per schedule the masked-minus-dense gap, each at its best rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks import sweep
from fedprune.experiment import APP_ROOT

RESULTS = Path(__file__).resolve().parent / "results" / "zo_lr.json"
LRS = {"dense": (0.0025, 0.005, 0.01, 0.02), "masked": (0.01, 0.02, 0.04, 0.08),
       "dense-cosine": (0.005, 0.01, 0.02, 0.04), "masked-cosine": (0.02, 0.04, 0.08, 0.16)}
"""Learning-rate grid per variant: dense or masked, constant step or ``-cosine``."""
SCHEDULES = {"constant": ("dense", "masked"), "cosine": ("dense-cosine", "masked-cosine")}


def data(root: Path):
    """The subset's (train_x, train_y, test_x, test_y), normalized, from its files in ``root``."""
    from fedprune.data import load_dataset, normalize

    splits = load_dataset("fashion-mnist", str(root))
    return (normalize(splits.train_x, splits.spec), splits.train_y, normalize(splits.test_x, splits.spec),
            splits.test_y)


def ntk_mask(experiment, seed: int) -> dict[str, torch.Tensor]:
    from fedprune.seeding import torch_generator
    from fedprune.task import maskable_names, new_model
    from pruning.ntk import iterative_masks, ntk_scores
    from strategies.baselines import selector

    cfg, model = experiment.ntk_zo, new_model(experiment)
    names = maskable_names(experiment, model)

    def score(masks, j):
        g = torch_generator(seed, "zo-lr-mask", j)
        inputs = [torch.randn(cfg.score_batch_size, 1, 28, 28, generator=g) for _ in range(3 * cfg.draws)]
        return ntk_scores(model, names, inputs, masks, epsilon=cfg.epsilon, generator=g,
                          resample_weights=cfg.resample_weights)

    return iterative_masks({n: model.get_parameter(n).shape for n in names}, experiment.pruning.density,
                           cfg.prune_iterations, score, selector(experiment.pruning.allocation))


def train(experiment, masks, lr: float, schedule: str, steps: int, seed: int, tensors) -> list[float]:
    """Test accuracy after each quarter of ``steps`` ZO steps (step sizes: ``ntk_zo.step_lr``)."""
    from fedprune.task import new_model
    from pruning.zo import apply_update_, clip, directional_derivatives

    x, y, tx, ty = tensors
    cfg = dataclasses.replace(experiment.ntk_zo, lr=lr, lr_schedule=schedule, lr_decay_steps=steps)
    model = new_model(experiment)
    if masks:
        with torch.no_grad():
            for name, mask in masks.items():
                model.get_parameter(name).mul_(mask)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    accuracy = []
    for step in range(steps):
        batch = torch.randint(0, len(y), (96,), generator=g)
        scalars, _ = directional_derivatives(model, nn.functional.cross_entropy, (x[batch], y[batch]), masks,
                                             seed * 1_000_003 + step, cfg.num_perturbations, cfg.sigma,
                                             cfg.difference)  # whole-batch forwards: the same losses, faster
        apply_update_(params, masks, seed * 1_000_003 + step, clip(scalars, cfg.clip), cfg.step_lr(step))
        if (step + 1) % max(1, steps // 4) == 0:
            with torch.no_grad():
                accuracy.append(float((model.eval()(tx).argmax(1) == ty).float().mean()))
    return accuracy


def seed_runs(seed: int, steps: int, root: Path) -> list[dict]:
    """Every variant and learning rate with one seed (one process, one thread)."""
    from fedprune.allocator import keep_freed_memory
    from fedprune.experiment import load_experiment

    torch.set_num_threads(1)
    keep_freed_memory()
    experiment = load_experiment("configs/ntk-zo.yaml")
    tensors = data(root)
    mask, runs = ntk_mask(experiment, seed), []
    for variant, lrs in LRS.items():
        for lr in lrs:
            acc = train(experiment, mask if variant.startswith("masked") else None, lr,
                        "cosine" if variant.endswith("-cosine") else "constant", steps, seed, tensors)
            runs.append({"variant": variant, "lr": lr, "seed": seed, "accuracy_by_quarter": acc})
            print(f"[zo_lr] seed {seed} {variant} lr {lr}: {[round(a, 3) for a in acc]}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    from fedprune.experiment import load_experiment

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    experiment = load_experiment("configs/ntk-zo.yaml")
    root = sweep.fashion_subset(APP_ROOT / "outputs" / "bench-zo_lr" / "data", 20_000, 1_000)  # before any reader
    t0 = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(min(len(args.seeds), 2)) as pool:
        runs = [r for rs in pool.starmap(seed_runs, [(seed, args.steps, root) for seed in args.seeds]) for r in rs]
    summary = {}
    for variant, lrs in LRS.items():
        finals = {lr: [r["accuracy_by_quarter"][-1] for r in runs if r["variant"] == variant and r["lr"] == lr]
                  for lr in lrs}
        means = {lr: statistics.fmean(v) for lr, v in finals.items()}
        best = max(means, key=means.get)
        summary[variant] = {"final_accuracy_mean_by_lr": {str(k): v for k, v in means.items()},
                            "final_accuracy_std_by_lr": {str(k): statistics.stdev(v) if len(v) > 1 else 0.0
                                                         for k, v in finals.items()},
                            "best_lr": best, "best_final_accuracy_mean": means[best],
                            "best_final_accuracy_per_seed": finals[best]}
    summary["gap_points"] = {}
    for schedule, (dense, masked) in SCHEDULES.items():
        gaps = [100 * (m - d) for m, d in zip(summary[masked]["best_final_accuracy_per_seed"],
                                              summary[dense]["best_final_accuracy_per_seed"])]
        summary["gap_points"][schedule] = {"mean": statistics.fmean(gaps),
                                           "std": statistics.stdev(gaps) if len(gaps) > 1 else 0.0}
    results = {"what": __doc__.split("\n\n")[0],
               "command": "python -m benchmarks.zo_lr " + " ".join(argv if argv is not None else sys.argv[1:]),
               "setting": {"steps": args.steps, "batch": 96, "seeds": args.seeds, "lrs": LRS,
                           "density": experiment.pruning.density, "k": experiment.ntk_zo.num_perturbations,
                           "sigma": experiment.ntk_zo.sigma, "clip": experiment.ntk_zo.clip},
               "seconds": time.monotonic() - t0, "runs": runs, "summary": summary}
    sweep.write_json(args.out, results)
    for schedule, gap in summary["gap_points"].items():
        print(f"[zo_lr] {schedule}: masked minus dense, each at its best rate, {gap['mean']:+.1f} +- {gap['std']:.1f} "
              "points")
    print(f"[zo_lr] wrote {args.out}")
    return 0


def table(results: dict) -> str:
    """README table: final test accuracy (mean over seeds) per variant and learning rate."""
    s = results["summary"]
    seeds = results["setting"]["seeds"]
    lines = ["| variant | learning rate | test accuracy after each quarter of the steps (mean over seeds) "
             "| final, mean +- std |", "|---|---:|---|---:|"]
    for variant, lrs in results["setting"]["lrs"].items():
        for lr in lrs:
            curves = [r["accuracy_by_quarter"] for r in results["runs"] if r["variant"] == variant and r["lr"] == lr]
            mean = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
            best = " **(best)**" if lr == s[variant]["best_lr"] else ""
            std = s[variant]["final_accuracy_std_by_lr"][str(lr)]
            lines.append(f"| {variant} ZO | {lr:g} | {' / '.join(f'{a:.3f}' for a in mean)}{best} "
                         f"| {mean[-1]:.3f} +- {std:.3f} |")
    gaps = "; ".join(f"{schedule} step {g['mean']:+.1f} +- {g['std']:.1f} points"
                     for schedule, g in s["gap_points"].items())
    lines += ["", f"Best final accuracy, masked minus dense (each at its best learning rate, per seed): {gaps} "
                  f"(seeds {', '.join(map(str, seeds))}; {results['setting']['steps']} steps, "
                  f"{results['seconds'] / 60:.0f} min). Command: `{results['command'].strip()}`."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
