"""What every client routine works with: the node (experiment, partition, data), the model and mask
the server sent, the node's own costs, and replies.

Per-node state lives in ``context.state`` (never in module globals: in deployment each message may
be served by a fresh process). The state holds the node's current mask and its version; a node that
lost it (a restart) answers :data:`~fedprune.protocol.STATE_LOST` and the server sends the mask again.

What does not change within a run is cached, never stored as state: the parsed experiment per
process, the node's data per process and, with the node config's ``cache-dir``, on disk
(fedprune/task.py), so a fresh ClientApp process does not load the dataset or rebuild the plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedprune import protocol
from fedprune.allocator import keep_freed_memory
from fedprune.experiment import Experiment, experiment_from_run_config, resolve_path
from fedprune.files import write_atomically
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
    cache_dir: str | None = None

    def data(self):
        """(train_x, train_y, val_x, val_y) of this node's partition."""
        return client_data(self.experiment.dataset, self.experiment.partition, self.partition_id,
                           self.num_partitions, self.cache_dir)


@functools.lru_cache(maxsize=8)
def _experiment(run_config: tuple, mtime_ns: int) -> Experiment:
    return experiment_from_run_config(dict(run_config))


def experiment_of(run_config) -> Experiment:
    """The run's experiment, parsed once per process (again when its file changes)."""
    try:
        mtime = resolve_path(str(run_config.get("experiment", "configs/fedavg.yaml"))).stat().st_mtime_ns
    except OSError:
        mtime = 0  # experiment_from_run_config names the missing file
    return _experiment(tuple(sorted(run_config.items())), mtime)


def node_of(context: Context) -> Node:
    """The node a message is served on, from the run config and the node config.

    Node config: ``partition-id`` and ``num-partitions`` (set by the simulation, given with
    ``--node-config`` in deployment), optionally ``num-threads`` (torch threads, default 1),
    ``data-root`` (a directory with this node's copy of the dataset) and ``cache-dir`` (a directory
    where the node keeps its normalized partition between messages; deploy/launch.py sets one).
    """
    torch.set_num_threads(int(context.node_config.get("num-threads", 1)))
    keep_freed_memory()
    experiment = experiment_of(context.run_config)
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
    cache_dir = context.node_config.get("cache-dir")
    return Node(experiment, pid, num, None if cache_dir is None else str(cache_dir))


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


_COSTS: dict[str, tuple[float, float]] = {}
"""(training FLOPs per sample, peak bytes of one training step) by what they depend on: the model
(name, architecture key, tensor shapes), the input shape, the kept weights per layer, the batch and
the optimizer.
Counting FLOPs runs the model under FlopCounterMode and measuring the step runs torch's profiler,
whose first use in a process costs more than a second: a fresh ClientApp process (every message in
deployment) reads both from the node's ``cache-dir`` instead. A cache, not state: losing it costs
time, never a result."""


def _costs_file(node: Node) -> Path | None:
    return None if node.cache_dir is None else Path(node.cache_dir) / "training-costs.json"


def training_costs(model: torch.nn.Module, masks, x: torch.Tensor, y: torch.Tensor, node: Node,
                   arch: object = None) -> dict:
    """Counted training FLOPs of this round's local work and the measured peak of one step.

    ``arch`` tells apart sub-models that share the experiment's model name (e.g. FedLP levels).
    """
    c = node.experiment.client
    batch = (x[: c.batch_size].clone(), y[: c.batch_size].clone())  # a slice's storage is the whole set's
    shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    key = json.dumps([node.experiment.model.name, repr(arch), shapes, list(x.shape[1:]),
                      sorted((k, int(m.sum())) for k, m in (masks or {}).items()), len(batch[0]), c.optimizer,
                      c.lr if c.optimizer == "adam" else None])
    file = _costs_file(node)
    if key not in _COSTS and file is not None and file.is_file():
        with contextlib.suppress(OSError, ValueError):
            _COSTS.update({k: tuple(v) for k, v in json.loads(file.read_text()).items()})
    if key not in _COSTS:
        memory = training_step_memory(
            model, torch.nn.functional.cross_entropy, batch, masks=masks,
            optimizer_factory=None if c.optimizer == "sgd" else (lambda p: torch.optim.Adam(p, lr=c.lr)),
        )
        _COSTS[key] = (count_flops(model, x[:1], masks, training=True).effective, float(memory.peak))
        if file is not None:
            write_atomically(file, lambda tmp: tmp.write_text(json.dumps(_COSTS)))
    per_sample, peak = _COSTS[key]
    return {protocol.FLOPS: float(per_sample * len(x) * c.local_epochs), protocol.PEAK_MEMORY: peak}


def reply(msg: Message, node: Node, num_examples: int, records: dict | None = None, **metrics) -> Message:
    """A reply with ``records`` (e.g. ``{"arrays": ...}``) and the metrics every reply carries:
    num-examples, partition-id and the mask version the node worked under."""
    config = msg.content[protocol.CONFIG]
    m = MetricRecord({protocol.NUM_EXAMPLES: int(num_examples), protocol.PARTITION_ID: node.partition_id,
                      protocol.MASK_VERSION: int(config.get(protocol.MASK_VERSION, 0)), **metrics})
    return Message(RecordDict({**(records or {}), protocol.METRICS: m}), reply_to=msg)


def value_dtype(msg: Message) -> str:
    return str(msg.content[protocol.CONFIG].get(protocol.VALUE_DTYPE, "float32"))
