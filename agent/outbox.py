"""What a stage holds for the next one, sent in batches as it can take them.

A stage puts each body it produces here and flushes once per pass of its
loop, so everything that came out of one drain of its input crosses as one
message. When the next stage is slow its socket refuses more (a small
high-water mark, counted in batches), the bodies wait here, and the next
flush sends them together: the busier the pipeline, the larger the batches.
What waits after a flush is bounded in bodies (`queue_max_messages`), and
bodies beyond the bound are dropped and counted, never blocking the stage.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from typing import Any

import zmq

from agent import wire
from agent.runtime import DropCounter
from agent.tap import Tap

# Batches queued in the socket, sender and receiver side each; the bound in
# bodies is kept here, not by ZeroMQ, which counts only messages.
SOCKET_BATCHES = 8


def received(sock: zmq.Socket, most: int) -> Iterator[bytes]:
    """Up to `most` messages already queued on an input socket, no waiting."""
    for _ in range(most):
        try:
            yield sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def configure(sock: zmq.Socket) -> None:
    """The high-water marks of an inter-stage socket, in batches."""
    sock.setsockopt(zmq.SNDHWM, SOCKET_BATCHES)
    sock.setsockopt(zmq.RCVHWM, SOCKET_BATCHES)


class Outbox:
    def __init__(
        self,
        sock: zmq.Socket,
        kind: str,
        limit: int,
        drops: DropCounter,
        tap: Tap,
        next_stage: str,
    ) -> None:
        self.sock = sock
        self.kind = kind
        self.limit = limit
        self.drops = drops
        self.tap = tap
        self.next_stage = next_stage
        self.sent = 0  # bodies the next stage's socket took
        self.batches = 0
        self._pending: collections.deque[dict[str, Any]] = collections.deque()

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, body: dict[str, Any]) -> None:
        """Queues a body; raises WireError at once if it breaks the schema."""
        wire.check(self.kind, body)
        self._pending.append(body)

    def flush(self) -> bool:
        """Sends what waits, batch by batch; True when nothing is left.

        What the next stage could not take stays, up to the bound; the
        newest beyond it are dropped and counted. The bound is applied only
        here, after the hand-over, so a pass larger than the bound is not
        cut while the next stage has room for it.
        """
        pending = self._pending
        while pending:
            bodies = [
                pending.popleft() for _ in range(min(len(pending), wire.MAX_BATCH))
            ]
            data = wire.encode_batch(self.kind, bodies, checked=True)
            try:
                self.sock.send(data, zmq.NOBLOCK)
            except zmq.Again:
                pending.extendleft(reversed(bodies))  # the next stage is behind
                break
            self.tap.publish(data)
            self.sent += len(bodies)
            self.batches += 1
            self.drops.passed()
        excess = len(pending) - self.limit
        if excess > 0:
            for _ in range(excess):
                pending.pop()
            self.drops.dropped(
                f"the {self.next_stage} is behind and {self.limit} are waiting "
                f"for it already (queue_max_messages); its log says why it is "
                "slow, or raise the bound if bursts are expected",
                excess,
            )
        return not pending

    def drain(self, seconds: float) -> int:
        """At stop: flushes for up to `seconds`; the rest is dropped, counted."""
        end = time.monotonic() + seconds
        while not self.flush():
            left_ms = int((end - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            self.sock.poll(min(left_ms, 100), zmq.POLLOUT)
        left = len(self._pending)
        if left:
            self.drops.dropped(
                f"stopping, and the {self.next_stage} did not take them within "
                f"{seconds:.0f} s",
                left,
            )
            self._pending.clear()
        return left
