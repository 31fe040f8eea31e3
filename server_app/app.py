"""fedprune ServerApp: experiment -> model, test data, strategy -> rounds -> results on disk.

Run config (pyproject [tool.flwr.app.config]): ``experiment`` (a YAML file, relative to the app),
``num-server-rounds`` and ``seed`` (0 / -1: the experiment's), ``overrides`` ("key=value ..."),
``run-name`` (default ``<name>-s<seed>-<time>``), ``output-dir`` (default ``outputs`` in the
working directory of the process that runs the ServerApp; give an absolute path to be sure),
``resume`` (a run directory: continue that run from its last checkpoint, with the same experiment;
``num-server-rounds`` may be raised).

A run that cannot go on (too few usable nodes, nothing trained) raises, so Flower reports it
``finished:failed``; its summary.json says why.
"""

from __future__ import annotations

import time
from logging import ERROR
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedprune.allocator import keep_freed_memory
from fedprune.experiment import Experiment, experiment_from_run_config
from fedprune.task import new_model, test_data
from fedprune.training import evaluate
from server_app.grid import PromptGrid
from server_app.results import RunWriter
from strategies import RunFailed, build_strategy

app = ServerApp()


def run_directory(run_config, name: str, seed: int) -> Path:
    base = Path(str(run_config.get("output-dir", "")) or "outputs").expanduser().resolve()
    run_name = str(run_config.get("run-name", "")) or f"{name}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    return base / run_name


@app.main()
def main(grid: Grid, context: Context) -> None:
    experiment = experiment_from_run_config(context.run_config)
    resume = str(context.run_config.get("resume", ""))
    if resume:
        writer, state = RunWriter.resume(Path(resume).expanduser().resolve(), experiment)
    else:
        writer, state = RunWriter(run_directory(context.run_config, experiment.name, experiment.seed), experiment), None
    run_experiment(PromptGrid(grid), experiment, writer, state)


def run_experiment(grid: Grid, experiment: Experiment, writer: RunWriter, resume: dict | None = None) -> dict:
    """Train ``experiment`` over ``grid``, writing every round and a checkpoint after each;
    ``resume`` continues from a checkpoint. Returns the run's summary."""
    keep_freed_memory()
    test_x, test_y = test_data(experiment.dataset.name, experiment.dataset.root)
    model = new_model(experiment)
    scratch = new_model(experiment)

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        scratch.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(scratch, test_x, test_y, experiment.evaluation.batch_size)
        return MetricRecord({"test_accuracy": acc, "test_loss": loss})

    strategy = build_strategy(experiment)
    try:
        strategy.start(grid, ArrayRecord(model.state_dict()), experiment.num_server_rounds,
                       evaluate_fn=central_evaluation, on_round=writer.record_round,
                       on_checkpoint=writer.checkpoint, resume=resume)
    except RunFailed as exc:
        log(ERROR, "fedprune: the run failed: %s", exc)
        writer.fail(str(exc))
        raise
    final = {k: torch.from_numpy(np.array(v)) for k, v in strategy.global_arrays.items()}
    masks = {k: torch.from_numpy(np.array(v)) for k, v in (strategy.masks or {}).items()}
    return writer.finish(final, masks)
