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
"""

from __future__ import annotations

import json
from typing import Any

VERSION = 1

_Int = (int,)
_Str = (str,)
_Bool = (bool,)
_Num = (int, float)

# field -> (accepted types, may be null)
CONNECTION_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "conn_id": (_Str, False),
    "final": (_Bool, False),
    "timestamp": (_Int, False),
    "duration_ns": (_Int, False),
    "pid": (_Int, False),
    "tid": (_Int, False),
    "comm": (_Str, False),
    "exe": (_Str, True),
    "uid": (_Int, False),
    "src_port": (_Int, False),
    "dst_ip": (_Str, False),
    "dst_port": (_Int, False),
    # The name exactly as the client passed it, one character per byte
    # (latin-1), so that hostile bytes survive JSON for the classifier
    # to judge; null when no name was seen.
    "sni": (_Str, True),
    "sni_truncated": (_Bool, False),
    "sni_source": (_Str, True),
    "bytes_sent": (_Int, False),
    "bytes_received": (_Int, False),
}

EVENT_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "event_id": (_Str, False),
    "conn_id": (_Str, False),
    "final": (_Bool, False),
    "timestamp": (_Int, False),
    "duration_ns": (_Int, False),
    "pid": (_Int, False),
    "comm": (_Str, False),
    "exe": (_Str, True),
    "uid": (_Int, False),
    "user": (_Str, True),
    "src_port": (_Int, False),
    "dst_ip": (_Str, False),
    "dst_port": (_Int, False),
    "dst_hostname": (_Str, True),
    "sni_source": (_Str, True),
    "bytes_sent": (_Int, False),
    "bytes_received": (_Int, False),
    "provider": (_Str, False),
    "category": (_Str, False),
    "est_tokens_in": (_Int, False),
    "est_tokens_out": (_Int, False),
}

SCHEMAS = {"connection": CONNECTION_FIELDS, "event": EVENT_FIELDS}
MAX_MESSAGE_BYTES = 64 * 1024


class WireError(ValueError):
    """A message that does not match its schema."""


def _check(kind: str, body: Any) -> dict[str, Any]:
    schema = SCHEMAS[kind]
    if not isinstance(body, dict):
        raise WireError(f"{kind}: body is {type(body).__name__}, not an object")
    missing = schema.keys() - body.keys()
    extra = body.keys() - schema.keys()
    if missing or extra:
        raise WireError(f"{kind}: missing {sorted(missing)} unexpected {sorted(extra)}")
    for name, (types, nullable) in schema.items():
        value = body[name]
        if value is None:
            if not nullable:
                raise WireError(f"{kind}.{name} is null")
            continue
        # bool is an int subclass; an int field must not take true/false.
        if isinstance(value, bool) and bool not in types:
            raise WireError(f"{kind}.{name} is a boolean")
        if not isinstance(value, types):
            raise WireError(f"{kind}.{name} is {type(value).__name__}")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise WireError(f"{kind}.{name} is negative")
    return body


def encode(kind: str, body: dict[str, Any]) -> bytes:
    """Serializes a message, checking it first so bugs fail at the sender."""
    _check(kind, body)
    return json.dumps(
        {"type": kind, "v": VERSION, "body": body}, separators=(",", ":")
    ).encode()


def _body(kind: str, data: bytes, max_bytes: int) -> Any:
    """The body of a message of the given type, after the envelope checks."""
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
    return msg.get("body")


def decode(kind: str, data: bytes) -> dict[str, Any]:
    """Parses and checks a message of the expected kind."""
    return _check(kind, _body(kind, data, MAX_MESSAGE_BYTES))


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
