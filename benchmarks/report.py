"""README tables regenerated from committed results files (never typed by hand).

``python -m benchmarks.report`` rewrites every table whose results file exists. A table sits in
README.md between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def _ratio(x: float, dense: float) -> str:
    return f"{x / dense:.3f}" if dense else "n/a"


def baselines_table(results: dict) -> str:
    """The baselines benchmark: one row per run, each cost also as a ratio to dense FedAvg."""
    rows = results["runs"]
    dense = next(r for r in rows if r["method"] == "fedavg")
    head = ("| method | density (target / real) | values | test acc | acc - dense | MB down / round | "
            "MB up / round | last round (down+up) / dense | setup MB | train GFLOPs / round (ratio) | "
            "client peak MB (ratio) | wall s (ratio) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        last = r["last_round_bytes_down"] + r["last_round_bytes_up"]
        dense_last = dense["last_round_bytes_down"] + dense["last_round_bytes_up"]
        lines.append(
            f"| {r['method']} | {r['target_density']:.2f} / {r['density']:.3f} | {r['value_dtype']} | "
            f"{r['final_test_accuracy']:.4f} | {100 * (r['final_test_accuracy'] - dense['final_test_accuracy']):+.2f} | "
            f"{_mb(r['bytes_down_per_round'])} | {_mb(r['bytes_up_per_round'])} | {_ratio(last, dense_last)} | "
            f"{_mb(r['setup_bytes'])} | {r['train_flops_per_round'] / 1e9:.1f} "
            f"({_ratio(r['train_flops_per_round'], dense['train_flops_per_round'])}) | "
            f"{r['client_peak_memory'] / 1e6:.1f} ({_ratio(r['client_peak_memory'], dense['client_peak_memory'])}) | "
            f"{r['wall_seconds']:.0f} ({_ratio(r['wall_seconds'], dense['wall_seconds'])}) |")
    s = results["setting"]
    lines.append("")
    lines.append(f"Setting: {s['description']} Command: `{results['command']}`.")
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


def fedlp_table(results: dict) -> str:
    """FedLP against dense FedAvg: one row per method setting with its IID and Dirichlet runs,
    the communication model next to the paper's column and the measured bytes; then per level."""
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
    dense = {s: runs.get(f"fedavg-{s}") for s in ("iid", "dirichlet")}

    def acc(key: str, scheme: str) -> tuple[str, str]:
        r, d = runs.get(f"{key}-{scheme}"), dense[scheme]
        if r is None:
            return "n/a", "n/a"
        delta = f"{100 * (r['final_test_accuracy'] - d['final_test_accuracy']):+.2f}" if d and key != "fedavg" else ""
        return f"{r['final_test_accuracy']:.4f}", delta

    for key in keys:
        both = [runs[f"{key}-{s}"] for s in ("iid", "dirichlet") if f"{key}-{s}" in runs]
        a_iid, d_iid = acc(key, "iid")
        a_dir, d_dir = acc(key, "dirichlet")
        val = " / ".join(f"{r['final_val_accuracy']:.4f}" if r.get("final_val_accuracy") is not None else "-"
                         for r in both) if key.startswith("hetero") else "-"
        counted = sum(r["counted_params_per_client_round"] for r in both) / len(both)
        measured = sum(r["bytes_down_per_client_round"] + r["bytes_up_per_client_round"] for r in both) / len(both)
        walls = " / ".join(
            f"{r['wall_seconds']:.0f} ({_ratio(r['wall_seconds'], dense[r['scheme']]['wall_seconds'])})"
            for r in both if dense.get(r["scheme"]))
        lines.append(
            f"| {label[key]} | {a_iid} | {d_iid} | {a_dir} | {d_dir} | {val} | "
            f"{model['cifar10'][key] / 1e3:.2f} ({paper[key]:.2f}) | {model['fashion-mnist'][key] / 1e3:.2f} | "
            f"{counted / 1e3:.2f} | {measured / (4 * counted):.4f} | "
            f"{sum(r['train_flops_per_example'] for r in both) / len(both) / 1e6:.1f} | "
            f"{max(r['client_peak_memory'] for r in both) / 1e6:.1f} | {walls} |")
    levels = results["levels_of_partitions"]
    lines += ["", "| level | shared params | private params | train MFLOPs / example | peak MB of one Adam step "
              "(batch 32) | partitions at this level, flag " + " / ".join(levels) + " |",
              "|---|---|---|---|---|---|"]
    for row in results["level_costs"]:
        c = row["level"]
        counts = " / ".join(str(sum(1 for x in v if x == c)) for v in levels.values())
        lines.append(f"| {c} | {row['shared_params']} | {row['private_params']} | "
                     f"{row['train_flops_per_example'] / 1e6:.1f} | {row['peak_memory'] / 1e6:.1f} | {counts} |")
    s = results["setting"]
    lines.append("")
    lines.append(
        f"Setting: {s['description']} Accuracy: the final round's central test accuracy (Hetero: the "
        "level-5 global model). Communication in k parameters per client and round, down + up: the model "
        "is the expectation (BatchNorm buffers excluded, as in the paper); counted = what these runs' draws "
        "and levels exchanged (buffers included); measured = the serialized message bytes. FLOPs are counted "
        "(forward + backward), per training example, averaged over both runs. Total "
        f"{results['total_seconds'] / 60:.0f} min. Command: `{results['command']}`.")
    return "\n".join(lines)


TABLES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "fedlp": ("fedlp.json", fedlp_table),
    "baselines": ("baselines.json", baselines_table),
    "codec": ("codec_bits.json", codec_table),
}


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"README.md has no <!-- table:{name} --> ... <!-- /table:{name} --> section")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def update_readme(names: list[str] | None = None) -> None:
    text = README.read_text()
    for name, (file, render) in TABLES.items():
        if (names is None or name in names) and (RESULTS / file).is_file() and f"<!-- table:{name} -->" in text:
            text = replace_section(text, name, render(json.loads((RESULTS / file).read_text())))
    README.write_text(text)


if __name__ == "__main__":
    update_readme()
