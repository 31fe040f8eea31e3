"""A Grid that collects replies as soon as they arrive.

Flower 1.41's deployment grid (``flwr.superlink.grid.http_grid.GrpcGrid.send_and_receive``) waits
3 s between two pulls of replies, so an exchange with real SuperNodes ends up to 3 s after its
last reply reached the SuperLink, twice a round (training, then federated evaluation). The
simulation's grid looks every 0.1 s. :class:`PromptGrid` sends and pulls through the Grid's public
``push_messages`` / ``pull_messages`` and looks every ``poll`` seconds in both, so a round over
real processes does not pay that wait and the two backends pace a round alike.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

POLL_SECONDS = 0.1
"""As ``flwr.superlink.grid.inmemory_grid.InMemoryGrid``'s default ``pull_interval``."""


class PromptGrid:
    """Wraps a Grid; ``send_and_receive`` pulls replies every ``poll`` seconds, other calls pass through."""

    def __init__(self, grid: Grid, poll: float = POLL_SECONDS) -> None:
        if not poll > 0:
            raise ValueError(f"poll: got {poll!r}; allowed: seconds > 0")
        self._grid = grid
        self.poll = poll

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``; return their replies once all arrived or ``timeout`` seconds passed."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            arrived = list(self._grid.pull_messages(pending))
            replies += arrived
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll)
        return replies
