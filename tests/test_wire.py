"""The inter-stage message format refuses anything off-schema."""

from __future__ import annotations

import json

import pytest

from agent import wire
from tests.test_classifier_stage import connection


def test_round_trip():
    conn = connection(b"api.openai.com")
    assert wire.decode("connection", wire.encode("connection", conn)) == conn


def test_hostile_bytes_survive_as_latin1():
    raw = bytes(range(1, 256))
    conn = connection(raw)
    assert conn["sni"].encode("latin-1") == raw


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.update(type="event"), "expected connection"),
        (lambda m: m.update(v=2), "expected connection v1"),
        (lambda m: m["body"].pop("pid"), "missing ['pid']"),
        (lambda m: m["body"].update(extra=1), "unexpected ['extra']"),
        (lambda m: m["body"].update(pid="1"), "connection.pid is str"),
        (lambda m: m["body"].update(pid=True), "connection.pid is a boolean"),
        (lambda m: m["body"].update(pid=None), "connection.pid is null"),
        (
            lambda m: m["body"].update(bytes_sent=-1),
            "connection.bytes_sent is negative",
        ),
        (lambda m: m.update(body=[]), "body is list"),
    ],
)
def test_off_schema_messages_are_refused(mutate, message):
    msg = json.loads(wire.encode("connection", connection(b"api.openai.com")))
    mutate(msg)
    with pytest.raises(wire.WireError) as e:
        wire.decode("connection", json.dumps(msg).encode())
    assert message in str(e.value)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        b"[]",
        b"null",
        b"{" * 10,
        b"x" * 70000,
        b"[" * 30000,  # small, but deeper than the parser's recursion limit
        b'{"type": "connection", "v": true, "body": {}}',
    ],
)
def test_garbage_is_refused(data):
    with pytest.raises(wire.WireError):
        wire.decode("connection", data)
