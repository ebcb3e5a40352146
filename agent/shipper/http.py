"""The shipper's HTTP requests, bounded in time and in what they read.

`requests` bounds each socket read, not a whole request: a server that sends
one byte every few seconds could hold the shipper for ever, and one that
answers with gigabytes (or a gzip bomb) could exhaust its memory. Every
request here therefore has a total deadline, enforced with a real-time timer
in the main thread (the stages are single-threaded), and reads at most
`max_body` bytes of the answer, asking for no content encoding.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests
import urllib3


class DeadlineExceeded(BaseException):
    """The whole request took longer than its deadline.

    A BaseException, so that no `except Exception` on the way swallows it.
    """


class TransportError(Exception):
    """No answer: the cause is in `__cause__`, or the deadline passed."""


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    truncated: bool  # the body was longer than max_body; the rest was not read


def _expired(_signum: int, _frame: object) -> None:
    raise DeadlineExceeded


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raises DeadlineExceeded in this (main) thread after `seconds`."""
    if threading.current_thread() is not threading.main_thread():
        yield  # timers deliver signals to the main thread only
        return
    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def post(
    session: requests.Session,
    url: str,
    *,
    total_s: float,
    read_timeout_s: float,
    max_body: int,
    **kwargs: Any,
) -> Answer:
    """POSTs and returns the answer; raises TransportError when there is none."""
    headers = dict(kwargs.pop("headers", None) or {})
    headers["Accept-Encoding"] = "identity"
    try:
        with (
            deadline(total_s),
            session.post(
                url,
                headers=headers,
                timeout=read_timeout_s,
                allow_redirects=False,
                stream=True,
                **kwargs,
            ) as response,
        ):
            body = bytearray()
            truncated = False
            for chunk in response.iter_content(16384):
                body += chunk
                if len(body) > max_body:
                    truncated = True
                    break
            return Answer(
                response.status_code,
                response.reason or "",
                dict(response.headers),
                bytes(body[:max_body]),
                truncated,
            )
    except DeadlineExceeded as err:
        raise TransportError(f"no complete answer within {total_s:g}s") from err
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as err:
        raise TransportError(str(err)) from err
