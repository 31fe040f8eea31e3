"""What every client routine works with: the node (experiment, partition, data), the model and mask
the server sent, the node's own costs, and replies.

Per-node state lives in ``context.state`` (never in module globals: in deployment each message may
be served by a fresh process). The state holds the node's current mask and its version; a node that
lost it (a restart) answers :data:`~fedprune.protocol.STATE_LOST` and the server sends the mask again.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedprune import protocol
from fedprune.experiment import Experiment, experiment_from_run_config
from fedprune.task import client_data, maskable_names, new_model
from pruning.accounting import count_flops, training_step_memory

MASK_KEY = "mask"
MASK_META_KEY = "mask-meta"


class StateLost(RuntimeError):
    """The server assumed this node holds state (a mask version) that it does not hold."""


@dataclasses.dataclass
class Node:
    """This node: the experiment, its partition and its data."""

    experiment: Experiment
    partition_id: int
    num_partitions: int

    def data(self):
        """(train_x, train_y, val_x, val_y) of this node's partition."""
        return client_data(self.experiment.dataset, self.experiment.partition, self.partition_id,
                           self.num_partitions)


def node_of(context: Context) -> Node:
    """The node a message is served on, from the run config and the node config.

    Node config: ``partition-id`` and ``num-partitions`` (set by the simulation, given with
    ``--node-config`` in deployment), optionally ``num-threads`` (torch threads, default 1) and
    ``data-root`` (a directory with this node's copy of the dataset).
    """
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
    if not 0 <= pid < num:
        raise ValueError(f"node config partition-id: got {pid}; allowed: 0..{num - 1} (num-partitions={num})")
    return Node(experiment, pid, num)


def stored_mask(context: Context) -> tuple[dict[str, np.ndarray] | None, int]:
    """The mask this node holds and its version (None, 0 when it holds none)."""
    if MASK_KEY not in context.state:
        return None, 0
    masks = {k: v.numpy() for k, v in context.state[MASK_KEY].items()}
    return masks, int(context.state[MASK_META_KEY]["version"])


def receive(msg: Message, context: Context, node: Node) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None]:
    """The model the server sent, and the mask to train it under.

    A message with a ``mask`` record installs it in the node's state; otherwise the node must hold
    the version the config names (0: dense), or :class:`StateLost` is raised.
    """
    version = int(msg.content[protocol.CONFIG].get(protocol.MASK_VERSION, 0))
    model = new_model(node.experiment)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    if protocol.MASK in msg.content:
        names = maskable_names(node.experiment, model)
        masks = protocol.unpack_masks(msg.content[protocol.MASK], {k: state[k].shape for k in names}, partial=True)
        context.state[MASK_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in masks.items()})
        context.state[MASK_META_KEY] = ConfigRecord({"version": version})
    else:
        masks, held = stored_mask(context) if version else (None, 0)
        if version and held != version:
            raise StateLost(f"the server assumed this node holds mask version {version}, it holds "
                            f"{held or 'none'}")
    arrays = protocol.unpack(msg.content[protocol.ARRAYS], protocol.expected_of(state), masks)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    return model, None if masks is None else {k: torch.from_numpy(v) for k, v in masks.items()}


_FLOPS_CACHE: dict[tuple, float] = {}
"""Training FLOPs per sample by (model, architecture key, input shape, kept weights per layer):
counting runs the model under torch's FlopCounterMode, which costs as much as a second of
training; the count only depends on this key. A cache, not state: losing it costs time, never a
result."""


def training_costs(model: torch.nn.Module, masks, x: torch.Tensor, y: torch.Tensor, node: Node,
                   arch: object = None) -> dict:
    """Counted training FLOPs of this round's local work and the measured peak of one step.

    ``arch`` tells apart sub-models that share the experiment's model name (e.g. FedLP levels).
    """
    c = node.experiment.client
    key = (node.experiment.model.name, arch, tuple(x.shape[1:]),
           tuple(sorted((k, int(m.sum())) for k, m in (masks or {}).items())))
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = count_flops(model, x[:1], masks, training=True).effective
    batch = (x[: c.batch_size].clone(), y[: c.batch_size].clone())  # a slice's storage is the whole set's
    memory = training_step_memory(
        model, torch.nn.functional.cross_entropy, batch, masks=masks,
        optimizer_factory=None if c.optimizer == "sgd" else (lambda p: torch.optim.Adam(p, lr=c.lr)),
    )
    return {protocol.FLOPS: float(_FLOPS_CACHE[key] * len(x) * c.local_epochs),
            protocol.PEAK_MEMORY: float(memory.peak)}


def reply(msg: Message, node: Node, num_examples: int, records: dict | None = None, **metrics) -> Message:
    """A reply with ``records`` (e.g. ``{"arrays": ...}``) and the metrics every reply carries:
    num-examples, partition-id and the mask version the node worked under."""
    config = msg.content[protocol.CONFIG]
    m = MetricRecord({protocol.NUM_EXAMPLES: int(num_examples), protocol.PARTITION_ID: node.partition_id,
                      protocol.MASK_VERSION: int(config.get(protocol.MASK_VERSION, 0)), **metrics})
    return Message(RecordDict({**(records or {}), protocol.METRICS: m}), reply_to=msg)


def value_dtype(msg: Message) -> str:
    return str(msg.content[protocol.CONFIG].get(protocol.VALUE_DTYPE, "float32"))
