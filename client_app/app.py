"""fedprune ClientApp.

Every handler rebuilds what it needs from the run config (the experiment) and the node config
(``partition-id``, ``num-partitions``); nothing is kept in module globals except caches, because in
deployment each message may be served by a fresh process.

Node config keys: ``partition-id`` and ``num-partitions`` (set by the simulation, given with
``--node-config`` in deployment), optionally ``num-threads`` (torch threads, default 1) and
``data-root`` (this node's directory with the dataset files; overrides ``dataset.root``).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprune.experiment import Experiment, experiment_from_run_config
from fedprune.seeding import torch_generator
from fedprune.task import client_data, new_model
from fedprune.training import evaluate, train

app = ClientApp()


def _setup(context: Context) -> tuple[Experiment, int, int]:
    torch.set_num_threads(int(context.node_config.get("num-threads", 1)))
    experiment = experiment_from_run_config(context.run_config)
    if "data-root" in context.node_config:  # this node's own copy of the data (deployment)
        root = str(context.node_config["data-root"])
        experiment = dataclasses.replace(experiment, dataset=dataclasses.replace(experiment.dataset, root=root))
    try:
        pid = int(context.node_config["partition-id"])
        num = int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ValueError(f"node config needs partition-id and num-partitions (got "
                         f"{dict(context.node_config)}); set them with --node-config") from exc
    return experiment, pid, num


def _data(experiment: Experiment, pid: int, num: int):
    return client_data(experiment.dataset, experiment.partition, pid, num)


def _model(experiment: Experiment, msg: Message) -> torch.nn.Module:
    model = new_model(experiment)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds and how much data it has."""
    experiment, pid, num = _setup(context)
    train_x, _, val_x, _ = _data(experiment, pid, num)
    metrics = MetricRecord({"partition-id": pid, "num-train": len(train_x), "num-val": len(val_x)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Local training of the received model on this node's train split."""
    experiment, pid, num = _setup(context)
    server_round = int(msg.content["config"]["server-round"])
    x, y, _, _ = _data(experiment, pid, num)
    model = _model(experiment, msg)
    start = time.process_time()
    loss = train(model, x, y, experiment.client, torch_generator(experiment.seed, "train", server_round, pid))
    metrics = MetricRecord({
        "num-examples": len(x), "partition-id": pid, "loss": loss,
        "compute-seconds": time.process_time() - start,
    })
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received model on this node's validation split."""
    experiment, pid, num = _setup(context)
    _, _, x, y = _data(experiment, pid, num)
    model = _model(experiment, msg)
    loss, acc = evaluate(model, x, y, experiment.evaluation.batch_size)
    metrics = MetricRecord({"num-examples": len(x), "partition-id": pid, "loss": loss, "accuracy": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
