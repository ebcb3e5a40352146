"""Turn the SNI bytes the kernel captured into a hostname the catalog can match.

The input crosses a privilege boundary and comes from whatever a traced program
put in its ClientHello, so nothing here raises on bad input: every value ends up
either as a canonical hostname or as one reason from a small fixed set, which
callers count by label.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum

# The kernel copies at most this many bytes of the name; RFC 1035 caps a name
# on the wire at 255 bytes, so anything longer is not a DNS name either way.
MAX_NAME_BYTES = 255
MAX_LABEL_BYTES = 63

# Letters, digits, '-' and '.', plus '_', which is not valid in a hostname but
# appears in real service names; anything else is hostile or broken.
_ALLOWED = re.compile(rb"[A-Za-z0-9_.-]+")
_DIGITS = re.compile(r"[0-9]+")


class SniReason(StrEnum):
    """Why an SNI value did not yield a hostname; the value is a metric label."""

    EMPTY = "empty"
    TOO_LONG = "too_long"
    INVALID = "invalid"
    IP_LITERAL = "ip_literal"


@dataclass(frozen=True, slots=True)
class Sni:
    """A normalized hostname, or the reason there is none; exactly one is set."""

    hostname: str | None
    reason: SniReason | None

    def __post_init__(self) -> None:
        if (self.hostname is None) == (self.reason is None):
            raise ValueError(
                f"Sni needs exactly one of hostname and reason, got "
                f"hostname={self.hostname!r} reason={self.reason!r}"
            )


def normalize_sni(raw: bytes | str | None, truncated: bool = False) -> Sni:
    """Return the canonical form of one SNI value, or the reason it has none.

    `truncated` is the kernel's word that the name did not fit its buffer; such
    a name is reported but never matched, since its tail is what identifies it.
    """
    if truncated:
        return _rejected(SniReason.TOO_LONG)
    if not raw:
        return _rejected(SniReason.EMPTY)

    # Work on bytes so length means what the kernel means by it; surrogatepass
    # lets any str be encoded, and the ASCII check below rejects the result.
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(data) > MAX_NAME_BYTES:
        return _rejected(SniReason.TOO_LONG)
    if not data.isascii():
        return _rejected(SniReason.INVALID)
    text = data.decode("ascii")

    # Addresses before the character check, which would call them invalid
    # because of ':' and brackets.
    if _is_ip_literal(text):
        return _rejected(SniReason.IP_LITERAL)
    if _ALLOWED.fullmatch(data) is None:
        return _rejected(SniReason.INVALID)

    # One trailing dot is the fully qualified spelling of the same name.
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if any(not label or len(label) > MAX_LABEL_BYTES for label in labels):
        return _rejected(SniReason.INVALID)

    # No top-level domain is all digits, and resolvers read such a name as an
    # address in a shorthand form ("127.1"), so it is not a hostname.
    if _DIGITS.fullmatch(labels[-1]):
        return _rejected(SniReason.IP_LITERAL)

    # Punycode labels (xn--) stay as they are: the catalog holds them in the
    # same form, and decoding hostile input is a risk with nothing to gain.
    return Sni(hostname=name, reason=None)


def _rejected(reason: SniReason) -> Sni:
    return Sni(hostname=None, reason=reason)


def _is_ip_literal(text: str) -> bool:
    """Whether text is an IPv4 or IPv6 address, bracketed or not."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    # Every IPv6 form has a ':' and every IPv4 one ends in a digit; checking
    # first spares ordinary names the cost of a failed parse.
    if ":" not in text and not text[-1:].isdigit():
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
