"""Bytes on the wire: the serialized size of every message's content, per direction and kind."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from flwr.app import Message
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid


def content_bytes(message: Message) -> int:
    """Size of the message's content serialized as Flower's protobuf RecordDict (0 for errors)."""
    return recorddict_to_proto(message.content).ByteSize() if message.has_content() else 0


def traffic_kind(message_type: str) -> str:
    """``"eval"`` for client-side evaluation, ``"train"`` for everything else a method exchanges."""
    return "eval" if message_type.split(".")[0] == "evaluate" else "train"


class MeteredGrid:
    """A Grid that counts the bytes of every message it carries; other calls pass through.

    ``take()`` returns the counts since the last call and resets them, so a strategy reads one
    round's traffic at the end of the round.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._bytes: Counter[str] = Counter()

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            self._bytes[f"{traffic_kind(msg.metadata.message_type)}_bytes_down"] += content_bytes(msg)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for msg in replies:
            self._bytes[f"{traffic_kind(msg.metadata.message_type)}_bytes_up"] += content_bytes(msg)
        return replies

    def take(self) -> dict[str, int]:
        keys = ("train_bytes_down", "train_bytes_up", "eval_bytes_down", "eval_bytes_up")
        counts = {k: int(self._bytes[k]) for k in keys}
        self._bytes.clear()
        return counts
