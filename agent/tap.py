"""Taps: each stage's output, published live for `toktra-agent tap STAGE`.

A stage publishes every message it emits on a ZeroMQ PUB socket,
`ipc://{run_dir}/tap-{stage}.sock`. PUB never blocks and keeps a bounded
queue per subscriber, so a tap that stops reading loses its own messages,
never the pipeline's; with no subscriber a message costs one discarded
send. The socket lives in run_dir, which only root and the agent's group can
enter. What is published is what already flows between stages: connection
metadata, never content.
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
        if enabled:
            self._sock = ctx.socket(zmq.PUB)
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

    def publish(self, data: bytes) -> None:
        if self._sock is not None:
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
            data = sub.recv()
            try:
                message = json.loads(data)
                line = json.dumps(message.get("body", message), separators=(",", ":"))
            except (ValueError, AttributeError):
                continue
            out.write(line + "\n")
            out.flush()
            printed += 1
    finally:
        sub.close()
        ctx.term()
    return printed
