"""A run's directory: config.yaml, rounds.jsonl, checkpoint.pt, summary.json, plots, the final model and mask.

``outputs/<run-name>/`` by default. rounds.jsonl gets one JSON object per round as the round ends
(round 0 is the initial model); the console gets one line per round. checkpoint.pt holds the
strategy's whole state after the last finished round, replaced atomically; :meth:`RunWriter.resume`
continues a run from it. A finished run also holds final_model.pt (the global state dict) and
final_masks.pt (the global mask, name -> bool tensor; empty for a dense model), which
``python -m fedprune.export`` reads.
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
from fedprune.files import write_atomically

SUMMED = ("rejected_replies", "failed_replies", "train_flops")
"""Round fields summed into the summary, besides every ``bytes_*`` field."""
CHECKPOINT = "checkpoint.pt"
FINAL_MODEL, FINAL_MASKS = "final_model.pt", "final_masks.pt"


class ResumeError(ValueError):
    """A run directory that cannot be resumed with this experiment; says why."""


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


class RunWriter:
    """Writes what a user reads after a run, as the run goes."""

    def __init__(self, directory: Path, experiment: Experiment, records: list[dict] | None = None) -> None:
        self.dir = directory
        self.experiment = experiment
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(experiment.to_dict(), sort_keys=False))
        self.rounds_file = self.dir / "rounds.jsonl"
        self.records: list[dict] = list(records or [])
        write_atomically(self.rounds_file, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in self.records)))
        log(INFO, "fedprune: %s (%s, seed %d) -> %s", experiment.name, experiment.method,
            experiment.seed, self.dir)

    @classmethod
    def resume(cls, directory: Path, experiment: Experiment) -> tuple[RunWriter, dict]:
        """The writer of an interrupted run and its last checkpoint (rounds after it are dropped).

        The experiment must be the run's own; only ``num_server_rounds`` may differ (not below the
        checkpoint's round)."""
        checkpoint = directory / CHECKPOINT
        if not checkpoint.is_file():
            raise ResumeError(f"resume: {directory} has no {CHECKPOINT} (a run writes one after each round)")
        before = yaml.safe_load((directory / "config.yaml").read_text())
        now = experiment.to_dict()
        changed = sorted(k for k in set(before) | set(now) if k != "num_server_rounds" and before.get(k) != now.get(k))
        if changed:
            raise ResumeError(f"resume: the experiment differs from the run's in {', '.join(changed)}; "
                              "resume with the same experiment (only num_server_rounds may change)")
        state = torch.load(checkpoint, weights_only=True)
        if state["round"] > experiment.num_server_rounds:
            raise ResumeError(f"resume: the checkpoint is at round {state['round']}, beyond num_server_rounds "
                              f"{experiment.num_server_rounds}")
        records = [json.loads(line) for line in (directory / "rounds.jsonl").read_text().splitlines() if line]
        log(INFO, "fedprune: resuming %s after round %d", directory, state["round"])
        return cls(directory, experiment, [r for r in records if r["round"] <= state["round"]]), state

    def checkpoint(self, state: dict) -> None:
        """Replace the run's checkpoint with ``state`` (atomically: a kill leaves the old or the new one)."""
        write_atomically(self.dir / CHECKPOINT, lambda p: torch.save(state, p))

    def fail(self, reason: str) -> None:
        """Record in summary.json that the run failed, and why."""
        summary = {"name": self.experiment.name, "method": self.experiment.method, "seed": self.experiment.seed,
                   "status": "failed", "error": reason,
                   "rounds": self.records[-1]["round"] if self.records else None}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def record_round(self, record: dict) -> None:
        self.records.append(record)
        with self.rounds_file.open("a") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
        done, total = record["round"], self.experiment.num_server_rounds
        trained = [r["round_seconds"] for r in self.records if r["round"] >= 1]  # round 0 is setup, not a round
        eta = f"{(total - done) * sum(trained) / len(trained):.0f} s" if trained else "?"
        bar = "#" * (20 * done // max(total, 1))
        log(INFO, "round %d/%d [%-20s] test acc %.4f  loss %.4f  density %.3f  down %s  up %s  elapsed %.1f s  ETA %s",
            done, total, bar, record.get("test_accuracy", math.nan), record.get("test_loss", math.nan),
            record.get("density", 1.0), _mb(record["bytes_down"]), _mb(record["bytes_up"]), record["wall_seconds"], eta)

    def finish(self, final_state: dict[str, torch.Tensor] | None = None,
               final_masks: dict[str, torch.Tensor] | None = None) -> dict:
        last = self.records[-1]
        summary = {
            "name": self.experiment.name, "method": self.experiment.method, "seed": self.experiment.seed,
            "status": "completed", "rounds": last["round"],
            "final_test_accuracy": last.get("test_accuracy"), "final_test_loss": last.get("test_loss"),
            "best_test_accuracy": max(r.get("test_accuracy", -1.0) for r in self.records),
            **{f"total_{k}": sum(int(r.get(k, 0)) for r in self.records)
               for k in (*sorted({k for r in self.records for k in r if k.startswith("bytes_")}), *SUMMED)},
            "final_density": last.get("density", 1.0),
            "max_client_peak_memory": max((r.get("train_peak_memory", 0) for r in self.records), default=0),
            "wall_seconds": last["wall_seconds"],
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if final_state is not None:
            torch.save(final_state, self.dir / FINAL_MODEL)
            torch.save(final_masks or {}, self.dir / FINAL_MASKS)
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
                             ("accuracy_vs_bytes", cumulative, "cumulative MB, all messages (down + up)")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(xs, acc, marker="o")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(directory / f"{name}.png", dpi=100)
        plt.close(fig)
