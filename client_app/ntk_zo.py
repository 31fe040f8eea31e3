"""Client routines of ``ntk-zo`` and ``zo-dense`` (strategies/ntk_zo.py): NTK-SAP scoring, and
backprop-free training that returns K scalars per step.

* ``query.ntk``: NTK-SAP scores (pruning/ntk.py) of the model under the mask the message carries
  (a candidate, not installed), over ``ntk_zo.draws`` batches of ``score_batch_size`` Gaussian
  inputs (``data-free``) or local training examples (``local-data``), every draw from
  ``(seed, "ntk", iteration, partition id)``; the node's weights and data are not touched. Uploads
  the kept entries of the scores.
* train: bring the model to the server's version (the message's model, or the stored one plus the
  missed seeds and scalars, replayed), store it in ``context.state``, then for each of this round's
  seeds take a batch (order from ``(seed, "zo-batch", round, partition id)``) and compute the K
  directional derivatives with forward passes only (pruning/zo.py); between local steps apply the
  node's own estimate (clipped as the server clips) to its working copy (with
  ``ntk_zo.sparse_weights``, a copy that holds the masked weights as kept values only). Reply: the scalars, the
  mean unperturbed loss, counted FLOPs (``local_steps x (K + 1 | 2K)`` forwards of a batch, each
  layer scaled by its density) and the measured peak of one ZO step.
* evaluate: bring the model to the server's version (stored), then validation loss and accuracy.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from client_app.baselines import snip
from client_app.node import Node, StateLost, receive, reply, stored_mask
from fedprune import protocol
from fedprune.data import SPECS
from fedprune.seeding import torch_generator
from fedprune.task import maskable_names, new_model
from fedprune.training import batches, evaluate
from pruning.accounting import count_flops
from pruning.ntk import ntk_scores
from pruning.zo import (apply_update_, clip, directional_derivatives, forwards_per_step, replay_, sparse_copy,
                        zo_step_memory)

MODEL_KEY, MODEL_META_KEY = "zo-model", "zo-model-meta"
LOSS = torch.nn.functional.cross_entropy


def _store(context: Context, model: torch.nn.Module, version: int) -> None:
    context.state[MODEL_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v.detach().numpy()))
                                            for k, v in model.state_dict().items()})
    context.state[MODEL_META_KEY] = ConfigRecord({"version": version})


def _stored(context: Context, node: Node, version: int, mask_version: int):
    """The stored model, which must be at ``version``, and the stored mask (``mask_version``)."""
    held = int(context.state[MODEL_META_KEY]["version"]) if MODEL_KEY in context.state else None
    if held != version:
        raise StateLost(f"the server assumed this node holds model version {version}, it holds {held}")
    masks, held_mask = stored_mask(context) if mask_version else (None, 0)
    if mask_version and held_mask != mask_version:
        raise StateLost(f"the server assumed this node holds mask version {mask_version}, it holds "
                        f"{held_mask or 'none'}")
    model = new_model(node.experiment)
    model.load_state_dict({k: torch.from_numpy(np.array(v.numpy())) for k, v in context.state[MODEL_KEY].items()})
    return model, None if masks is None else {k: torch.from_numpy(v) for k, v in masks.items()}


def synced_model(msg: Message, context: Context, node: Node) -> tuple[torch.nn.Module, dict | None, int]:
    """The model at the version the server names, its mask and the version, stored for next time:
    the message's model, or the stored one with the missed steps (``zo-replay``) replayed."""
    config = msg.content[protocol.CONFIG]
    cfg = node.experiment.ntk_zo
    target, start = int(config[protocol.ZO_VERSION]), int(config[protocol.ZO_FROM])
    if start < 0:
        model, masks = receive(msg, context, node)
    else:
        model, masks = _stored(context, node, start, int(config.get(protocol.MASK_VERSION, 0)))
        if target > start:
            shape = (target - start, cfg.local_steps)
            missed = protocol.unpack(msg.content[protocol.ZO_REPLAY], {
                "seeds": (shape, np.dtype(np.int64)),
                "scalars": ((*shape, cfg.num_perturbations), np.dtype(np.float32))})
            replay_(dict(model.named_parameters()), masks, missed["seeds"].reshape(-1),
                    missed["scalars"].reshape(-1, cfg.num_perturbations),
                    cfg.version_lrs(start, target))
    _store(context, model, target)
    return model, masks, target


def ntk(msg: Message, context: Context, node: Node) -> Message:
    """NTK-SAP scores under the candidate mask the message carries (never installed)."""
    exp = node.experiment
    cfg = exp.ntk_zo
    model = new_model(exp)
    names = maskable_names(exp, model)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    masks = protocol.unpack_masks(msg.content[protocol.MASK], {k: state[k].shape for k in names})
    if protocol.ARRAYS in msg.content:
        arrays = protocol.unpack(msg.content[protocol.ARRAYS], protocol.expected_of(state), masks)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    iteration = int(msg.content[protocol.CONFIG][protocol.NTK_ITERATION])
    generator = torch_generator(exp.seed, "ntk", iteration, node.partition_id)
    if cfg.saliency == "data-free":
        spec = SPECS[exp.dataset.name]
        inputs = [torch.randn(cfg.score_batch_size, spec.channels, spec.size, spec.size, generator=generator)
                  for _ in range(cfg.draws)]
    else:
        x = node.data()[0]
        order = batches(len(x), cfg.score_batch_size, generator)
        inputs = [x[order[i % len(order)]] for i in range(cfg.draws)]
    scores = ntk_scores(model, names, inputs, {k: torch.from_numpy(v) for k, v in masks.items()},
                        epsilon=cfg.epsilon, generator=generator, resample_weights=cfg.resample_weights)
    return reply(msg, node, sum(len(b) for b in inputs), {protocol.ARRAYS: protocol.pack(scores, masks)})


_COSTS_CACHE: dict[tuple, tuple[float, int]] = {}
"""(forward FLOPs per example, measured peak of one ZO step) by (model, input shape, kept weights
per layer, batch, K, difference, chunk): counting and measuring cost as much as a ZO step and only
depend on this key. A cache, not state: losing it costs time, never a result."""


def stepping_model(model: torch.nn.Module, masks, node: Node) -> tuple[torch.nn.Module, dict | None]:
    """The model a ZO step runs on and its masks: with a mask and ``ntk_zo.sparse_weights``, a copy
    holding the masked weights as kept values (pruning.zo.sparse_copy), else ``model`` itself."""
    if masks and node.experiment.ntk_zo.sparse_weights:
        return sparse_copy(model, masks)
    return model, masks


def zo_costs(model: torch.nn.Module, masks, x: torch.Tensor, y: torch.Tensor, node: Node, steps: int) -> dict:
    """Counted FLOPs of this round's ZO steps (forwards only, each layer scaled by its density)
    and the measured peak memory of one step (pruning.zo.zo_step_memory) on the model the step
    runs on (:func:`stepping_model`)."""
    exp = node.experiment
    cfg = exp.ntk_zo
    size = min(exp.client.batch_size, len(x))
    key = (exp.model.name, tuple(x.shape[1:]), tuple(sorted((k, int(m.sum())) for k, m in (masks or {}).items())),
           size, cfg.num_perturbations, cfg.difference, cfg.forward_chunk, cfg.sparse_weights)
    if key not in _COSTS_CACHE:
        per_example = count_flops(model, x[:1], masks, training=False).effective
        batch = (x[:size].clone(), y[:size].clone())  # a slice's storage is the whole training set's
        net, net_masks = stepping_model(model, masks, node)
        memory = zo_step_memory(net, LOSS, batch, masks=net_masks, num_perturbations=cfg.num_perturbations,
                                sigma=cfg.sigma, difference=cfg.difference, chunk=cfg.forward_chunk, lr=cfg.lr)
        _COSTS_CACHE[key] = (per_example, memory.peak)
    per_example, peak = _COSTS_CACHE[key]
    forwards = steps * forwards_per_step(cfg.num_perturbations, cfg.difference)
    return {protocol.FLOPS: float(per_example * size * forwards), protocol.PEAK_MEMORY: float(peak)}


def zo_train(msg: Message, context: Context, node: Node) -> Message:
    """K scalars per local step, from forward passes only, on the model at the server's version."""
    exp = node.experiment
    cfg = exp.ntk_zo
    config = msg.content[protocol.CONFIG]
    seeds = [int(s) for s in config[protocol.ZO_SEEDS]]
    x, y, _, _ = node.data()
    model, masks, version = synced_model(msg, context, node)
    costs = zo_costs(model, masks, x, y, node, len(seeds))
    order = batches(len(x), exp.client.batch_size,
                    torch_generator(exp.seed, "zo-batch", int(config[protocol.SERVER_ROUND]), node.partition_id))
    model, masks = stepping_model(model, masks, node)  # the stored model stays as it is
    params = dict(model.named_parameters())
    start = time.process_time()
    rows, losses, lrs = [], [], cfg.version_lrs(version, version + 1)
    for t, seed in enumerate(seeds):
        idx = order[t % len(order)]
        scalars, loss = directional_derivatives(model, LOSS, (x[idx], y[idx]), masks, seed, cfg.num_perturbations,
                                                cfg.sigma, cfg.difference, cfg.forward_chunk)
        if t + 1 < len(seeds):
            apply_update_(params, masks, seed, clip(scalars, cfg.clip).tolist(), lrs[t])
        rows.append(scalars)
        losses.append(loss)
    arrays = protocol.pack({protocol.ZO_SCALARS: torch.stack(rows)})
    return reply(msg, node, len(x), {protocol.ARRAYS: arrays}, loss=sum(losses) / len(losses),
                 **{protocol.ZO_VERSION: version, protocol.COMPUTE_SECONDS: time.process_time() - start}, **costs)


def zo_evaluate(msg: Message, context: Context, node: Node) -> Message:
    """Loss and accuracy of the model at the server's version on this node's validation split."""
    _, _, x, y = node.data()
    model, _, version = synced_model(msg, context, node)
    loss, acc = evaluate(model, x, y, node.experiment.evaluation.batch_size)
    return reply(msg, node, len(x), loss=loss, accuracy=acc, **{protocol.ZO_VERSION: version})


ZO = {protocol.TRAIN: zo_train, protocol.EVALUATE: zo_evaluate}
NTK_ZO = {**ZO, protocol.NTK: ntk, protocol.SNIP: snip}
