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


TABLES: dict[str, tuple[str, Callable[[dict], str]]] = {
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
