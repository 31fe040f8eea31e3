"""FedTiny's local routines (Huang et al., ICDCS 2023); strategies/fedtiny.py is the server side.

Every routine uses the node's data without the server's warm-up images (fedprune/fedtiny.py).

* ``bn_stats``: keep the dense weights and candidate masks of the message in ``context.state``;
  per candidate, the masked weights with BatchNorm statistics recalibrated over the validation
  split (one pass in train mode, no gradients: ``torch.optim.swa_utils.update_bn``); reply with
  each candidate's ``running_mean`` / ``running_var``.
* ``candidate_loss``: per candidate, the validation loss of the masked weights with the statistics
  the message carries (none under ``no-recalibration``: the weights' own; the weights and masks
  then come with this message); reply with the losses. The kept weights and masks are dropped.
* ``train``: masked training with a sparse training state (pruning/sparse_training.py): the
  kept weights, their gradients and optimizer state only, so the measured peak of a step falls
  with the density. A step that exceeds ``fedtiny.memory_budget`` stops the routine with an error
  before training. In an adjustment round (the config names the layers and their ``n_l``) the last
  batch's backward also keeps each layer's top-``n_l`` gradients at pruned positions, in
  ``O(n_l)`` memory, in ``context.state``.
* ``topk_grads``: reply with the top-K lists this node kept in this round's training.
* ``evaluate``: validation loss and accuracy of the received masked model.

Counted FLOPs are those of masked training (as every method's), plus in an adjustment round the
dense weight gradient of the adjusted layers at their pruned positions for one batch.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from torch.optim.swa_utils import update_bn

from client_app.node import Node, StateLost, receive, reply, value_dtype
from fedprune import fedtiny, protocol
from fedprune.seeding import torch_generator
from fedprune.task import maskable_names, new_model
from fedprune.training import evaluate, train
from pruning.accounting import count_flops
from pruning.sparse_training import dense_state_dict, sparse_layers, sparsify

WEIGHTS_KEY = "fedtiny-weights"
TOPK_KEY, TOPK_META_KEY = "fedtiny-topk", "fedtiny-topk-meta"


class MemoryBudgetExceeded(RuntimeError):
    """A training step of this node would take more memory than ``fedtiny.memory_budget``."""


def data(node: Node):
    exp = node.experiment
    return fedtiny.client_data(exp.dataset, exp.partition, exp.fedtiny.server_shots, node.partition_id,
                               node.num_partitions)


def candidates(msg: Message, context: Context, node: Node):
    """``(i, model)`` per candidate: the dense weights under candidate i's mask. The weights and
    masks come with the message (and are kept in ``context.state``) or from an earlier phase."""
    count = int(msg.content[protocol.CONFIG][fedtiny.NUM_CANDIDATES])
    keys = [WEIGHTS_KEY] + [fedtiny.CANDIDATE.format(i) for i in range(count)]
    if protocol.ARRAYS in msg.content:
        for key, record in zip(keys, [msg.content[protocol.ARRAYS]] + [msg.content[k] for k in keys[1:]]):
            context.state[key] = record
    if any(k not in context.state for k in keys):
        raise StateLost("the candidates of this run's bn_stats phase are not held by this node")
    model = new_model(node.experiment)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    weights = protocol.unpack(context.state[WEIGHTS_KEY], protocol.expected_of(state))
    shapes = {k: state[k].shape for k in maskable_names(node.experiment, model)}
    for i, key in enumerate(keys[1:]):
        masks = protocol.unpack_masks(context.state[key], shapes, partial=True)
        model.load_state_dict({k: torch.from_numpy(np.where(masks[k], v, 0) if k in masks else v)
                               for k, v in weights.items()})
        yield i, model


def bn_stats(msg: Message, context: Context, node: Node) -> Message:
    """Every candidate's BatchNorm statistics, recalibrated on the validation split."""
    _, _, vx, _ = data(node)
    records = {}
    for i, model in candidates(msg, context, node):
        update_bn(vx.split(node.experiment.evaluation.batch_size), model)
        names = [k for k in model.state_dict() if k.endswith(("running_mean", "running_var"))]
        records[fedtiny.BN.format(i)] = protocol.pack({k: model.state_dict()[k] for k in names})
    return reply(msg, node, len(vx), records)


def candidate_loss(msg: Message, context: Context, node: Node) -> Message:
    """Every candidate's validation loss with the statistics the message carries."""
    _, _, vx, vy = data(node)
    losses = []
    for i, model in candidates(msg, context, node):
        key = fedtiny.BN.format(i)
        if key in msg.content:
            state = {k: v.numpy() for k, v in model.state_dict().items()}
            stats = protocol.unpack(msg.content[key], protocol.expected_of(
                {k: state[k] for k in state if k.endswith(("running_mean", "running_var"))}))
            model.load_state_dict({**model.state_dict(), **{k: torch.from_numpy(v) for k, v in stats.items()}})
        losses.append(float(evaluate(model, vx, vy, node.experiment.evaluation.batch_size)[0]))
    for key in [WEIGHTS_KEY] + [fedtiny.CANDIDATE.format(i) for i in range(len(losses))]:
        del context.state[key]
    return reply(msg, node, len(vx), **{fedtiny.CANDIDATE_LOSSES: losses})


_FLOPS_CACHE: dict[tuple, tuple[float, dict[str, float]]] = {}
"""(training FLOPs per sample, dense forward FLOPs per sample of each layer) by (model, input
shape, kept weights per layer): a cache, not state (losing it costs time, never a result)."""


def training_flops(model: torch.nn.Module, masks, x: torch.Tensor, node: Node, topk: dict[str, int]) -> float:
    """Counted FLOPs of this round's masked training, plus the top-K gradients' dense weight
    gradient at the pruned positions of the adjusted layers for one batch."""
    exp = node.experiment
    key = (exp.model.name, tuple(x.shape[1:]), tuple(sorted((k, int(m.sum())) for k, m in (masks or {}).items())))
    if key not in _FLOPS_CACHE:
        forward = count_flops(model, x[:1]).layers
        _FLOPS_CACHE[key] = (count_flops(model, x[:1], masks, training=True).effective,
                             {f"{layer.name}.weight": float(layer.dense) for layer in forward})
    per_sample, dense_forward = _FLOPS_CACHE[key]
    extra = sum(dense_forward[k] * (1 - float(masks[k].float().mean())) for k in topk)
    return per_sample * len(x) * exp.client.local_epochs + extra * min(exp.client.batch_size, len(x))


def train_sparse(msg: Message, context: Context, node: Node) -> Message:
    """Masked local training on sparse state; in an adjustment round, keep the top-K gradients."""
    exp = node.experiment
    config = msg.content[protocol.CONFIG]
    server_round = int(config[protocol.SERVER_ROUND])
    x, y, _, _ = data(node)
    model, masks = receive(msg, context, node)
    topk = dict(zip(config.get(fedtiny.TOPK_LAYERS, []), config.get(fedtiny.TOPK_COUNTS, [])))
    flops = training_flops(model, masks, x, node, topk)
    sparsify(model, masks or {})
    memory = fedtiny.step_memory(model, x, y, exp.client)
    budget = exp.fedtiny.memory_budget
    if budget is not None and memory.peak > budget:
        raise MemoryBudgetExceeded(f"a training step takes {memory.peak} bytes (measured), more than "
                                   f"fedtiny.memory_budget = {budget}")
    layers = dict(sparse_layers(model))
    steps, done = exp.client.local_epochs * math.ceil(len(x) / exp.client.batch_size), 0

    def arm() -> None:  # the adjusted layers keep the top-K gradients of the next backward
        for name, n in topk.items():
            layers[name].topk = int(n)

    def count_step(_model) -> None:  # after each step: arm before the last batch
        nonlocal done
        done += 1
        if done == steps - 1:
            arm()

    if topk and steps == 1:
        arm()
    start = time.process_time()
    loss = train(model, x, y, exp.client, torch_generator(exp.seed, "train", server_round, node.partition_id),
                 after_step=count_step if topk else None)
    seconds = time.process_time() - start
    if topk:
        lists = {}
        for name in topk:
            index, grads = layers[name].topk_result
            lists[fedtiny.INDEX.format(name)] = Array(index.to(torch.int32).numpy())
            lists[fedtiny.GRAD.format(name)] = Array(grads.numpy())
        context.state[TOPK_KEY] = ArrayRecord(lists)
        context.state[TOPK_META_KEY] = ConfigRecord({"round": server_round, "num-examples": len(x)})
    arrays = protocol.pack(dense_state_dict(model), masks, value_dtype=value_dtype(msg))
    return reply(msg, node, len(x), {protocol.ARRAYS: arrays}, loss=loss,
                 **{protocol.COMPUTE_SECONDS: seconds, protocol.FLOPS: flops, protocol.PEAK_MEMORY: float(memory.peak)})


def topk_grads(msg: Message, context: Context, node: Node) -> Message:
    """The top-K lists kept in this round's training."""
    server_round = int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])
    if TOPK_KEY not in context.state or int(context.state[TOPK_META_KEY]["round"]) != server_round:
        raise StateLost(f"this node holds no top-K gradients of round {server_round}")
    lists = {k: v.numpy() for k, v in context.state[TOPK_KEY].items()}
    return reply(msg, node, int(context.state[TOPK_META_KEY]["num-examples"]), {protocol.ARRAYS: protocol.pack(lists)})


def evaluate_masked(msg: Message, context: Context, node: Node) -> Message:
    """Loss and accuracy of the received masked model on the validation split."""
    _, _, vx, vy = data(node)
    model, _ = receive(msg, context, node)
    loss, acc = evaluate(model, vx, vy, node.experiment.evaluation.batch_size)
    return reply(msg, node, len(vx), loss=loss, accuracy=acc)


FEDTINY = {protocol.BN_STATS: bn_stats, protocol.CANDIDATE_LOSS: candidate_loss, protocol.TOPK_GRADS: topk_grads,
           protocol.TRAIN: train_sparse, protocol.EVALUATE: evaluate_masked}
