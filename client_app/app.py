"""fedprune ClientApp.

Every handler rebuilds what it needs from the run config (the experiment) and the node config;
per-node state lives in ``context.state`` (never in module globals: in deployment each message may
be served by a fresh process). The state holds the node's current mask and its version.

Node config keys: ``partition-id`` and ``num-partitions`` (set by the simulation, given with
``--node-config`` in deployment), optionally ``num-threads`` (torch threads, default 1) and
``data-root`` (a directory with this node's copy of the dataset).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.fedlp import ROUTINES as FEDLP_ROUTINES
from fedprune.experiment import Experiment, experiment_from_run_config
from fedprune.seeding import torch_generator
from fedprune.task import client_data, maskable_names, new_model
from fedprune.training import batches, evaluate, train
from pruning.accounting import count_flops, training_step_memory
from pruning.masks import apply_masks, mask_gradients
from pruning.scores import snip_scores
from strategies.transport import pack, unpack

app = ClientApp()

ROUTINES = {**FEDLP_ROUTINES}
"""Method routines a message selects with ``config["routine"]``: name -> {"train" / "evaluate":
fn(msg, context, local, training_costs)}; a kind a routine lacks falls back to the handler below."""

MASK_KEY = "mask"
MASK_META_KEY = "mask-meta"


@dataclasses.dataclass
class Local:
    """What a handler works with: the experiment, this node's partition and data."""

    experiment: Experiment
    partition_id: int
    num_partitions: int

    def data(self):
        return client_data(self.experiment.dataset, self.experiment.partition, self.partition_id,
                           self.num_partitions)


def _local(context: Context) -> Local:
    torch.set_num_threads(int(context.node_config.get("num-threads", 1)))
    experiment = experiment_from_run_config(context.run_config)
    if "data-root" in context.node_config:
        experiment = dataclasses.replace(
            experiment, dataset=dataclasses.replace(experiment.dataset, root=str(context.node_config["data-root"])))
    try:
        pid = int(context.node_config["partition-id"])
        num = int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ValueError(f"node config needs partition-id and num-partitions (got "
                         f"{dict(context.node_config)}); set them with --node-config") from exc
    return Local(experiment, pid, num)


def _stored_mask(context: Context) -> tuple[dict[str, np.ndarray] | None, int]:
    if MASK_KEY not in context.state:
        return None, 0
    masks = {k: v.numpy() for k, v in context.state[MASK_KEY].items()}
    return masks, int(context.state[MASK_META_KEY]["version"])


def receive(msg: Message, context: Context, local: Local) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None]:
    """The model the server sent, and the mask to train it under (stored in the node's state)."""
    config = msg.content["config"]
    version = int(config.get("mask-version", 0))
    model = new_model(local.experiment)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if bool(config.get("mask-sent", False)):
        arrays, masks = unpack(msg.content["arrays"], None, shapes, frozenset(maskable_names(local.experiment, model)))
        context.state[MASK_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in masks.items()})
        context.state[MASK_META_KEY] = ConfigRecord({"version": version})
    else:
        masks, held = _stored_mask(context) if version else (None, 0)
        if version and held != version:
            raise ValueError(f"the server assumed this node holds mask version {version}, it holds {held}")
        arrays, _ = unpack(msg.content["arrays"], masks, shapes)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    return model, None if masks is None else {k: torch.from_numpy(np.array(v)) for k, v in masks.items()}


_FLOPS_CACHE: dict[tuple, float] = {}
"""Training FLOPs per sample by (model, input shape, kept weights per layer): counting runs the
model under torch's FlopCounterMode, which costs as much as a second of training; the count only
depends on this key. A cache, not state: losing it costs time, never a result."""


def training_costs(model: torch.nn.Module, masks, x: torch.Tensor, y: torch.Tensor, local: Local) -> dict:
    """Counted training FLOPs of this round's local work and the measured peak of one step."""
    c = local.experiment.client
    key = (local.experiment.model.name, tuple(x.shape[1:]),
           tuple(sorted((k, int(m.sum())) for k, m in (masks or {}).items())))
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = count_flops(model, x[:1], masks, training=True).effective
    per_sample = _FLOPS_CACHE[key]
    memory = training_step_memory(
        model, torch.nn.functional.cross_entropy, (x[: c.batch_size], y[: c.batch_size]), masks=masks,
        optimizer_factory=None if c.optimizer == "sgd" else (lambda p: torch.optim.Adam(p, lr=c.lr)),
    )
    return {"flops": float(per_sample * len(x) * c.local_epochs), "peak-memory": float(memory.peak)}


def _routine(msg: Message, kind: str):
    name = str(msg.content["config"].get("routine", ""))
    if name and name not in ROUTINES:
        raise ValueError(f"config['routine']: got {name!r}; allowed: {', '.join(ROUTINES)}")
    return ROUTINES.get(name, {}).get(kind)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds and how much data it has."""
    local = _local(context)
    train_x, _, val_x, _ = local.data()
    metrics = MetricRecord({"partition-id": local.partition_id, "num-train": len(train_x), "num-val": len(val_x)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Local (masked) training of the received model on this node's train split."""
    local = _local(context)
    if (routine := _routine(msg, "train")) is not None:
        return routine(msg, context, local, training_costs)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    x, y, _, _ = local.data()
    model, masks = receive(msg, context, local)
    costs = training_costs(model, masks, x, y, local)
    start = time.process_time()
    loss = train(model, x, y, local.experiment.client,
                 torch_generator(local.experiment.seed, "train", server_round, local.partition_id),
                 after_backward=(lambda m: mask_gradients(m, masks)) if masks else None,
                 after_step=(lambda m: apply_masks(m, masks)) if masks else None)
    metrics = MetricRecord({
        "num-examples": len(x), "partition-id": local.partition_id, "loss": loss,
        "compute-seconds": time.process_time() - start, "mask-version": int(config.get("mask-version", 0)),
        **costs,
    })
    arrays = pack(model.state_dict(), masks, receiver_has_mask=True, value_dtype=str(config.get("value-dtype", "float32")))
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received (masked) model on this node's validation split."""
    local = _local(context)
    if (routine := _routine(msg, "evaluate")) is not None:
        return routine(msg, context, local, training_costs)
    _, _, x, y = local.data()
    model, _ = receive(msg, context, local)
    loss, acc = evaluate(model, x, y, local.experiment.evaluation.batch_size)
    metrics = MetricRecord({"num-examples": len(x), "partition-id": local.partition_id, "loss": loss,
                            "accuracy": acc, "mask-version": int(msg.content["config"].get("mask-version", 0))})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query("snip")
def snip_handler(msg: Message, context: Context) -> Message:
    """SNIP saliency |g * w| of the received dense model on a few local batches (Lee et al. 2019)."""
    local = _local(context)
    x, y, _, _ = local.data()
    model, _ = receive(msg, context, local)
    cfg = local.experiment
    order = batches(len(x), cfg.client.batch_size, torch_generator(cfg.seed, "snip", local.partition_id))
    chosen = order[: cfg.pruning.score_batches]
    scores = snip_scores(model, torch.nn.functional.cross_entropy, [(x[i], y[i]) for i in chosen],
                         maskable_names(cfg, model))
    metrics = MetricRecord({"num-examples": int(sum(len(i) for i in chosen)), "partition-id": local.partition_id,
                            "mask-version": int(msg.content["config"].get("mask-version", 0))})
    return Message(RecordDict({"scores": pack({k: v.float() for k, v in scores.items()}), "metrics": metrics}),
                   reply_to=msg)
