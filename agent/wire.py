"""Messages between stages: one versioned JSON schema per message type.

Data crosses a privilege boundary here (root collector -> unprivileged
classifier), so messages are plain JSON, never pickle, and every received
message is checked field by field before use. A message that fails the
check raises WireError; the receiving stage counts and drops it.

  connection  collector  -> classifier   one TCP connection's metadata
  open_set    collector  -> classifier   the open connections that have a
                                         name by now (connection bodies with
                                         final false), for the table
  event       classifier -> shipper      a classified connection event

Connections and events travel in batches: a message holds `bodies`, a list
of up to MAX_BATCH of them, so a stage pays one send, one encoding and one
wake-up of its peer per batch instead of per connection. A receiver also
takes the single `body` form. One bad body in a batch is dropped and
counted alone; the others go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

VERSION = 1

_Int = (int,)
_Str = (str,)
_Bool = (bool,)

# Upper bounds: what the kernel and the protocols allow, so a value no real
# connection has (a 2**100 byte count, a port of 70000, a megabyte name)
# is refused here and never reaches a receiver that stores int64.
U64 = 2**63 - 1  # int64, what receivers store
U32 = 2**32 - 1
PORT = 65535
ID_CHARS = 64  # conn_id and event_id are hex digests
COMM_CHARS = 64  # 15 bytes from the kernel, each may decode to one character
PATH_CHARS = 4096  # PATH_MAX
IP_CHARS = 45  # the longest IPv6 text form
NAME_CHARS = 2048  # a name from a captured ClientHello, at most its 2047 bytes
LABEL_CHARS = 255
SNI_SOURCES = ("openssl", "clienthello")

# field -> (accepted types, may be null, bound: largest int or longest str)
Schema = dict[str, tuple[tuple[type, ...], bool, int]]

CONNECTION_FIELDS: Schema = {
    "conn_id": (_Str, False, ID_CHARS),
    "final": (_Bool, False, 1),
    "timestamp": (_Int, False, U64),
    "duration_ns": (_Int, False, U64),
    "pid": (_Int, False, U32),
    "tid": (_Int, False, U32),
    "comm": (_Str, False, COMM_CHARS),
    "exe": (_Str, True, PATH_CHARS),
    "uid": (_Int, False, U32),
    "src_port": (_Int, False, PORT),
    "dst_ip": (_Str, False, IP_CHARS),
    "dst_port": (_Int, False, PORT),
    # The name exactly as the client passed it, one character per byte
    # (latin-1), so that hostile bytes survive JSON for the classifier
    # to judge; null when no name was seen.
    "sni": (_Str, True, NAME_CHARS),
    "sni_truncated": (_Bool, False, 1),
    "sni_source": (_Str, True, LABEL_CHARS),  # one of SNI_SOURCES
    "bytes_sent": (_Int, False, U64),
    "bytes_received": (_Int, False, U64),
}

EVENT_FIELDS: Schema = {
    "event_id": (_Str, False, ID_CHARS),
    "conn_id": (_Str, False, ID_CHARS),
    "final": (_Bool, False, 1),
    "timestamp": (_Int, False, U64),
    "duration_ns": (_Int, False, U64),
    "pid": (_Int, False, U32),
    "comm": (_Str, False, COMM_CHARS),
    "exe": (_Str, True, PATH_CHARS),
    "uid": (_Int, False, U32),
    "user": (_Str, True, LABEL_CHARS),
    "src_port": (_Int, False, PORT),
    "dst_ip": (_Str, False, IP_CHARS),
    "dst_port": (_Int, False, PORT),
    "dst_hostname": (_Str, True, LABEL_CHARS),
    "sni_source": (_Str, True, LABEL_CHARS),  # one of SNI_SOURCES
    "bytes_sent": (_Int, False, U64),
    "bytes_received": (_Int, False, U64),
    "provider": (_Str, False, LABEL_CHARS),
    "category": (_Str, False, LABEL_CHARS),
    "est_tokens_in": (_Int, False, U64),
    "est_tokens_out": (_Int, False, U64),
}

SCHEMAS = {"connection": CONNECTION_FIELDS, "event": EVENT_FIELDS}
MAX_MESSAGE_BYTES = 64 * 1024


class WireError(ValueError):
    """A message that does not match its schema; `bodies` is how many it
    held, where that could be read, so a refused batch is counted whole."""

    def __init__(self, message: str, bodies: int = 1) -> None:
        super().__init__(message)
        self.bodies = bodies


def _check(kind: str, body: Any) -> dict[str, Any]:
    schema = SCHEMAS[kind]
    if type(body) is not dict:
        raise WireError(f"{kind}: body is {type(body).__name__}, not an object")
    if len(body) != len(schema) or body.keys() != schema.keys():
        missing = schema.keys() - body.keys()
        extra = body.keys() - schema.keys()
        raise WireError(f"{kind}: missing {sorted(missing)} unexpected {sorted(extra)}")
    # This runs for every body that crosses: the exact type (all JSON
    # yields) is tried first. bool, an int subclass, must not pass for an int.
    for name, (types, nullable, bound) in schema.items():
        value = body[name]
        value_type = type(value)
        if value_type not in types:
            if value is None:
                if not nullable:
                    raise WireError(f"{kind}.{name} is null")
                continue
            if value_type is bool:
                raise WireError(f"{kind}.{name} is a boolean")
            if not isinstance(value, types):
                raise WireError(f"{kind}.{name} is {value_type.__name__}")
        if isinstance(value, int):
            if value < 0:
                raise WireError(f"{kind}.{name} is negative")
            if value > bound:
                raise WireError(f"{kind}.{name} is over {bound}")
        elif isinstance(value, str) and len(value) > bound:
            raise WireError(f"{kind}.{name} is longer than {bound} characters")
    source = body["sni_source"]
    if source is not None and source not in SNI_SOURCES:
        raise WireError(
            f"{kind}.sni_source {source[:40]!r} is not one of {SNI_SOURCES}"
        )
    return body


def encode(kind: str, body: dict[str, Any]) -> bytes:
    """Serializes a message, checking it first so bugs fail at the sender."""
    _check(kind, body)
    return json.dumps(
        {"type": kind, "v": VERSION, "body": body}, separators=(",", ":")
    ).encode()


def _envelope(kind: str, data: bytes, max_bytes: int) -> dict[str, Any]:
    """A message of the given type, after the envelope checks."""
    if len(data) > max_bytes:
        raise WireError(f"{kind}: message of {len(data)} bytes is too large")
    try:
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        # RecursionError: deeply nested arrays fit in a small message.
        raise WireError(f"{kind}: not JSON ({e.__class__.__name__})") from None
    if not isinstance(msg, dict):
        raise WireError(f"{kind}: not an object")
    version = msg.get("v")
    if isinstance(version, bool):
        version = None
    if msg.get("type") != kind or version != VERSION:
        raise WireError(
            f"expected {kind} v{VERSION}, got {msg.get('type')!r} v{msg.get('v')!r}"
        )
    return msg


def _body(kind: str, data: bytes, max_bytes: int) -> Any:
    return _envelope(kind, data, max_bytes).get("body")


def decode(kind: str, data: bytes) -> dict[str, Any]:
    """Parses and checks a single-body message of the expected kind."""
    return _check(kind, _body(kind, data, MAX_MESSAGE_BYTES))


MAX_BATCH = 500
MAX_BATCH_BYTES = 4 * 1024 * 1024


def check(kind: str, body: Any) -> dict[str, Any]:
    """The body if it matches its schema; raises WireError otherwise."""
    return _check(kind, body)


def encode_batch(
    kind: str, bodies: list[dict[str, Any]], checked: bool = False
) -> bytes:
    """One message carrying up to MAX_BATCH bodies, each checked first
    unless the caller did (`checked`)."""
    if not 0 < len(bodies) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH} bodies, not {len(bodies)}")
    if not checked:
        for body in bodies:
            _check(kind, body)
    return json.dumps(
        {"type": kind, "v": VERSION, "bodies": bodies}, separators=(",", ":")
    ).encode()


@dataclass
class Batch:
    """What a received message held: the good bodies and why others failed."""

    bodies: list[dict[str, Any]]
    errors: list[str]


def decode_batch(kind: str, data: bytes) -> Batch:
    """A batch or single message of the given kind, body by body.

    Raises WireError when the message as a whole is unusable (not JSON,
    wrong type or version, too large); a bad body only lands in `errors`.
    """
    msg = _envelope(kind, data, MAX_BATCH_BYTES)
    if "bodies" not in msg:
        if len(data) > MAX_MESSAGE_BYTES:
            raise WireError(f"{kind}: message of {len(data)} bytes is too large")
        return Batch([_check(kind, msg.get("body"))], [])
    bodies = msg["bodies"]
    if type(bodies) is not list or not 0 < len(bodies) <= MAX_BATCH:
        raise WireError(
            f"{kind}: bodies is not a list of 1 to {MAX_BATCH}",
            len(bodies) if type(bodies) is list and bodies else 1,
        )
    batch = Batch([], [])
    for body in bodies:
        try:
            batch.bodies.append(_check(kind, body))
        except WireError as e:
            batch.errors.append(str(e))
    return batch


def bodies_of(data: bytes) -> list[Any]:
    """The bodies of any message, unchecked, for display (`toktra-agent tap`)."""
    msg = json.loads(data)
    if type(msg) is not dict:
        return [msg]
    if type(msg.get("bodies")) is list:
        return msg["bodies"]
    return [msg.get("body", msg)]


MAX_OPEN_SET = 2000
MAX_OPEN_SET_BYTES = 2 * 1024 * 1024


def encode_open_set(connections: list[dict[str, Any]]) -> bytes:
    for conn in connections:
        _check("connection", conn)
    return json.dumps(
        {"type": "open_set", "v": VERSION, "body": {"connections": connections}},
        separators=(",", ":"),
    ).encode()


def decode_open_set(data: bytes) -> list[dict[str, Any]]:
    body = _body("open_set", data, MAX_OPEN_SET_BYTES)
    conns = body.get("connections") if isinstance(body, dict) else None
    if not isinstance(conns, list) or len(conns) > MAX_OPEN_SET:
        raise WireError("open_set: connections is not a list of a sane length")
    return [_check("connection", conn) for conn in conns]


def kind_of(data: bytes) -> str:
    """The message's type, read cheaply, so the receiver can pick a decoder."""
    return "open_set" if data.startswith(b'{"type":"open_set"') else "connection"
