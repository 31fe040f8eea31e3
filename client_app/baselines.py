"""Client routines of the pruning baselines: SNIP's scoring phase (Lee et al. 2019).

The node scores the received dense model on ``pruning.score_batches`` local batches (chosen by
``(seed, "snip", partition id)``) and returns, by ``pruning.snip_scoring``: ``union`` (default) its
signed mean loss gradient, which the server averages over clients before taking ``|g * w|`` (SNIP
on the union of the clients' data); ``client-mean`` its own scores ``|g * w|``, which the server
averages.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message

from client_app.node import Node, receive, reply
from fedprune import protocol
from fedprune.seeding import torch_generator
from fedprune.task import maskable_names
from fedprune.training import batches
from pruning.scores import loss_gradients, snip_scores


def snip(msg: Message, context: Context, node: Node) -> Message:
    """Gradients (``union``) or SNIP scores (``client-mean``) of the received model on local batches."""
    exp = node.experiment
    x, y, _, _ = node.data()
    model, _ = receive(msg, context, node)
    order = batches(len(x), exp.client.batch_size, torch_generator(exp.seed, "snip", node.partition_id))
    chosen = [(x[i], y[i]) for i in order[: exp.pruning.score_batches]]
    names = maskable_names(exp, model)
    score = loss_gradients if exp.pruning.snip_scoring == "union" else snip_scores
    values = score(model, torch.nn.functional.cross_entropy, chosen, names)
    return reply(msg, node, sum(len(b[1]) for b in chosen),
                 {protocol.ARRAYS: protocol.pack({k: v.float() for k, v in values.items()})})


SNIP = {protocol.SNIP: snip}
