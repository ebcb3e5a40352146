"""Batches between stages, over real ZeroMQ sockets on ipc endpoints.

The outbox must send what one pass produced as few messages, keep bodies
the next stage cannot take yet (bounded), count every body it drops, and
never lose or repeat one: put = delivered + waiting + dropped, always.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import zmq

from agent import wire
from agent.outbox import SOCKET_BATCHES, Outbox, configure
from agent.runtime import DropCounter, endpoint
from agent.tap import Tap, follow
from tests.test_classifier_stage import connection

log = logging.getLogger("test.outbox")


def body(i: int) -> dict:
    return connection(b"api.openai.com", conn_id=f"{i:024x}")


@pytest.fixture
def pipe(tmp_path: Path):
    """A PUSH (the stage) and PULL (the next stage) joined as the agent joins them."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    configure(pull)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(endpoint(str(tmp_path), "next"))
    push = ctx.socket(zmq.PUSH)
    configure(push)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoint(str(tmp_path), "next"))
    yield push, pull
    push.close()
    pull.close()
    ctx.term()


def outbox(push: zmq.Socket, limit: int, tmp_path: Path) -> Outbox:
    tap = Tap(zmq.Context.instance(), str(tmp_path), "test", enabled=False)
    return Outbox(push, "connection", limit, DropCounter(log, "bodies"), tap, "next")


def receive_all(pull: zmq.Socket, timeout: float = 5.0) -> list[list[dict]]:
    """Every message waiting (or arriving within `timeout` of the last)."""
    messages = []
    while pull.poll(int(timeout * 1000)):
        messages.append(wire.decode_batch("connection", pull.recv()).bodies)
        timeout = 0.2
    return messages


def test_one_pass_crosses_as_few_messages_in_order(pipe, tmp_path):
    push, pull = pipe
    box = outbox(push, 10_000, tmp_path)
    count = 2 * wire.MAX_BATCH + 7
    for i in range(count):
        box.put(body(i))
    assert box.flush()
    messages = receive_all(pull)
    assert [len(m) for m in messages] == [wire.MAX_BATCH, wire.MAX_BATCH, 7]
    ids = [b["conn_id"] for m in messages for b in m]
    assert ids == [f"{i:024x}" for i in range(count)]
    assert box.sent == count and box.batches == 3 and box.drops.total == 0


def test_a_pass_larger_than_the_bound_is_not_dropped_while_the_next_has_room(
    pipe, tmp_path
):
    """The bound is on what waits for a slow next stage, not on a pass."""
    push, pull = pipe
    box = outbox(push, 1, tmp_path)
    for i in range(100):
        box.put(body(i))
    box.flush()
    assert box.drops.total == 0
    ids = [b["conn_id"] for m in receive_all(pull) for b in m]
    assert ids == [f"{i:024x}" for i in range(100)]


def test_a_stalled_next_stage_makes_bodies_wait_then_drops_beyond_the_bound(
    pipe, tmp_path
):
    push, pull = pipe
    limit = 300
    box = outbox(push, limit, tmp_path)
    # One body per pass: each is a message until ZeroMQ's queues (and the
    # kernel's socket buffer) are full, then bodies wait in the outbox.
    put = 0
    while box.drops.total < 50:
        assert put < 100_000, "the sockets never filled"
        box.put(body(put))
        put += 1
        box.flush()
        assert box.sent + len(box) + box.drops.total == put
    assert len(box) == limit, "the outbox fills to its bound"
    # The next stage catches up: whatever waited goes in one or two messages.
    got = receive_all(pull)
    while len(box):
        box.flush()
        got += receive_all(pull, 1.0)
    ids = [b["conn_id"] for m in got for b in m]
    assert len(ids) == len(set(ids)) == put - box.drops.total
    # Dropped were the newest: what crossed is the first ones, in order.
    assert ids == [f"{i:024x}" for i in range(len(ids))]
    assert max(len(m) for m in got) > 1, "the backlog crossed batched"


def test_drain_gives_up_in_time_and_counts_the_rest(pipe, tmp_path):
    push, _pull = pipe  # never read
    box = outbox(push, 100_000, tmp_path)
    for i in range(3 * SOCKET_BATCHES * wire.MAX_BATCH):
        box.put(body(i))
    left = box.drain(0.5)  # returns: the test's timeout would catch a hang
    assert left > 0 and len(box) == 0
    assert box.drops.total == left
    assert box.sent + left == 3 * SOCKET_BATCHES * wire.MAX_BATCH


def test_an_off_schema_body_fails_at_the_sender_and_nothing_is_queued(pipe, tmp_path):
    push, _pull = pipe
    box = outbox(push, 10, tmp_path)
    bad = dict(body(1), pid=-1)
    with pytest.raises(wire.WireError, match="pid is negative"):
        box.put(bad)
    assert len(box) == 0 and box.drops.total == 0


def test_a_tap_sends_only_while_someone_listens_and_prints_each_body(tmp_path):
    ctx = zmq.Context.instance()
    tap = Tap(ctx, str(tmp_path), "demo")
    try:
        assert not tap.wanted()
        printed: list[str] = []

        class Lines:
            def write(self, text: str) -> None:
                printed.extend(line for line in text.splitlines() if line)

            def flush(self) -> None:
                pass

        listener = threading.Thread(
            target=follow, args=(str(tmp_path), "demo", Lines(), 5, 10.0)
        )
        listener.start()
        deadline = time.monotonic() + 5
        while not tap.wanted() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tap.wanted(), "the subscription was never seen"
        tap.publish(wire.encode_batch("connection", [body(i) for i in range(5)]))
        listener.join(15)
        assert not listener.is_alive()
        assert [json_id(line) for line in printed] == [f"{i:024x}" for i in range(5)]
        deadline = time.monotonic() + 5
        while tap.wanted() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not tap.wanted(), "the last subscriber left"
    finally:
        tap.close()


def json_id(line: str) -> str:
    return json.loads(line)["conn_id"]
