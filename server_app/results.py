"""A run's directory: config.yaml, rounds.jsonl, summary.json, plots, the final model.

``outputs/<run-name>/`` by default. rounds.jsonl gets one JSON object per round as the round ends
(round 0 is the initial model); the console gets one line per round.
"""

from __future__ import annotations

import json
import math
from logging import INFO
from pathlib import Path

import torch
import yaml
from flwr.common.logger import log

from fedprune.experiment import Experiment

SUMMED = ("bytes_down", "bytes_up", "eval_bytes_down", "eval_bytes_up", "rejected_replies", "failed_replies",
          "train_flops")


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


class RunWriter:
    """Writes what a user reads after a run, as the run goes."""

    def __init__(self, directory: Path, experiment: Experiment) -> None:
        self.dir = directory
        self.experiment = experiment
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(experiment.to_dict(), sort_keys=False))
        self.rounds_file = self.dir / "rounds.jsonl"
        self.rounds_file.write_text("")
        self.records: list[dict] = []
        log(INFO, "fedprune: %s (%s, seed %d) -> %s", experiment.name, experiment.method,
            experiment.seed, self.dir)

    def record_round(self, record: dict) -> None:
        self.records.append(record)
        with self.rounds_file.open("a") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
        log(INFO, "round %d/%d  test acc %.4f  loss %.4f  density %.3f  down %s  up %s  elapsed %.1f s",
            record["round"], self.experiment.num_server_rounds, record.get("test_accuracy", math.nan),
            record.get("test_loss", math.nan), record.get("density", 1.0), _mb(record["bytes_down"]),
            _mb(record["bytes_up"]), record["wall_seconds"])

    def finish(self, final_state: dict[str, torch.Tensor] | None = None) -> dict:
        last = self.records[-1]
        summary = {
            "name": self.experiment.name, "method": self.experiment.method, "seed": self.experiment.seed,
            "rounds": last["round"],
            "final_test_accuracy": last.get("test_accuracy"), "final_test_loss": last.get("test_loss"),
            "best_test_accuracy": max(r.get("test_accuracy", -1.0) for r in self.records),
            **{f"total_{k}": sum(int(r.get(k, 0)) for r in self.records) for k in SUMMED},
            "final_density": last.get("density", 1.0),
            "max_client_peak_memory": max((r.get("train_peak_memory", 0) for r in self.records), default=0),
            "wall_seconds": last["wall_seconds"],
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if final_state is not None:
            torch.save(final_state, self.dir / "final_model.pt")
        plot_run(self.records, self.dir, self.experiment.name)
        log(INFO, "fedprune: final test accuracy %.4f after %d rounds, %s down, %s up, %.1f s; results in %s",
            summary["final_test_accuracy"], summary["rounds"], _mb(summary["total_bytes_down"]),
            _mb(summary["total_bytes_up"]), summary["wall_seconds"], self.dir)
        return summary


def plot_run(records: list[dict], directory: Path, title: str) -> None:
    """accuracy_vs_round.png and accuracy_vs_bytes.png (cumulative bytes down + up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    acc = [r.get("test_accuracy", math.nan) for r in records]
    cumulative, total = [], 0
    for r in records:
        total += r["bytes_down"] + r["bytes_up"]
        cumulative.append(total / 1e6)
    for name, xs, xlabel in (("accuracy_vs_round", rounds, "round"),
                             ("accuracy_vs_bytes", cumulative, "cumulative MB (down + up)")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(xs, acc, marker="o")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(directory / f"{name}.png", dpi=100)
        plt.close(fig)
