"""An in-process federation: the real ServerApp logic, strategies and ClientApp, called directly.

No Ray and no network: the Grid below serves each message through the ClientApp in this process,
one node after the other, with per-node ``context.state`` as Flower keeps it. Benchmarks use it
to run many experiments side by side on one machine (one process per experiment), and tests use
it to drive strategies round by round. Bytes are metered exactly as in a real run (the strategy's
ledger measures the messages it sends and receives).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict

from client_app.app import app as client_app
from fedprune.experiment import experiment_from_run_config
from server_app.app import run_experiment
from server_app.results import RunWriter


def make_context(run_config: dict, partition_id: int, num_partitions: int, node_id: int | None = None) -> Context:
    return Context(run_id=1, node_id=node_id if node_id is not None else 100 + partition_id,
                   node_config={"partition-id": partition_id, "num-partitions": num_partitions},
                   state=RecordDict(), run_config=dict(run_config))


class InProcessGrid:
    """Nodes with arbitrary ids serve messages through the real ClientApp in this process.

    ``tamper(instruction, reply) -> reply`` may rewrite training replies (to test what the server
    does with bad ones); exceptions in a handler become error replies, as in Flower's runtimes.
    """

    def __init__(self, run_config: dict, num_nodes: int, id_offset: int = 1000, tamper=None) -> None:
        ids = [id_offset + 7919 * (num_nodes - pid) for pid in range(num_nodes)]
        self.contexts = {nid: make_context(run_config, pid, num_nodes, nid) for pid, nid in enumerate(ids)}
        self.tamper = tamper
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            try:
                reply = client_app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - mirrors Flower: handler errors become replies
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=msg)
            if self.tamper is not None and msg.metadata.message_type == "train":
                reply = self.tamper(msg, reply)
            replies.append(reply)
        return replies


def run_inprocess(run_config: dict, num_nodes: int, run_dir: Path) -> dict:
    """One experiment (a Flower run config) in process; writes ``run_dir`` like the ServerApp
    (and continues it from its checkpoint when the run config says ``resume``)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    experiment = experiment_from_run_config(run_config)
    grid = InProcessGrid(run_config, num_nodes)
    if run_config.get("resume"):
        writer, state = RunWriter.resume(Path(run_config["resume"]), experiment)
        return run_experiment(grid, experiment, writer, state)
    return run_experiment(grid, experiment, RunWriter(run_dir, experiment))
