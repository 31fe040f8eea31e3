"""The leaderboard's figures, regenerated from benchmarks/results/leaderboard.json.

``python -m benchmarks.plots [RESULTS_JSON] [--out DIR]`` writes, next to the results file by
default, one figure per question, each with a panel per split:

* ``leaderboard_accuracy_vs_bytes.png``: test accuracy against cumulative bytes (down + up, every
  message, log scale), one line per run (method and density) through its rounds: the mean over
  seeds, with the band from the lowest to the highest seed;
* ``leaderboard_accuracy_vs_flops.png``: the same against cumulative counted training FLOPs;
* ``leaderboard_pareto_memory.png``: final test accuracy against the client's measured peak
  memory of a training step (mean over seeds, bars: std), the Pareto front (no other run is both
  more accurate and lighter) drawn as a line and labelled.

A run's x at a round is the mean over seeds of its cumulative bytes or FLOPs at that round (they
differ by seed only through sampling and masks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks import report

FIGURES = ("leaderboard_accuracy_vs_bytes.png", "leaderboard_accuracy_vs_flops.png", "leaderboard_pareto_memory.png")


def label(run: dict) -> str:
    """The legend text of a run: method, and density or the method's own setting; references by model and client."""
    if run["method"] == "fedavg":
        return f"dense FedAvg ({run['model']}, {run['knob']})"
    return f"{run['label']} ({run['knob'] or 'd=' + str(run['target_density'])})"


def styles(runs: list[dict]) -> dict[str, dict]:
    """One style per legend label, the same in every panel and figure: dense FedAvg references in
    black (one dash pattern each), the methods in ten colours, then the same colours dashed."""
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label(r) for r in runs))
    references = [lab for lab in labels if lab.startswith("dense FedAvg")]
    methods = [lab for lab in labels if lab not in references]
    colors, dashes, markers = plt.get_cmap("tab10").colors, ("-", "--", ":", "-."), "osD^vP*Xh<>p"
    out = {lab: {"color": "black", "linestyle": dashes[i % len(dashes)], "marker": "o"}
           for i, lab in enumerate(references)}
    out.update({lab: {"color": colors[i % len(colors)], "linestyle": dashes[(i // len(colors)) % len(dashes)],
                      "marker": markers[i % len(markers)]} for i, lab in enumerate(methods)})
    return out


def curve(run: dict, x_key: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (mean over seeds per round, divided by ``scale``), mean, min and max accuracy per round,
    over the rounds every seed has."""
    seeds = run["per_seed"]
    n = min(len(s["accuracy_by_round"]) for s in seeds)
    acc = np.array([s["accuracy_by_round"][:n] for s in seeds], dtype=float)
    x = np.array([s[x_key][:n] for s in seeds], dtype=float).mean(axis=0) / scale
    return x, acc.mean(axis=0), acc.min(axis=0), acc.max(axis=0)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (memory, accuracy) that no other point dominates (no more memory and
    no less accuracy, one of them strictly), in order of memory."""
    front = [i for i, (m, a) in enumerate(points)
             if not any(m2 <= m and a2 >= a and (m2, a2) != (m, a) for m2, a2 in points)]
    return sorted(front, key=lambda i: points[i])


def _panels(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(dict.fromkeys(r["partition"] for r in results["runs"]))
    fig, axes = plt.subplots(1, len(parts), figsize=(6.2 * len(parts) + 3.6, 5.2), squeeze=False, sharey=True)
    return plt, fig, dict(zip(parts, axes[0]))


def _finish(plt, fig, axes: dict, style: dict, title: str, results: dict, path: Path) -> Path:
    from matplotlib.lines import Line2D

    from matplotlib.ticker import FuncFormatter, NullFormatter

    for ax in axes.values():
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
    next(iter(axes.values())).set_ylabel("test accuracy")
    handles = [Line2D([], [], **s, markersize=5) for s in style.values()]
    fig.legend(handles, list(style), loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=8, frameon=False)
    quick = " — QUICK MODE (smoke-size setting)" if results["setting"].get("quick") else ""
    fig.suptitle(f"{title}{quick}; mean over seeds {', '.join(map(str, results['seeds']))}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.80, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_curves(results: dict, x_key: str, scale: float, xlabel: str, title: str, path: Path) -> Path:
    """Accuracy per round against a cumulative cost, one line per run with its min-max seed band."""
    plt, fig, axes = _panels(results)
    style = styles(results["runs"])
    for r in results["runs"]:
        x, mean, lo, hi = curve(r, x_key, scale)
        keep = x > 0  # log x: the rounds before any cost (round 0 of most runs) are left out
        s = style[label(r)]
        ax = axes[r["partition"]]
        ax.plot(x[keep], mean[keep], color=s["color"], linestyle=s["linestyle"], marker=s["marker"], markersize=3,
                linewidth=1.3)
        ax.fill_between(x[keep], lo[keep], hi[keep], color=s["color"], alpha=0.15, linewidth=0)
    for part, ax in axes.items():
        ax.set_xlabel(xlabel)
        ax.set_title(part)
    return _finish(plt, fig, axes, style, title, results, path)


def memory_pareto(results: dict, path: Path) -> Path:
    """Final accuracy against client peak memory per run, the Pareto front highlighted."""
    plt, fig, axes = _panels(results)
    style = styles(results["runs"])
    for part, ax in axes.items():
        runs = [r for r in results["runs"] if r["partition"] == part]
        points = [(r["mean"]["client_peak_memory"] / 1e6, r["mean"]["final_test_accuracy"]) for r in runs]
        for r, (m, a) in zip(runs, points):
            s = style[label(r)]
            ax.errorbar(m, a, yerr=r["std"].get("final_test_accuracy", 0.0), color=s["color"], marker=s["marker"],
                        markersize=7, capsize=2, linestyle="none")
        front = pareto_front(points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="black", linewidth=1.2,
                drawstyle="steps-post", zorder=0, label="Pareto front")
        for rank, i in enumerate(front):  # the last (heaviest) label above and left of its point, inside the panel
            last = rank == len(front) - 1 and rank > 0
            ax.annotate(label(runs[i]), points[i], textcoords="offset points", xytext=(-4, 9) if last else (6, -11),
                        ha="right" if last else "left", fontsize=7)
        ax.set_xlabel("client peak memory of a training step (MB, measured, log scale)")
        ax.set_title(f"{part} (black: Pareto front)")
    return _finish(plt, fig, axes, style, "Final test accuracy against client memory", results, path)


def render(results: dict, out: Path) -> list[Path]:
    """Every figure of :data:`FIGURES` for ``results`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    by_bytes, by_flops, pareto = (out / f for f in FIGURES)
    return [accuracy_curves(results, "cumulative_bytes_by_round", 1e6, "cumulative MB exchanged, down + up (log scale)",
                            "Test accuracy against bytes exchanged", by_bytes),
            accuracy_curves(results, "cumulative_flops_by_round", 1e9,
                            "cumulative counted training GFLOPs, all clients (log scale)",
                            "Test accuracy against training compute", by_flops),
            memory_pareto(results, pareto)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", type=Path, default=report.RESULTS / "leaderboard.json")
    p.add_argument("--out", type=Path, help="directory of the figures (default: the results file's)")
    args = p.parse_args(argv)
    written = render(json.loads(args.results.read_text()), args.out or args.results.parent)
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
