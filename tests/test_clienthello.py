"""The ClientHello parser: real hellos, a table of hostile ones, and fuzzing.

The corpus in tests/corpus/clienthello holds ClientHellos that real clients
sent: Python's OpenSSL, and, as the BPF object captured them, Node.js, Go's
crypto/tls and Java's JSSE (first connection and a resumed one). The fuzz
tests start from it and from random bytes.
"""

from __future__ import annotations

import ssl
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.collector.clienthello import Outcome, parse
from tests.harness import real_hello

CORPUS = Path(__file__).resolve().parent / "corpus/clienthello"


def record(payload: bytes, content_type: int = 22) -> bytes:
    return struct.pack("!BBBH", content_type, 3, 1, len(payload)) + payload


def hello(extensions: bytes, suites: bytes = b"\x13\x01") -> bytes:
    """A ClientHello handshake message with the given extensions block."""
    body = (
        b"\x03\x03"
        + b"\x00" * 32
        + b"\x00"
        + struct.pack("!H", len(suites))
        + suites
        + b"\x01\x00"
        + struct.pack("!H", len(extensions))
        + extensions
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body


def extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def sni_ext(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(struct.pack("!BH", t, len(n)) + n for t, n in names)
    return extension(0, struct.pack("!H", len(entries)) + entries)


@pytest.mark.parametrize(
    "name",
    [
        "api.openai.com",
        "API.Anthropic.COM",
        "xn--bcher-kva.example",
        ".".join(["a" * 63] * 3) + ".example",
    ],
)
def test_real_client_hellos(name: str) -> None:
    assert parse(real_hello(name)) == (Outcome.FOUND, name.encode())


@pytest.mark.parametrize(
    "file", ["node-api.openai.com", "go-api.openai.com", "java-api.openai.com"]
)
def test_captured_hellos_of_other_tls_stacks(file: str) -> None:
    data = (CORPUS / f"{file}.bin").read_bytes()
    assert parse(data) == (Outcome.FOUND, b"api.openai.com")


def test_a_resumed_java_hello_with_a_pre_shared_key() -> None:
    data = (CORPUS / "java-resumed.bin").read_bytes()
    assert parse(data) == (Outcome.FOUND, b"api.openai.com")


def test_real_tls12_hello_and_one_without_a_name() -> None:
    old = real_hello("api.openai.com", maximum_version=ssl.TLSVersion.TLSv1_2)
    assert parse(old).sni == b"api.openai.com"
    assert parse(real_hello(None)).outcome is Outcome.NO_SNI


def test_every_prefix_is_truncated_or_found() -> None:
    data = real_hello("api.openai.com")
    for cut in range(len(data)):
        got = parse(data[:cut])
        assert got.outcome in (Outcome.TRUNCATED, Outcome.FOUND), cut
        if got.outcome is Outcome.FOUND:
            assert got.sni == b"api.openai.com"


SNI = sni_ext((0, b"api.openai.com"))
HOSTILE = [
    ("nothing", b"", Outcome.TRUNCATED, None),
    (
        "http on 443",
        b"GET / HTTP/1.1\r\nHost: api.openai.com\r\n\r\n",
        Outcome.NOT_TLS,
        None,
    ),
    ("application data first", record(hello(SNI), 23), Outcome.NOT_TLS, None),
    ("sslv2 hello", b"\x80\x2e\x01\x00\x02" + b"\x00" * 44, Outcome.NOT_TLS, None),
    ("server hello", record(b"\x02" + hello(SNI)[1:]), Outcome.NOT_TLS, None),
    ("zero-length record", record(b""), Outcome.MALFORMED, None),
    (
        "record past the limit",
        b"\x16\x03\x01\xff\xff" + b"\x00" * 10,
        Outcome.MALFORMED,
        None,
    ),
    ("whole hello", record(hello(SNI)), Outcome.FOUND, b"api.openai.com"),
    (
        "hello over two records",
        record(hello(SNI)[:20]) + record(hello(SNI)[20:]),
        Outcome.FOUND,
        b"api.openai.com",
    ),
    ("first of two records only", record(hello(SNI)[:20]), Outcome.TRUNCATED, None),
    (
        "other extensions first",
        record(
            hello(
                extension(10, b"\x00\x02\x00\x1d")
                + extension(43, b"\x02\x03\x04")
                + SNI
            )
        ),
        Outcome.FOUND,
        b"api.openai.com",
    ),
    (
        "unknown name type before the host name",
        record(hello(sni_ext((7, b"opaque"), (0, b"api.anthropic.com")))),
        Outcome.FOUND,
        b"api.anthropic.com",
    ),
    ("empty host name", record(hello(sni_ext((0, b"")))), Outcome.MALFORMED, None),
    ("no extensions at all", record(hello(b"")), Outcome.NO_SNI, None),
    ("no server_name", record(hello(extension(10, b"\x00\x00"))), Outcome.NO_SNI, None),
    (
        "extension longer than its block",
        record(hello(struct.pack("!HH", 0, 500) + b"\x00\x10")),
        Outcome.MALFORMED,
        None,
    ),
    (
        "name list longer than the extension",
        record(hello(extension(0, b"\x00\x40\x00\x00\x03abc"))),
        Outcome.MALFORMED,
        None,
    ),
    (
        "odd cipher suites",
        record(hello(SNI, suites=b"\x13\x01\x13")),
        Outcome.MALFORMED,
        None,
    ),
    (
        "handshake length beyond the records",
        record(b"\x01\x00\x40\x00" + b"\x03\x03" + b"\x00" * 10)
        + b"\x17\x03\x03\x00\x01x",
        Outcome.MALFORMED,
        None,
    ),
    (
        "hostile bytes in the name",
        record(hello(sni_ext((0, b"api.openai.com\x00\xff\n<script>")))),
        Outcome.FOUND,
        b"api.openai.com\x00\xff\n<script>",
    ),
]


@pytest.mark.parametrize(
    ("data", "outcome", "sni"),
    [case[1:] for case in HOSTILE],
    ids=[case[0] for case in HOSTILE],
)
def test_hostile_input(data: bytes, outcome: Outcome, sni: bytes | None) -> None:
    assert parse(data) == (outcome, sni)


def test_a_hello_split_over_two_sends_parses_once_joined() -> None:
    data = real_hello("api.anthropic.com")
    first, second = data[:100], data[100:]
    assert parse(first).outcome is Outcome.TRUNCATED
    assert parse(first + second).sni == b"api.anthropic.com"


def corpus() -> list[bytes]:
    return [p.read_bytes() for p in sorted(CORPUS.iterdir())]


FUZZ = settings(
    max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_never_raise(data: bytes) -> None:
    assert parse(data).outcome in Outcome


@FUZZ
@given(
    st.sampled_from(corpus()),
    st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=8),
    st.integers(0, 600),
)
def test_fuzz_mutated_corpus_never_raises(
    seed: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed)
    for where, value in flips:
        if where < len(data):
            data[where] = value
    got = parse(bytes(data[: max(cut, 1)]))
    assert got.outcome in Outcome
    if got.outcome is Outcome.FOUND:
        assert got.sni and len(got.sni) <= len(data)
