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
        # Beyond what any real connection has: refused before a receiver
        # that stores int64 or a bounded string sees them.
        (
            lambda m: m["body"].update(bytes_sent=2**63),
            "connection.bytes_sent is over 9223372036854775807",
        ),
        (lambda m: m["body"].update(dst_port=70000), "dst_port is over 65535"),
        (lambda m: m["body"].update(uid=2**40), "uid is over 4294967295"),
        (lambda m: m["body"].update(pid=2**32), "pid is over 4294967295"),
        (
            lambda m: m["body"].update(comm="c" * 65),
            "comm is longer than 64 characters",
        ),
        (
            lambda m: m["body"].update(conn_id="../" * 30),
            "conn_id is longer than 64 characters",
        ),
        (
            lambda m: m["body"].update(dst_ip="1" * 46),
            "dst_ip is longer than 45 characters",
        ),
        (
            lambda m: m["body"].update(exe="/" * 4097),
            "exe is longer than 4096 characters",
        ),
        (
            lambda m: m["body"].update(sni_source="evil"),
            "sni_source 'evil' is not one of",
        ),
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


def batch_message(bodies: list) -> bytes:
    return json.dumps({"type": "connection", "v": 1, "bodies": bodies}).encode()


def test_a_batch_round_trips_and_the_single_form_is_still_taken():
    conns = [connection(b"api.openai.com", pid=i + 1) for i in range(3)]
    batch = wire.decode_batch("connection", wire.encode_batch("connection", conns))
    assert batch.bodies == conns and batch.errors == []
    single = wire.decode_batch("connection", wire.encode("connection", conns[0]))
    assert single.bodies == conns[:1]


def test_one_bad_body_in_a_batch_is_dropped_alone():
    good = connection(b"api.openai.com")
    bad = dict(good, pid=-5)
    batch = wire.decode_batch("connection", batch_message([good, bad, good, 7]))
    assert batch.bodies == [good, good]
    assert batch.errors == [
        "connection.pid is negative",
        "connection: body is int, not an object",
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (batch_message([]), "bodies is not a list of 1 to"),
        (
            batch_message([connection(b"a.example")] * (wire.MAX_BATCH + 1)),
            "bodies is not a list of 1 to",
        ),
        (
            json.dumps({"type": "connection", "v": 1, "bodies": {"a": 1}}).encode(),
            "bodies is not a list",
        ),
        (
            json.dumps({"type": "connection", "v": True, "bodies": []}).encode(),
            "expected connection v1",
        ),
        (
            json.dumps({"type": "event", "v": 1, "bodies": []}).encode(),
            "expected connection v1",
        ),
        (b"[" * 30000, "not JSON"),
        (b" " * (wire.MAX_BATCH_BYTES + 1), "too large"),
        # The single form keeps its own, smaller bound.
        (
            json.dumps(
                {"type": "connection", "v": 1, "body": {"x": "y" * 70000}}
            ).encode(),
            "too large",
        ),
    ],
)
def test_unusable_batches_are_refused_whole(data, message):
    with pytest.raises(wire.WireError, match=message):
        wire.decode_batch("connection", data)


def test_a_refused_batch_counts_every_body_it_held():
    too_many = batch_message([connection(b"a.example")] * (wire.MAX_BATCH + 1))
    with pytest.raises(wire.WireError) as refused:
        wire.decode_batch("connection", too_many)
    assert refused.value.bodies == wire.MAX_BATCH + 1
    with pytest.raises(wire.WireError) as refused:
        wire.decode_batch("connection", b"not json")
    assert refused.value.bodies == 1  # unreadable: counted as one


def test_the_largest_real_values_pass():
    conn = connection(
        bytes(range(1, 256)) * 8,  # a 2040-byte hostile name from a hello
        pid=2**22,
        uid=2**32 - 1,
        dst_port=65535,
        bytes_sent=2**63 - 1,
        dst_ip="ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        exe="/" + "x" * 4095,
        sni_source="clienthello",
    )
    assert wire.decode("connection", wire.encode("connection", conn)) == conn


def test_the_sender_refuses_empty_oversized_and_off_schema_batches():
    conn = connection(b"api.openai.com")
    with pytest.raises(ValueError):
        wire.encode_batch("connection", [])
    with pytest.raises(ValueError):
        wire.encode_batch("connection", [conn] * (wire.MAX_BATCH + 1))
    with pytest.raises(wire.WireError, match="pid is a boolean"):
        wire.encode_batch("connection", [conn, dict(conn, pid=True)])


def test_bodies_of_shows_what_any_message_holds():
    conn = connection(b"api.openai.com")
    assert wire.bodies_of(wire.encode_batch("connection", [conn, conn])) == [conn] * 2
    assert wire.bodies_of(wire.encode("connection", conn)) == [conn]
    assert wire.bodies_of(b"[1]") == [[1]]
