"""README tables regenerated from committed results files (never typed by hand).

``python -m benchmarks.report`` rewrites every table whose results file exists. A table sits in
README.md between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``. Sweep results
(benchmarks/sweep.py) hold per run ``mean`` and ``std`` over seeds; tables show mean +- std.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def _swept(results: dict) -> bool:
    """Whether results are in the shape benchmarks/sweep.py writes (per run: per_seed, mean, std)."""
    return all("mean" in r for r in results["runs"])


def pm(run: dict, key: str, fmt: str = "{:.4f}") -> str:
    """A run's mean of ``key`` +- its std over seeds (the mean alone with one seed; n/a if absent)."""
    if key not in run["mean"]:
        return "n/a"
    std = f" +- {fmt.replace('+', '').format(run['std'][key])}" if key in run["std"] else ""
    return fmt.format(run["mean"][key]) + std


def total_note(results: dict) -> str:
    """``Total N min`` of the runs made, and how many ``--reuse`` took from an earlier invocation."""
    reused = results.get("reused_runs")
    return (f"Total {results['total_seconds'] / 60:.0f} min"
            + (f" (and {reused} runs of an earlier invocation, --reuse)" if reused else ""))


def seeds_note(results: dict) -> str:
    seeds = results["seeds"]
    if len(seeds) < 2:
        return ""
    return (f" Mean +- sample std (ddof=1) over seeds {', '.join(map(str, seeds))}; differences and ratios to "
            "dense FedAvg are taken per seed, against the FedAvg run of the same seed, then averaged.")


def baselines_table(results: dict) -> str | None:
    """The baselines benchmark: one row per run, each cost also as a ratio to dense FedAvg (None for
    results from before benchmarks/sweep.py)."""
    if not _swept(results):
        return None
    head = ("| method | density (target / real) | values | test acc | acc - dense (points) | MB down / round | "
            "MB up / round | all bytes / dense | round after the cut / dense | setup MB | "
            "train GFLOPs / round (ratio) | client peak MB (ratio) | wall s (ratio) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results["runs"]:
        m = r["mean"]
        lines.append(
            f"| {r['method']} | {r['target_density']:.2f} / {m['density']:.3f} | {r['value_dtype']} | "
            f"{pm(r, 'final_test_accuracy')} | {pm(r, 'acc_minus_dense', '{:+.2f}')} | "
            f"{_mb(m['bytes_down_per_round'])} | {_mb(m['bytes_up_per_round'])} | "
            f"{pm(r, 'total_bytes_ratio', '{:.3f}')} | {pm(r, 'after_cut_bytes_ratio', '{:.3f}')} | "
            f"{_mb(m['setup_bytes'])} | {m['train_flops_per_round'] / 1e9:.1f} "
            f"({pm(r, 'train_flops_per_round_ratio', '{:.3f}')}) | {m['client_peak_memory'] / 1e6:.1f} "
            f"({pm(r, 'client_peak_memory_ratio', '{:.3f}')}) | "
            f"{m['wall_seconds']:.0f} ({pm(r, 'wall_seconds_ratio', '{:.3f}')}) |")
    lines.append("")
    lines.append(
        f"Setting: {results['setting']['description']}{seeds_note(results)} MB / round: all bytes of a "
        "training round (every purpose), down and up, mean over rounds 1..N; all bytes / dense: the whole run, "
        "round 0 included; round after the cut / dense: the last round's train + mask bytes (down + up, after "
        "the final cut, the mask sent only to nodes that lack it) against dense FedAvg's; setup: round 0 (e.g. "
        f"SNIP's scoring round). {total_note(results)}. Command: `{results['command']}`.")
    return "\n".join(lines)


def codec_table(results: dict) -> str:
    lines = ["| density | values | measured bits/param | H(d) + d x value bits | measured / (bound + headers) "
             "| per-tensor bound ratio |", "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['density']} | {row['value_dtype']} | {row['measured_bpp']:.3f} | "
                     f"{row['bound_bpp']:.3f} | {row['ratio_vs_bound_plus_headers']:.3f} | "
                     f"{row['ratio_vs_per_tensor_bound_plus_headers']:.3f} |")
    lines.append("")
    lines.append(f"Model: {results['model']}, {results['masked_params']} masked parameters, global magnitude "
                 f"masks; headers {results['header_bytes_per_tensor']} bytes per tensor. Command: "
                 f"`{results['command']}`.")
    return "\n".join(lines)


def _fedlp_legacy(results: dict) -> dict:
    """Old format: fedlp.json as written before benchmarks/sweep.py (one seed, flat rows, one seed's
    levels), put in the sweep's shape so that one renderer serves both."""
    from benchmarks import fedlp, sweep

    seed = results["setting"]["seed"]
    labels = ("name", "key", "scheme", "method", "p", "flag")
    specs = [{**{k: r[k] for k in labels if k in r}, "reference": f"fedavg-{r['scheme']}"} for r in results["runs"]]
    rows = {(r["name"], seed): {**r, "seed": seed} for r in results["runs"]}
    return {**results, "seeds": [seed], "levels_of_partitions": {str(seed): results["levels_of_partitions"]},
            "runs": sweep.aggregate(specs, rows, fedlp.compare)}


def fedlp_table(results: dict) -> str:
    """FedLP against dense FedAvg: one row per method setting with its IID and Dirichlet runs,
    the communication model next to the paper's column and the measured bytes; then per level."""
    if not _swept(results):
        results = _fedlp_legacy(results)
    runs = {r["name"]: r for r in results["runs"]}
    model, paper = results["communication_model"], results["paper_comm_k"]
    keys = list(dict.fromkeys(r["key"] for r in results["runs"]))
    label = {"fedavg": "dense FedAvg"}
    for key in keys:
        if key.startswith("homo-"):
            label[key] = f"FedLP-Homo p={key[5:]}"
        elif key.startswith("hetero-"):
            label[key] = f"FedLP-Hetero flag {key[7:]}"
    lines = [
        "| method | test acc IID | vs FedAvg | test acc Dir(0.5) | vs FedAvg | client val acc, own sub-model (IID / Dir) "
        "| k params / client-round: model, CIFAR shape (paper) | model, this shape | counted (these runs) "
        "| measured bytes / (4 x counted) | train MFLOPs / example | client peak MB | wall s IID / Dir (ratio) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def acc(key: str, scheme: str) -> tuple[str, str]:
        r = runs.get(f"{key}-{scheme}")
        if r is None:
            return "n/a", "n/a"
        return pm(r, "final_test_accuracy"), "" if key == "fedavg" else pm(r, "acc_minus_dense", "{:+.2f}")

    def mean(both: list[dict], field: str) -> float:
        return sum(r["mean"][field] for r in both) / len(both)

    for key in keys:
        both = [runs[f"{key}-{s}"] for s in ("iid", "dirichlet") if f"{key}-{s}" in runs]
        a_iid, d_iid = acc(key, "iid")
        a_dir, d_dir = acc(key, "dirichlet")
        val = " / ".join(pm(r, "final_val_accuracy") if "final_val_accuracy" in r["mean"] else "-"
                         for r in both) if key.startswith("hetero") else "-"
        counted = mean(both, "counted_params_per_client_round")
        measured = mean(both, "bytes_down_per_client_round") + mean(both, "bytes_up_per_client_round")
        walls = " / ".join(f"{r['mean']['wall_seconds']:.0f} ({pm(r, 'wall_ratio', '{:.3f}')})"
                           for r in both if "wall_ratio" in r["mean"])
        lines.append(
            f"| {label[key]} | {a_iid} | {d_iid} | {a_dir} | {d_dir} | {val} | "
            f"{model['cifar10'][key] / 1e3:.2f} ({paper[key]:.2f}) | {model['fashion-mnist'][key] / 1e3:.2f} | "
            f"{counted / 1e3:.2f} | {measured / (4 * counted):.4f} | "
            f"{mean(both, 'train_flops_per_example') / 1e6:.1f} | "
            f"{max(r['mean']['client_peak_memory'] for r in both) / 1e6:.1f} | {walls} |")
    levels = list(results["levels_of_partitions"].values())  # per seed: flag -> level of each partition
    flags = list(levels[0])
    lines += ["", "| level | shared params | private params | train MFLOPs / example | peak MB of one Adam step "
              "(batch 32) | partitions at this level, flag " + " / ".join(flags)
              + (", mean over seeds" if len(levels) > 1 else "") + " |", "|---|---|---|---|---|---|"]
    for row in results["level_costs"]:
        c = row["level"]
        counts = " / ".join(f"{sum(sum(1 for x in v[f] if x == c) for v in levels) / len(levels):.3g}" for f in flags)
        lines.append(f"| {c} | {row['shared_params']} | {row['private_params']} | "
                     f"{row['train_flops_per_example'] / 1e6:.1f} | {row['peak_memory'] / 1e6:.1f} | {counts} |")
    s = results["setting"]
    lines.append("")
    lines.append(
        f"Setting: {s['description']}{seeds_note(results)} Accuracy: the final round's central test accuracy "
        "(Hetero: the level-5 global model). Communication in k parameters per client and round, down + up: the "
        "model is the expectation (BatchNorm buffers excluded, as in the paper); counted = what these runs' draws "
        "and levels exchanged (buffers included); measured = the serialized message bytes. FLOPs are counted "
        f"(forward + backward), per training example, averaged over both runs. {total_note(results)}. "
        f"Command: `{results['command']}`.")
    return "\n".join(lines)


def method_table(module: str) -> Callable[[dict], str | None]:
    """The ``table(results)`` of a method's benchmark module, imported when rendered (the
    benchmarks import this module)."""
    return lambda results: importlib.import_module(module).table(results)


TABLES: dict[str, tuple[str, Callable[[dict], str | None]]] = {
    "fedlp": ("fedlp.json", fedlp_table),
    "baselines": ("baselines.json", baselines_table),
    "codec": ("codec_bits.json", codec_table),
    "fedtiny": ("fedtiny.json", method_table("benchmarks.fedtiny")),
    "feddp": ("feddp.json", method_table("benchmarks.feddp")),
    "autoflip": ("autoflip.json", method_table("benchmarks.autoflip")),
    "ntk_zo": ("ntk_zo.json", method_table("benchmarks.ntk_zo")),
    "leaderboard": ("leaderboard.json", method_table("benchmarks.leaderboard")),
    "scale": ("scale.json", method_table("benchmarks.scale")),
    "cpu_paths": ("cpu_paths.json", method_table("benchmarks.cpu_paths")),
    "zo_lr": ("zo_lr.json", method_table("benchmarks.zo_lr")),
}


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"README.md has no <!-- table:{name} --> ... <!-- /table:{name} --> section")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def update_readme(names: list[str] | None = None) -> None:
    """Rewrite the tables (all, or ``names``); a renderer that returns None leaves its table as it is."""
    text = README.read_text()
    for name, (file, render) in TABLES.items():
        if (names is None or name in names) and (RESULTS / file).is_file() and f"<!-- table:{name} -->" in text:
            body = render(json.loads((RESULTS / file).read_text()))
            if body is None:
                print(f"README table {name}: {RESULTS / file} is in the format from before benchmarks/sweep.py; "
                      f"table left as it is (rerun python -m benchmarks.{name})")
                continue
            text = replace_section(text, name, body)
    README.write_text(text)


if __name__ == "__main__":
    update_readme()
    if (RESULTS / "leaderboard.json").is_file():
        from benchmarks import plots  # imports this module

        plots.main([])
