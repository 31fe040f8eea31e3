"""An in-process Grid: the ClientApp called directly, no Ray, no network (for fast strategy tests)."""

from __future__ import annotations

from flwr.app import Error, Message

from client_app.app import app as client_app
from tests.conftest import make_context


class InProcessGrid:
    """Nodes with arbitrary ids serve messages through the real ClientApp in this process.

    ``tamper(instruction, reply) -> reply`` may rewrite training replies (to test what the server does with bad ones);
    exceptions in a handler become error replies, as in Flower's runtimes.
    """

    def __init__(self, run_config: dict, num_nodes: int, id_offset: int = 1000, tamper=None) -> None:
        self.contexts = {id_offset + 7919 * (num_nodes - pid): make_context(run_config, pid, num_nodes,
                                                                          id_offset + 7919 * (num_nodes - pid))
                         for pid in range(num_nodes)}
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
