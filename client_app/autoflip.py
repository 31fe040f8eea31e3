"""AutoFLIP's local routines (Internò et al. 2024): loss exploration, and training under a hybrid mask.

* ``query.explore`` (before round 1): the node trains its own copy of the received model, one base
  epoch (``theta_base``), then up to ``autoflip.explore_epochs`` more, and stops early once the
  loss on its validation split (its mean training loss when it holds none) has not fallen for
  ``autoflip.patience`` epochs; the state it stops in is the explored model ``theta_k``. It
  uploads ``(theta_k - theta_base) ** 2`` of every maskable parameter (record ``deviation``,
  always float32: float16 would flush small deviations to zero; the codec picks the smallest
  encoding) and, with ``autoflip.warm_start``, the explored model. Each epoch is one call of the
  shared training loop (fedprune/training.py), so the optimizer restarts every epoch (the authors'
  code restarts it between the base epoch and the exploration); the batch order comes from
  ``(seed, "explore", round, partition id)``.
* ``train``: masked local training as the app's default routine (the mask enforced after every
  step), except that when the mask removes whole units (pruning/slim.py) the node trains the
  physically smaller model and writes its values back into the full model for the upload; the
  FLOPs and peak memory it reports are the smaller model's. With ``autoflip.refresh`` the node
  also explores from the received weights (one base and one exploration epoch, dense, as the
  authors' training-phase scouts) and uploads that deviation with its weights.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch
from flwr.app import Context, Message

from client_app.node import Node, receive, reply, training_costs, value_dtype
from fedprune import protocol
from fedprune.seeding import torch_generator
from fedprune.task import maskable_names
from fedprune.training import evaluate, train
from pruning.guidance import squared_deviation
from pruning.masks import apply_masks, mask_gradients
from pruning.slim import Slim, chain_of


def explore_model(model: torch.nn.Module, node: Node, generator: torch.Generator, epochs: int,
                  patience: int) -> tuple[dict[str, torch.Tensor], int, float]:
    """Train ``model`` in place: a base epoch, then up to ``epochs`` with early stopping after
    ``patience`` epochs without improvement. Returns the squared deviations of the maskable
    parameters from the base, the exploration epochs run and the last epoch's training loss."""
    exp = node.experiment
    x, y, val_x, val_y = node.data()
    one_epoch = dataclasses.replace(exp.client, local_epochs=1)
    train(model, x, y, one_epoch, generator)
    names = maskable_names(exp, model)
    base = {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}
    best, stale, run, loss = math.inf, 0, 0, math.nan
    while run < epochs and stale < patience:
        loss = train(model, x, y, one_epoch, generator)
        run += 1
        score = evaluate(model, val_x, val_y, exp.evaluation.batch_size)[0] if len(val_x) else loss
        best, stale = (score, 0) if score < best else (best, stale + 1)
    return squared_deviation(model.state_dict(), base, names), run, loss


def _explored(model: torch.nn.Module, msg: Message, node: Node, epochs: int, patience: int) -> tuple[dict, dict]:
    """Explore ``model``: (records, metrics) with the deviation and the exploration's own costs."""
    exp = node.experiment
    x, y, _, _ = node.data()
    server_round = int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])
    costs = training_costs(model, None, x, y, node)
    start = time.process_time()
    deviation, run, loss = explore_model(model, node, torch_generator(exp.seed, "explore", server_round,
                                                                      node.partition_id), epochs, patience)
    metrics = {protocol.LOSS: loss, protocol.EXPLORE_EPOCHS: run,
               protocol.COMPUTE_SECONDS: time.process_time() - start,
               protocol.FLOPS: costs[protocol.FLOPS] / exp.client.local_epochs * (1 + run),
               protocol.PEAK_MEMORY: costs[protocol.PEAK_MEMORY]}
    return {protocol.DEVIATION: protocol.pack(deviation)}, metrics


def explore(msg: Message, context: Context, node: Node) -> Message:
    """The exploration phase: the deviation of this node's explored copy (and the copy itself)."""
    cfg = node.experiment.autoflip
    model, _ = receive(msg, context, node)
    records, metrics = _explored(model, msg, node, cfg.explore_epochs, cfg.patience)
    if cfg.warm_start:
        records[protocol.ARRAYS] = protocol.pack(model.state_dict(), value_dtype=value_dtype(msg))
    return reply(msg, node, len(node.data()[0]), records, **metrics)


def slim_of(model: torch.nn.Module, masks: dict[str, torch.Tensor] | None, example: torch.Tensor) -> Slim | None:
    """The physically smaller model when ``masks`` remove whole units of a chain model, else None."""
    chain = chain_of(model, example) if masks else None
    if chain is None:
        return None
    kept = chain.kept_units(masks)
    return chain.slim(model, kept) if not all(k.all() for k in kept) else None


def train_hybrid(msg: Message, context: Context, node: Node) -> Message:
    """Local training under the mask, on the smaller model when whole units are removed."""
    exp = node.experiment
    server_round = int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])
    x, y, _, _ = node.data()
    model, masks = receive(msg, context, node)
    received = copy.deepcopy(model) if exp.autoflip.refresh else None
    slim = slim_of(model, masks, x[:1])
    net, net_masks = (slim.model, slim.masks(masks)) if slim else (model, masks)
    costs = training_costs(net, net_masks, x, y, node, arch=slim.sizes if slim else None)
    start = time.process_time()
    loss = train(net, x, y, exp.client, torch_generator(exp.seed, "train", server_round, node.partition_id),
                 after_backward=(lambda m: mask_gradients(m, net_masks)) if net_masks else None,
                 after_step=(lambda m: apply_masks(m, net_masks)) if net_masks else None)
    metrics = {protocol.LOSS: loss, protocol.COMPUTE_SECONDS: time.process_time() - start, **costs}
    state = slim.full_state(model.state_dict()) if slim else model.state_dict()
    records = {protocol.ARRAYS: protocol.pack(state, masks, value_dtype=value_dtype(msg))}
    if received is not None:
        deviation, explored = _explored(received, msg, node, 1, 1)
        records.update(deviation)
        for key in (protocol.FLOPS, protocol.COMPUTE_SECONDS):
            metrics[key] += explored[key]
        metrics[protocol.PEAK_MEMORY] = max(metrics[protocol.PEAK_MEMORY], explored[protocol.PEAK_MEMORY])
    return reply(msg, node, len(x), records, **metrics)


AUTOFLIP = {protocol.EXPLORE: explore, protocol.TRAIN: train_hybrid}
