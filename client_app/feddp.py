"""FedDP's local routines (Yu et al., CCGrid 2023; the server side is strategies/feddp.py).

``train``: load the received model (its gated layers keep the server's ``k``), train it with the
app's loop and the node's batch order, under ``feddp.correction``:

* ``none``: plain local SGD (FedAvg).
* ``fedprox``: the proximal term ``mu/2 ||w - w_global||^2``, as ``grad += mu (w - w_global)``
  after every backward.
* ``scaffold``: after every optimizer step ``w -= lr (c - c_i)`` (the authors' code, NIID-Bench's
  SCAFFOLD), on parameters only; after the K local steps ``c_i+ = c_i - c + (w_global - w) / (K lr)``
  (option II). The node keeps ``c_i`` in ``context.state`` (``feddp-control``; 0 before its first
  round and after a restart) and replies with ``delta c_i = c_i+ - c_i`` in the ``control`` record.

With ``feddp.threshold`` > 0, convolution weights with ``|w| <= tau`` are set to 0 after every
local epoch (the authors' second code version); the reply packs the weights without a mask, so the
codec sends the zeros as positions only.

``evaluate``: the validation loss and accuracy of the received model, computed with the skipping
inference of pruning/skipping.py when the model is gated (the same outputs as its dense forward).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message

from client_app.node import Node, receive, reply, training_costs, value_dtype
from fedprune import protocol
from fedprune.feddp import CONTROL, threshold_conv_weights
from fedprune.seeding import torch_generator
from fedprune.training import evaluate, train
from pruning.gates import gated_layers
from pruning.skipping import export

STATE_KEY = "feddp-control"


def proximal(model: torch.nn.Module, mu: float):
    """``after_backward`` of FedProx: ``grad += mu (w - w_global)``, w_global = the weights now."""
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}

    def after_backward(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.grad is not None:
                    p.grad.add_(p - anchor[n], alpha=mu)
    return after_backward


def every_epoch(steps_per_epoch: int, fn):
    """``after_step`` that calls ``fn(model)`` after the last step of every epoch."""
    count = 0

    def after_step(m: torch.nn.Module) -> None:
        nonlocal count
        count += 1
        if count % steps_per_epoch == 0:
            fn(m)
    return after_step


def chain(*hooks):
    """One hook that runs the given ones (None skipped) in order; None when there are none."""
    hooks = [h for h in hooks if h is not None]
    if not hooks:
        return None

    def run(m: torch.nn.Module) -> None:
        for h in hooks:
            h(m)
    return run


def stored_control(context: Context, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """This node's ``c_i`` (zeros before its first round or after a restart)."""
    if STATE_KEY not in context.state:
        return {k: torch.zeros(s) for k, s in shapes.items()}
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in context.state[STATE_KEY].items()}


def feddp_train(msg: Message, context: Context, node: Node) -> Message:
    """Local training under the run's correction rule (and threshold); see the module docstring."""
    exp = node.experiment
    cfg, c = exp.feddp, exp.client
    server_round = int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])
    x, y, _, _ = node.data()
    model, _ = receive(msg, context, node)
    costs = training_costs(model, None, x, y, node)
    params = dict(model.named_parameters())
    start_weights = {n: p.detach().clone() for n, p in params.items()}
    steps_per_epoch = math.ceil(len(x) / c.batch_size)
    after_backward = proximal(model, cfg.mu) if cfg.correction == "fedprox" else None
    correct = None
    if cfg.correction == "scaffold":
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        server_c = {k: torch.from_numpy(v) for k, v in protocol.unpack(
            msg.content[CONTROL], {k: (s, np.dtype(np.float32)) for k, s in shapes.items()}).items()}
        local_c = stored_control(context, shapes)
        drift = {n: server_c[n] - local_c[n] for n in params}

        def correct(m: torch.nn.Module) -> None:
            with torch.no_grad():
                for n, p in params.items():
                    p.sub_(drift[n], alpha=c.lr)
    prune = every_epoch(steps_per_epoch, lambda m: threshold_conv_weights(m, cfg.threshold)) \
        if cfg.threshold > 0 else None
    start = time.process_time()
    loss = train(model, x, y, c, torch_generator(exp.seed, "train", server_round, node.partition_id),
                 after_backward=after_backward, after_step=chain(correct, prune))
    seconds = time.process_time() - start
    records = {protocol.ARRAYS: protocol.pack(model.state_dict(), value_dtype=value_dtype(msg))}
    if cfg.correction == "scaffold":
        steps = steps_per_epoch * c.local_epochs
        new_c = {n: local_c[n] - server_c[n] + (start_weights[n] - params[n].detach()) / (steps * c.lr)
                 for n in params}
        context.state[STATE_KEY] = ArrayRecord({n: Array(v.numpy()) for n, v in new_c.items()})
        records[CONTROL] = protocol.pack({n: new_c[n] - local_c[n] for n in params})
    return reply(msg, node, len(x), records, loss=loss, **{protocol.COMPUTE_SECONDS: seconds}, **costs)


def feddp_evaluate(msg: Message, context: Context, node: Node) -> Message:
    """Validation loss and accuracy of the received model, through the skipping inference when gated."""
    _, _, x, y = node.data()
    model, _ = receive(msg, context, node)
    model.eval()
    net = export(model, skip=True) if gated_layers(model) else model
    loss, acc = evaluate(net, x, y, node.experiment.evaluation.batch_size)
    return reply(msg, node, len(x), loss=loss, accuracy=acc)


FEDDP = {protocol.TRAIN: feddp_train, protocol.EVALUATE: feddp_evaluate}
