"""Ring-buffer records from bpf/toktra_socket.bpf.c, decoded.

The layouts here mirror bpf/toktra_socket.h field for field; the record
carries a version byte so a mismatched object is refused, not misread.
"""

from __future__ import annotations

import enum
import os
import socket
import struct
from dataclasses import dataclass
from typing import NamedTuple

RECORD_VERSION = 2
MAX_PORTS = 16

RECORD = struct.Struct("<BBBBIIIQQQQQHHHH16s16s16s64s256s")
_CONFIG = struct.Struct(f"<{MAX_PORTS}HIIB3x")
_HELLO = struct.Struct("<BBBxHHIxxxxQQ")
HELLO_MAX = 2047
_LIBRARY = struct.Struct("<BBxxIQQ64s")
AF_INET6 = 10


class Kind(enum.IntEnum):
    OPEN = 1
    CLOSE = 2
    HELLO = 3
    LIBRARY = 4


class Flag(enum.IntFlag):
    SNI = 1
    SNI_TRUNCATED = 2
    IPV6 = 4
    ADOPTED = 8


_CONNECTION_KINDS = {k.value: k for k in (Kind.OPEN, Kind.CLOSE)}
_FLAGS = {value: Flag(value) for value in range(16)}
# Plain ints: reading an enum member's value costs more than a comparison.
_IPV6, _SNI = Flag.IPV6.value, Flag.SNI.value
_HELLO_KIND, _LIBRARY_KIND = Kind.HELLO.value, Kind.LIBRARY.value


class Stat(enum.IntEnum):
    """Indices of the per-CPU counters in the object's `stats` map."""

    RINGBUF_FULL = 0
    CONN_TRACKED = 1
    CONN_CLOSED = 2
    SNI_SET = 3
    SNI_BOUND = 4
    PENDING_STALE = 5
    READ_ERRORS = 6
    HELLO_CAPTURED = 7
    HELLO_NOT_TLS = 8
    HELLO_PARTIAL = 9
    LIBRARY_MAPPED = 10


class RecordError(ValueError):
    """A record that does not match the layout this agent knows."""


class Record(NamedTuple):
    """One connection's OPEN or CLOSE record.

    A named tuple, not a frozen dataclass: as immutable, and built three
    times faster, which counts at one record per connection event.
    """

    kind: Kind
    flags: Flag
    pid: int
    tid: int
    uid: int
    sock: int
    start_ns: int
    end_ns: int
    bytes_acked: int
    bytes_received: int
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    comm: str
    exe_name: str  # file name only; empty for kernel threads
    sni: bytes | None

    @property
    def sni_truncated(self) -> bool:
        return bool(self.flags & Flag.SNI_TRUNCATED)


@dataclass(frozen=True, slots=True)
class Hello:
    """A piece of a connection's first TLS record (its ClientHello)."""

    sock: int
    start_ns: int
    pid: int
    chunk: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Library:
    """A process mapped a libssl file the kernel side had not reported."""

    pid: int
    dev: int  # user space's encoding, comparable with os.stat().st_dev
    ino: int
    name: str


_V4_MAPPED = bytes(10) + b"\xff\xff"


def _address(raw: bytes, ipv6: bool) -> str:
    # inet_ntop, not ipaddress: this runs twice per record.
    if not ipv6:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    # A v4 peer reached through a dual-stack socket reads as ::ffff:a.b.c.d.
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode(data: bytes) -> Record | Hello | Library:
    """Any ring-buffer record, by its kind byte; raises RecordError."""
    if len(data) < 2:
        raise RecordError(f"record of {len(data)} bytes")
    if data[0] != RECORD_VERSION:
        raise RecordError(
            f"record version {data[0]}, this agent reads {RECORD_VERSION}"
        )
    kind = data[1]
    if kind == _HELLO_KIND:
        return _decode_hello(data)
    if kind == _LIBRARY_KIND:
        return _decode_library(data)
    return _decode_connection(data)


def _decode_hello(data: bytes) -> Hello:
    if len(data) < _HELLO.size:
        raise RecordError(f"hello record of {len(data)} bytes")
    _v, _k, chunk, offset, length, pid, sock, start_ns = _HELLO.unpack_from(data)
    if length > HELLO_MAX or _HELLO.size + length > len(data):
        raise RecordError(f"hello record claims {length} bytes")
    body = bytes(data[_HELLO.size : _HELLO.size + length])
    return Hello(sock, start_ns, pid, chunk, offset, body)


def _decode_library(data: bytes) -> Library:
    if len(data) < _LIBRARY.size:
        raise RecordError(f"library record of {len(data)} bytes")
    _v, _k, pid, kdev, ino, name = _LIBRARY.unpack_from(data)
    # The kernel keeps dev_t as major << 20 | minor.
    dev = os.makedev(kdev >> 20, kdev & 0xFFFFF)
    return Library(pid, dev, ino, _cstr(name))


def _decode_connection(data: bytes) -> Record:
    if len(data) < RECORD.size:
        raise RecordError(f"record of {len(data)} bytes, expected {RECORD.size}")
    (
        _version,
        kind,
        flags,
        _family,
        pid,
        tid,
        uid,
        sock,
        start_ns,
        end_ns,
        acked,
        received,
        sport,
        dport,
        sni_len,
        _pad,
        saddr,
        daddr,
        comm,
        exe,
        sni,
    ) = RECORD.unpack_from(data)
    # Looked up, not constructed: enum calls cost more than the rest here.
    known = _CONNECTION_KINDS.get(kind)
    if known is None:
        raise RecordError(f"unknown record kind {kind}")
    ipv6 = bool(flags & _IPV6)
    name = sni[: min(sni_len, len(sni) - 1)] if flags & _SNI else None
    return Record(
        kind=known,
        flags=_FLAGS[flags] if flags in _FLAGS else Flag(flags),
        pid=pid,
        tid=tid,
        uid=uid,
        sock=sock,
        start_ns=start_ns,
        end_ns=end_ns,
        bytes_acked=acked,
        bytes_received=received,
        src_ip=_address(saddr, ipv6),
        src_port=sport,
        dst_ip=_address(daddr, ipv6),
        dst_port=dport,
        comm=_cstr(comm),
        exe_name=_cstr(exe),
        sni=name,
    )


def encode_config(
    ports: tuple[int, ...], pending_ttl_ms: int, bind_on_syscall: bool = False
) -> bytes:
    """The object's `cfg` read-only data: watched ports, TTL, send hook."""
    if not 1 <= len(ports) <= MAX_PORTS:
        raise ValueError(f"between 1 and {MAX_PORTS} ports, got {len(ports)}")
    padded = list(ports) + [0] * (MAX_PORTS - len(ports))
    return _CONFIG.pack(*padded, len(ports), pending_ttl_ms, int(bind_on_syscall))
