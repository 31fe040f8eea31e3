"""fedprune ClientApp: one handler per message type, dispatching to the method's routines.

The experiment (run config) names the method; the method's client module (fedprune/methods.py)
maps phases to routines ``fn(msg, context, node) -> Message``. A phase the method does not name
runs the default routine below: ``describe`` (which partition this node holds), ``train`` (masked
local training) and ``evaluate`` (validation loss and accuracy). Query phases (``query.<phase>``)
are registered for every phase a registered method names.
"""

from __future__ import annotations

import time

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.node import Node, StateLost, node_of, receive, reply, training_costs, value_dtype
from fedprune import protocol
from fedprune.methods import METHODS, get_method
from fedprune.seeding import torch_generator
from fedprune.training import evaluate, train
from pruning.masks import apply_masks, mask_gradients

app = ClientApp()


def describe(msg: Message, context: Context, node: Node) -> Message:
    """This node's partition and data sizes (building the partition plan fails here, early)."""
    train_x, _, val_x, _ = node.data()
    metrics = MetricRecord({protocol.PARTITION_ID: node.partition_id, protocol.NUM_PARTITIONS: node.num_partitions,
                            protocol.NUM_TRAIN: len(train_x), protocol.NUM_VAL: len(val_x)})
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=msg)


def train_masked(msg: Message, context: Context, node: Node) -> Message:
    """Local training of the received model on this node's train split, under its mask."""
    exp = node.experiment
    server_round = int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])
    x, y, _, _ = node.data()
    model, masks = receive(msg, context, node)
    costs = training_costs(model, masks, x, y, node)
    start = time.process_time()
    loss = train(model, x, y, exp.client, torch_generator(exp.seed, "train", server_round, node.partition_id),
                 after_backward=(lambda m: mask_gradients(m, masks)) if masks else None,
                 after_step=(lambda m: apply_masks(m, masks)) if masks else None)
    arrays = protocol.pack(model.state_dict(), masks, value_dtype=value_dtype(msg))
    return reply(msg, node, len(x), {protocol.ARRAYS: arrays}, loss=loss,
                 **{protocol.COMPUTE_SECONDS: time.process_time() - start}, **costs)


def evaluate_received(msg: Message, context: Context, node: Node) -> Message:
    """Loss and accuracy of the received (masked) model on this node's validation split."""
    _, _, x, y = node.data()
    model, _ = receive(msg, context, node)
    loss, acc = evaluate(model, x, y, node.experiment.evaluation.batch_size)
    return reply(msg, node, len(x), loss=loss, accuracy=acc)


DEFAULT_ROUTINES = {protocol.DESCRIBE: describe, protocol.TRAIN: train_masked, protocol.EVALUATE: evaluate_received}


def dispatch(phase: str, msg: Message, context: Context) -> Message:
    """Run the experiment's method's routine for ``phase`` (or the default one)."""
    node = node_of(context)
    method = get_method(node.experiment.method)
    routine = method.routines().get(phase, DEFAULT_ROUTINES.get(phase))
    if routine is None:
        raise ValueError(f"method {method.name!r} has no routine for phase {phase!r}; its phases: "
                         f"{', '.join(sorted({*DEFAULT_ROUTINES, *method.routines()}))}")
    try:
        return routine(msg, context, node)
    except StateLost as exc:
        return Message(Error(code=protocol.STATE_LOST, reason=str(exc)), reply_to=msg)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    return dispatch(protocol.TRAIN, msg, context)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    return dispatch(protocol.EVALUATE, msg, context)


def _register_query_phases() -> None:
    phases = {protocol.DESCRIBE} | {p for m in METHODS.values() for p in m.routines()}
    for phase in sorted(phases - {protocol.TRAIN, protocol.EVALUATE}):
        app.query(phase)(lambda msg, context, phase=phase: dispatch(phase, msg, context))


_register_query_phases()
