"""The server name from a TLS ClientHello, for clients whose library we do not hook.

In: the first bytes a client sent on a connection (bounded; possibly cut
short, possibly from two sends joined). Out: the server_name the client put
in its ClientHello, or why there is none.

The input is hostile by assumption: any process can send anything to port
443. Every length is checked against what is left before it is used; nothing
is read past the buffer, nothing is allocated by a length field, and a
ClientHello spread over several TLS records is reassembled only up to
MAX_HANDSHAKE bytes. Only the ClientHello is ever looked at.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXTENSION_SERVER_NAME = 0
NAME_TYPE_HOST = 0
RECORD_HEADER = 5
MAX_RECORD = 16384 + 2048  # TLSPlaintext limit, with room for old stacks
MAX_HANDSHAKE = 65536


class Outcome(enum.StrEnum):
    FOUND = "found"
    NO_SNI = "no_sni"  # a whole ClientHello without server_name
    TRUNCATED = "truncated"  # what was captured ends before the name
    NOT_TLS = "not_tls"  # not a TLS handshake record
    MALFORMED = "malformed"  # lengths that do not fit together


class Parsed(NamedTuple):
    outcome: Outcome
    sni: bytes | None = None


class _Short(Exception):
    """The bytes end before a field does."""


class _Bad(Exception):
    """A field contradicts another."""


class _NotTls(Exception):
    """The stream does not start with a TLS handshake."""


class _Reader:
    """Bounds-checked reads; `cut` says the bytes end before the data did."""

    def __init__(self, data: bytes | memoryview, cut: bool = False) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.cut = cut

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> memoryview:
        if n > self.left():
            raise _Short
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def sub(self, n: int) -> _Reader:
        """The next n bytes as a reader; fewer, marked cut, if that is all."""
        if n <= self.left():
            return _Reader(self.take(n))  # whole, whatever follows it
        if not self.cut:
            raise _Short
        return _Reader(self.take(self.left()), cut=True)

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        b = self.take(2)
        return b[0] << 8 | b[1]

    def u24(self) -> int:
        b = self.take(3)
        return b[0] << 16 | b[1] << 8 | b[2]


def _handshake_bytes(data: bytes) -> _Reader:
    """The payload of the leading handshake records, joined."""
    reader = _Reader(data)
    payload = bytearray()
    while reader.left() > 0:
        if reader.left() < RECORD_HEADER:
            return _Reader(bytes(payload), cut=True)
        content_type = reader.u8()
        major = reader.u8()
        reader.u8()  # minor version: anything from SSL 3.0 on is accepted
        length = reader.u16()
        if content_type != RECORD_HANDSHAKE or major != 3:
            if not payload:
                raise _NotTls
            # Another kind of record: the handshake bytes end here for sure.
            return _Reader(bytes(payload))
        if length == 0 or length > MAX_RECORD:
            raise _Bad(f"record length {length}")
        chunk = reader.data[reader.pos : reader.pos + length]
        reader.pos += len(chunk)
        payload += chunk
        if len(payload) > MAX_HANDSHAKE:
            raise _Bad("handshake larger than any ClientHello")
        if len(chunk) < length:
            return _Reader(bytes(payload), cut=True)
    # Ended on a record boundary: a ClientHello may still continue in the
    # next record, which the capture did not include.
    return _Reader(bytes(payload), cut=True)


def _server_name(extensions: _Reader) -> bytes | None:
    while extensions.left() > 0:
        kind = extensions.u16()
        body = extensions.sub(extensions.u16())
        if kind != EXTENSION_SERVER_NAME:
            continue
        names = body.sub(body.u16())
        if body.left():
            raise _Bad("bytes after the server_name list")
        while names.left() > 0:
            name_type = names.u8()
            name = bytes(names.take(names.u16()))
            if name_type == NAME_TYPE_HOST:
                if not name:
                    raise _Bad("empty host_name")
                return name
        if names.cut:
            raise _Short
        return None
    if extensions.cut:
        raise _Short  # the name may be in what was not captured
    return None


def parse(data: bytes) -> Parsed:
    """The SNI from the start of a client's stream; never raises."""
    if not data:
        return Parsed(Outcome.TRUNCATED)
    cut = True
    try:
        reader = _handshake_bytes(data)
        cut = reader.cut
        if reader.u8() != HANDSHAKE_CLIENT_HELLO:
            return Parsed(Outcome.NOT_TLS)
        length = reader.u24()
        if length > MAX_HANDSHAKE:
            return Parsed(Outcome.MALFORMED)
        hello = reader.sub(length)
        cut = hello.cut
        hello.take(2 + 32)  # client_version, random
        hello.take(hello.u8())  # session_id
        suites = hello.u16()
        if suites % 2:
            raise _Bad("odd cipher_suites length")
        hello.take(suites)
        hello.take(hello.u8())  # compression_methods
        if hello.left() == 0 and not hello.cut:
            return Parsed(Outcome.NO_SNI)  # a ClientHello without extensions
        extensions = hello.sub(hello.u16())
        if hello.left():
            raise _Bad("bytes after the extensions")
        name = _server_name(extensions)
    except _NotTls:
        return Parsed(Outcome.NOT_TLS)
    except _Short:
        # Past the end of the bytes: the capture was cut, or the lengths lie.
        return Parsed(Outcome.TRUNCATED if cut else Outcome.MALFORMED)
    except _Bad:
        return Parsed(Outcome.MALFORMED)
    if name is None:
        return Parsed(Outcome.NO_SNI)
    return Parsed(Outcome.FOUND, name)
