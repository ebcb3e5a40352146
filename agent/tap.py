"""Taps: each stage's output, published live for `toktra-agent tap STAGE`.

A stage publishes every message it emits (a batch of bodies, each printed
as its own line by `follow`) on a ZeroMQ XPUB socket,
`ipc://{run_dir}/tap-{stage}.sock`. It never blocks and keeps a bounded
queue per subscriber, so a tap that stops reading loses its own messages,
never the pipeline's; with no subscriber nothing is sent at all. The socket
lives in run_dir, which only root and the agent's group can enter. What is
published is what already flows between stages: connection metadata, never
content.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import TextIO

import zmq

from agent import wire
from agent.runtime import endpoint

log = logging.getLogger("toktra.tap")

SUBSCRIBER_QUEUE = 10_000


def tap_endpoint(run_dir: str, stage: str) -> str:
    return endpoint(run_dir, f"tap-{stage}")


class Tap:
    """A stage's publisher; with `enabled` false (config `taps`) it is inert."""

    def __init__(
        self,
        ctx: zmq.Context,
        run_dir: str,
        stage: str,
        enabled: bool = True,
        group: int | None = None,
    ) -> None:
        self._sock: zmq.Socket | None = None
        self._subscribed = False
        if enabled:
            # XPUB, not PUB: it tells us when the first subscriber comes and
            # the last one goes, so with nobody listening nothing is sent
            # and the shipper encodes nothing for the tap.
            self._sock = ctx.socket(zmq.XPUB)
            self._sock.setsockopt(zmq.SNDHWM, SUBSCRIBER_QUEUE)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.bind(tap_endpoint(run_dir, stage))
            # Root and the agent's group may subscribe (connecting needs
            # write permission on the socket file).
            path = os.path.join(run_dir, f"tap-{stage}.sock")
            try:
                os.chmod(path, 0o660)
                if group is not None:
                    os.chown(path, -1, group)
            except OSError as err:
                log.warning(
                    "tap %s: only its owner can subscribe (%s)", path, err.strerror
                )

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def wanted(self) -> bool:
        """Whether anyone is subscribed now (reads the subscription news)."""
        if self._sock is None:
            return False
        while True:
            try:
                news = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return self._subscribed
            # b"\x01" + topic: the first subscriber came; b"\x00": the last left.
            if news[:1] in (b"\x00", b"\x01"):
                self._subscribed = news[:1] == b"\x01"

    def publish(self, data: bytes) -> None:
        if self.wanted():
            assert self._sock is not None
            with contextlib.suppress(zmq.Again):
                self._sock.send(data, zmq.NOBLOCK)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def follow(
    run_dir: str,
    stage: str,
    out: TextIO = sys.stdout,
    count: int | None = None,
    seconds: float | None = None,
) -> int:
    """Prints the stage's messages as JSON lines; returns how many it printed."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, SUBSCRIBER_QUEUE)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(tap_endpoint(run_dir, stage))
    end = None if seconds is None else time.monotonic() + seconds
    printed = 0
    try:
        while count is None or printed < count:
            wait_ms = (
                500 if end is None else int(max(0.0, end - time.monotonic()) * 1000)
            )
            if end is not None and wait_ms == 0:
                break
            if not sub.poll(min(wait_ms, 500)):
                continue
            try:
                bodies = wire.bodies_of(sub.recv())
            except (ValueError, RecursionError):
                continue
            for body in bodies[: None if count is None else count - printed]:
                out.write(json.dumps(body, separators=(",", ":")) + "\n")
                printed += 1
            out.flush()
    finally:
        sub.close()
        ctx.term()
    return printed
