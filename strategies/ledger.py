"""Bytes on the wire: the serialized size of every message's content, per direction and purpose.

A message's purpose is what its type says (``train``, ``evaluate``, or the name of a query phase
such as ``describe`` or ``snip``), except that the ``mask`` record a message carries is booked
as ``mask`` whichever message carries it. The purposes of one message add up to its size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from fedprune import protocol


def content_bytes(message: Message) -> int:
    """Size of the message's content serialized as Flower's protobuf RecordDict (0 for errors)."""
    return recorddict_to_proto(message.content).ByteSize() if message.has_content() else 0


def bytes_by_purpose(message: Message) -> dict[str, int]:
    """The message's bytes split into its purpose and the mask it carries (they sum to its size)."""
    total = content_bytes(message)
    kind = protocol.purpose(message.metadata.message_type)
    if not message.has_content() or protocol.MASK not in message.content:
        return {kind: total}
    rest = RecordDict({k: v for k, v in message.content.items() if k != protocol.MASK})
    without = recorddict_to_proto(rest).ByteSize()
    return {kind: without, "mask": total - without}


class MeteredGrid:
    """A Grid that counts the bytes of every message it carries; other calls pass through.

    ``take()`` returns the counts since the last call and resets them, so a strategy reads one
    round's traffic at the end of the round: ``bytes_down`` / ``bytes_up`` (everything) and
    ``bytes_down_<purpose>`` / ``bytes_up_<purpose>``.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._bytes: Counter[str] = Counter()

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def _count(self, messages: list[Message], direction: str) -> None:
        for msg in messages:
            for kind, n in bytes_by_purpose(msg).items():
                self._bytes[f"bytes_{direction}"] += n
                self._bytes[f"bytes_{direction}_{kind}"] += n

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self._count(messages, "down")
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._count(replies, "up")
        return replies

    def take(self) -> dict[str, int]:
        counts = {"bytes_down": 0, "bytes_up": 0, **{k: int(v) for k, v in sorted(self._bytes.items())}}
        self._bytes.clear()
        return counts
