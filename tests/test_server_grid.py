"""PromptGrid: replies are collected as soon as they arrive, through the Grid's public push/pull."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from server_app.grid import PromptGrid


class SlowRepliesGrid:
    """Replies to message i become available ``delays[i]`` seconds after the push."""

    def __init__(self, delays: list[float]) -> None:
        self.delays, self.pushed_at, self.delivered = delays, None, set()
        self.run = "the wrapped grid's run"

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [f"id{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        now = time.monotonic() - self.pushed_at
        ready = sorted(i for i in message_ids if now >= self.delays[int(i[2:])])
        fresh = [i for i in ready if i not in self.delivered]
        self.delivered |= set(fresh)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in fresh]


def test_returns_every_reply_shortly_after_the_last_one_arrives():
    grid = SlowRepliesGrid([0.0, 0.3, 0.5])
    t0 = time.monotonic()
    replies = PromptGrid(grid, poll=0.05).send_and_receive(["a", "b", "c"], timeout=10)
    elapsed = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id0", "id1", "id2"]
    assert 0.5 <= elapsed < 1.0  # Flower's deployment grid would have taken 3 s


def test_timeout_returns_the_replies_that_came():
    grid = SlowRepliesGrid([0.0, 60.0])
    t0 = time.monotonic()
    replies = PromptGrid(grid, poll=0.05).send_and_receive(["a", "b"], timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["id0"]
    assert time.monotonic() - t0 < 1.0


def test_other_calls_reach_the_wrapped_grid_and_poll_must_be_positive():
    assert PromptGrid(SlowRepliesGrid([])).run == "the wrapped grid's run"
    with pytest.raises(ValueError, match="poll"):
        PromptGrid(SlowRepliesGrid([]), poll=0)
