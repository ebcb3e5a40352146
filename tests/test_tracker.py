"""The tracker's bookkeeping, fed decoded records directly.

The records are what the BPF object would send (the capture tests check
that it does); here the cases that real clients rarely produce are made on
purpose: pieces out of order, a name from both OpenSSL and the wire, a
connection adopted at start that closes before the kernel learns of it.
"""

from __future__ import annotations

import itertools

import pytest

from agent import wire
from agent.collector.records import Flag, Hello, Kind, Record
from agent.collector.tracker import Tracker
from tests.harness import real_hello

SOCK = 0xFFFF888012345678
START = 1_000_000_000
SEC = 1_000_000_000
NO_FLAGS = Flag(0)


def record(
    kind: Kind,
    sni: bytes | None = None,
    end: int = START,
    flags: Flag = NO_FLAGS,
    sock: int = SOCK,
    start: int = START,
    src_port: int = 40000,
    acked: int = 0,
    received: int = 0,
) -> Record:
    if sni is not None:
        flags |= Flag.SNI
    return Record(
        kind=kind,
        flags=flags,
        pid=4242,
        tid=4242,
        uid=1000,
        sock=sock,
        start_ns=start,
        end_ns=end,
        bytes_acked=acked,
        bytes_received=received,
        src_ip="127.0.0.1",
        src_port=src_port,
        dst_ip="127.0.0.1",
        dst_port=443,
        comm="client",
        exe_name="client",
        sni=sni,
    )


@pytest.fixture
def tracker() -> Tracker:
    return Tracker("boot", lambda pid: None, offset_ns=lambda: 0)


def pieces(data: bytes, *cuts: int) -> list[Hello]:
    bounds = [0, *cuts, len(data)]
    return [
        Hello(SOCK, START, 4242, i, a, data[a:b])
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


def close(tracker: Tracker, **kw) -> dict:
    tracker.handle(record(Kind.CLOSE, end=START + SEC, acked=900, received=4000, **kw))
    (msg,) = tracker.take()
    wire.encode("connection", msg)  # the message is valid on the wire
    return msg


def test_a_name_from_the_clienthello_is_used_without_openssl(tracker):
    tracker.handle(record(Kind.OPEN))
    for piece in pieces(real_hello("api.openai.com"), 60, 200):
        tracker.handle(piece)
    msg = close(tracker)
    assert (msg["sni"], msg["sni_source"]) == ("api.openai.com", "clienthello")
    assert (msg["bytes_sent"], msg["bytes_received"]) == (900, 4000)
    assert tracker.stats.hello["found"] == 1


def test_openssl_wins_when_both_names_exist(tracker):
    """What the library was asked for, not what went on the wire."""
    tracker.handle(record(Kind.OPEN))
    tracker.handle(pieces(real_hello("decoy.example"))[0])
    msg = close(tracker, sni=b"api.anthropic.com")
    assert (msg["sni"], msg["sni_source"]) == ("api.anthropic.com", "openssl")


def test_pieces_out_of_order_are_given_up_and_counted(tracker):
    tracker.handle(record(Kind.OPEN))
    first, second, third = pieces(real_hello("api.openai.com"), 60, 200)
    tracker.handle(first)
    tracker.handle(third)
    tracker.handle(second)
    msg = close(tracker)
    assert msg["sni"] is None and msg["sni_source"] is None
    assert tracker.stats.hello_gaps >= 1


def test_a_hello_for_an_unknown_connection_is_ignored(tracker):
    tracker.handle(pieces(real_hello("api.openai.com"))[0])
    assert tracker.take() == []


def test_progress_reports_growing_counts_then_the_close(tracker):
    tracker.handle(record(Kind.OPEN, sni=b"api.openai.com"))
    ends = ("127.0.0.1", 40000, "127.0.0.1", 443)
    tracker.progress({ends: (100, 200)}, START + SEC // 2, SEC)
    assert tracker.take() == []  # not open for an interval yet
    tracker.progress({ends: (300, 700)}, START + SEC, SEC)
    tracker.progress({ends: (350, 800)}, START + SEC + SEC // 2, SEC)
    tracker.progress({ends: (500, 900)}, START + 2 * SEC, SEC)
    reports = tracker.take()
    assert [(m["final"], m["bytes_sent"]) for m in reports] == [
        (False, 300),
        (False, 500),
    ]
    final = close(tracker)
    assert {m["conn_id"] for m in reports} == {final["conn_id"]}
    assert tracker.stats.progress == 2


def test_an_adopted_connection_ends_with_its_close_record(tracker):
    rec = record(Kind.OPEN, flags=Flag.ADOPTED, sock=77, start=5 * SEC)
    assert tracker.adopt(rec, 77, (10, 20))
    assert not tracker.adopt(rec, 77, (10, 20))  # once only
    tracker.handle(
        record(
            Kind.CLOSE,
            flags=Flag.ADOPTED,
            sock=0xFFFF888000000001,
            start=0,
            end=7 * SEC,
            acked=1234,
            received=5678,
        )
    )
    (msg,) = tracker.take()
    assert msg["final"] and msg["sni"] is None
    assert (msg["bytes_sent"], msg["bytes_received"]) == (1234, 5678)
    assert msg["pid"] == 4242 and msg["duration_ns"] == 2 * SEC


def test_an_adopted_connection_gone_from_a_dump_ends_with_the_last_counts(tracker):
    """It closed before the kernel side knew it: no close record comes."""
    rec = record(Kind.OPEN, flags=Flag.ADOPTED, sock=77, start=5 * SEC)
    tracker.adopt(rec, 77, (10, 20))
    tracker.progress({}, 6 * SEC, SEC)
    (msg,) = tracker.take()
    assert msg["final"] and (msg["bytes_sent"], msg["bytes_received"]) == (10, 20)


def test_a_connection_already_tracked_is_not_adopted(tracker):
    tracker.handle(record(Kind.OPEN))
    assert not tracker.adopt(record(Kind.OPEN, flags=Flag.ADOPTED, sock=9), 9, (0, 0))


def test_pieces_that_never_hold_the_name_count_as_truncated(tracker):
    tracker.handle(record(Kind.OPEN))
    tracker.handle(pieces(real_hello("api.openai.com"), 60)[0])
    assert close(tracker)["sni"] is None
    assert tracker.stats.hello["truncated"] == 1


def test_progress_skips_connections_without_a_name(tracker):
    """Nothing without a name can be classified: no report for it."""
    tracker.handle(record(Kind.OPEN))
    ends = ("127.0.0.1", 40000, "127.0.0.1", 443)
    tracker.progress({ends: (1, 2)}, START + SEC, SEC)
    assert tracker.take() == []
    # Once OpenSSL's name is bound to the socket, reports carry it.
    tracker.progress(
        {ends: (3, 4)}, START + 2 * SEC, SEC, bound_sni=lambda sock: b"api.openai.com"
    )
    (msg,) = tracker.take()
    assert (msg["sni"], msg["sni_source"], msg["bytes_sent"]) == (
        "api.openai.com",
        "openssl",
        3,
    )
