"""FedLP's local routines (Zhu et al., ICC 2023).

The registry (fedprune/methods.py) points the methods ``fedlp-homo`` and ``fedlp-hetero`` at
:data:`HOMO` and :data:`HETERO`; each routine gets the message, the node's context and the node
(experiment, partition, data).

* ``fedlp-homo`` train: load the full model, train it as FedAvg does (same batch order), then
  upload only the entries its keep draw ``numpy_rng(seed, "fedlp-keep", round, partition_id)``
  keeps (fedprune/fedlp.py; the server recomputes the draw and rejects any other key set).
  Evaluation is the app's ordinary one (the full model).
* ``fedlp-hetero`` train / evaluate: build the sub-model of this node's level (drawn once from
  ``numpy_rng(seed, "fedlp-level", partition_id)``; the server's ``fedlp-level`` must agree),
  load the shared entries from the message, train (or evaluate on the validation split) and upload
  only the shared entries. The private head never leaves the node; its initial value is drawn
  from ``(seed, "fedlp-head", partition_id)``.

  ``fedlp.keep_head`` false (the default, as in the authors' code: each round
  ``download_hetero_net`` loads the global trunk into the client's stored local net, which itself
  is never trained, and trains a copy of it, so the trained head is discarded): every training
  round starts from the initial head. The trained head is stored in ``context.state``
  (``fedlp-head``, tagged with its round) only for the evaluation of that round; evaluating a
  round this node did not train in (not sampled) uses the initial head.
  ``keep_head`` true: the trained head is kept, and every later round, training or evaluation,
  starts from it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from client_app.node import Node, reply, training_costs, value_dtype
from fedprune import protocol
from fedprune.data import SPECS
from fedprune.experiment import Experiment
from fedprune.fedlp import draw_level, kept_keys, preference_probs, private_keys, shared_keys
from fedprune.models import FedLPCNN
from fedprune.seeding import derive_seed, torch_generator
from fedprune.task import new_model
from fedprune.training import evaluate, train

HEAD_KEY = "fedlp-head"
HEAD_META_KEY = "fedlp-head-meta"


def _load(model: torch.nn.Module, record: ArrayRecord, keys: list[str]) -> None:
    """Overwrite ``keys`` of the model with the message's entries (exactly those must be there)."""
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    arrays = protocol.unpack(record, protocol.expected_of({k: state[k] for k in keys}))
    model.load_state_dict({**model.state_dict(), **{k: torch.from_numpy(v) for k, v in arrays.items()}})


# ------------------------------------------------------------------------------ Homo

def homo_train(msg: Message, context: Context, local: Node) -> Message:
    """Train the full model; upload the entries this node's keep draw keeps."""
    exp: Experiment = local.experiment
    server_round = int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])
    x, y, _, _ = local.data()
    model = new_model(exp)
    keys = list(model.state_dict())
    _load(model, msg.content[protocol.ARRAYS], keys)
    costs = training_costs(model, None, x, y, local)
    start = time.process_time()
    loss = train(model, x, y, exp.client, torch_generator(exp.seed, "train", server_round, local.partition_id))
    seconds = time.process_time() - start
    state = model.state_dict()
    keep = kept_keys(exp.seed, server_round, local.partition_id, keys, exp.fedlp.p, exp.fedlp.unit)
    arrays = protocol.pack({k: state[k] for k in keep}, value_dtype=value_dtype(msg))
    return reply(msg, local, len(x), {protocol.ARRAYS: arrays}, loss=loss,
                 **{protocol.COMPUTE_SECONDS: seconds}, **costs)


# ------------------------------------------------------------------------------ Hetero

def node_level(exp: Experiment, partition_id: int) -> int:
    return draw_level(exp.seed, partition_id, preference_probs(exp.fedlp.preferred_level, exp.fedlp.preference_weight))


def _sub_model(msg: Message, context: Context, local: Node, training: bool) -> tuple[FedLPCNN, int]:
    """This node's level sub-model: shared entries from the message; the stored private head where
    it applies (``keep_head``, or evaluating the round it was trained in), else the initial head."""
    exp: Experiment = local.experiment
    level = node_level(exp, local.partition_id)
    sent = int(msg.content[protocol.CONFIG].get("fedlp-level", -1))
    if sent != level:
        raise ValueError(f"fedlp: the server says this node (partition {local.partition_id}) has level {sent}, "
                         f"its own draw says {level}")
    spec = SPECS[exp.dataset.name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(exp.seed, "fedlp-head", local.partition_id))
        model = FedLPCNN(spec.channels, spec.num_classes, spec.size, level)
    _load(model, msg.content[protocol.ARRAYS], shared_keys(model))
    if HEAD_KEY not in context.state:
        return model, level
    meta = context.state[HEAD_META_KEY]
    server_round = int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])
    if exp.fedlp.keep_head or (not training and int(meta["round"]) == server_round):
        if int(meta["level"]) != level:
            raise ValueError(f"fedlp: this node holds a private head of level {meta['level']}, needs level {level}")
        head = {k: torch.from_numpy(np.array(v.numpy())) for k, v in context.state[HEAD_KEY].items()}
        if set(head) != set(private_keys(model)):
            raise ValueError(f"fedlp: stored private head has entries {sorted(head)}, expected {private_keys(model)}")
        model.load_state_dict({**model.state_dict(), **head})
    return model, level


def _store_head(context: Context, model: FedLPCNN, level: int, server_round: int) -> None:
    state = model.state_dict()
    context.state[HEAD_KEY] = ArrayRecord(
        {k: Array(np.ascontiguousarray(state[k].detach().cpu().numpy())) for k in private_keys(model)})
    context.state[HEAD_META_KEY] = ConfigRecord({"level": level, "round": server_round})


def hetero_train(msg: Message, context: Context, local: Node) -> Message:
    """Train this node's sub-model; store the private head, upload the shared entries."""
    exp: Experiment = local.experiment
    server_round = int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])
    x, y, _, _ = local.data()
    model, level = _sub_model(msg, context, local, training=True)
    costs = training_costs(model, None, x, y, local, arch=("fedlp-level", level))
    start = time.process_time()
    loss = train(model, x, y, exp.client, torch_generator(exp.seed, "train", server_round, local.partition_id))
    seconds = time.process_time() - start
    _store_head(context, model, level, server_round)
    state = model.state_dict()
    arrays = protocol.pack({k: state[k] for k in shared_keys(model)}, value_dtype=value_dtype(msg))
    return reply(msg, local, len(x), {protocol.ARRAYS: arrays}, loss=loss,
                 **{protocol.COMPUTE_SECONDS: seconds}, **costs)


def hetero_evaluate(msg: Message, context: Context, local: Node) -> Message:
    """Loss and accuracy of this node's own sub-model (shared trunk + private head, see
    :func:`_sub_model`) on its validation split."""
    _, _, x, y = local.data()
    model, _ = _sub_model(msg, context, local, training=False)
    loss, acc = evaluate(model, x, y, local.experiment.evaluation.batch_size)
    return reply(msg, local, len(x), loss=loss, accuracy=acc)


HOMO = {protocol.TRAIN: homo_train}
HETERO = {protocol.TRAIN: hetero_train, protocol.EVALUATE: hetero_evaluate}
