"""The classifier stage's decision on whole connection messages, including
names that arrive as hostile bytes from the kernel."""

from __future__ import annotations

import pytest

from agent import wire
from agent.classifier.catalog import Catalog
from agent.classifier.stage import Classifier


def connection(sni: bytes | None, truncated: bool = False, **over) -> dict:
    conn = {
        "conn_id": "c" * 24,
        "final": True,
        "timestamp": 1_700_000_000_000_000_000,
        "duration_ns": 5_000_000,
        "pid": 4242,
        "tid": 4243,
        "comm": "python3",
        "exe": "/usr/bin/python3.11",
        "uid": 0,
        "src_port": 40000,
        "dst_ip": "192.0.2.10",
        "dst_port": 443,
        "sni": sni.decode("latin-1") if sni is not None else None,
        "sni_truncated": truncated,
        "sni_source": "openssl" if sni is not None else None,
        "bytes_sent": 1000,
        "bytes_received": 20000,
    }
    conn.update(over)
    # What the classifier gets has been through the wire format.
    return wire.decode("connection", wire.encode("connection", conn))


@pytest.fixture(scope="module")
def classifier():
    return Classifier(Catalog.load())


AZURE_240 = (
    ("a" * 60 + ".") * 3
    + "b" * (240 - 183 - len(".openai.azure.com"))
    + ".openai.azure.com"
)

CASES = [
    (b"API.OpenAI.com.", ("api.openai.com", "openai", "api"), None),
    (AZURE_240.encode(), (AZURE_240, "azure_openai", "api"), None),
    (
        b"bedrock-runtime.eu-west-1.amazonaws.com",
        ("bedrock-runtime.eu-west-1.amazonaws.com", "aws_bedrock", "api"),
        None,
    ),
    (
        b"us-central1-aiplatform.googleapis.com",
        ("us-central1-aiplatform.googleapis.com", "google_vertex", "api"),
        None,
    ),
    (b"203.0.113.7", None, "ip_literal"),
    (b"2001:db8::1", None, "ip_literal"),
    (b"", None, "empty"),
    (None, None, "empty"),
    (b"\xff\xfeapi.openai.com", None, "invalid"),
    (b"api.openai.com\x00evil", None, "invalid"),
    (b"api.openai.com.attacker.example", None, "no_provider"),
    (b"www.example.org", None, "no_provider"),
]


@pytest.mark.parametrize(("raw", "expected", "reason"), CASES)
def test_classify(classifier, raw, expected, reason):
    before = classifier.unmatched.copy()
    event = classifier.classify(connection(raw))
    if expected is None:
        assert event is None
        assert classifier.unmatched[reason] == before[reason] + 1
        return
    host, provider, category = expected
    assert len(AZURE_240) == 240
    assert event is not None
    assert (event["dst_hostname"], event["provider"], event["category"]) == (
        host,
        provider,
        category,
    )
    wire.encode("event", event)  # the event matches the shipper's schema


def test_name_longer_than_the_kernel_buffer_is_never_matched(classifier):
    raw = b"x" * 200 + b".api.openai.com"
    assert classifier.classify(connection(raw[:255], truncated=True)) is None
    assert classifier.classify(connection(b"a" * 256)) is None


def test_event_carries_user_and_estimates(classifier):
    event = classifier.classify(connection(b"api.anthropic.com"))
    assert event["user"] == "root"
    assert event["exe"] == "/usr/bin/python3.11"
    assert event["est_tokens_in"] > 0 and event["est_tokens_out"] > 0
    assert (
        event["event_id"]
        != classifier.classify(connection(b"api.anthropic.com"))["event_id"]
    )


def test_unknown_uid_has_no_user(classifier):
    event = classifier.classify(connection(b"api.openai.com", uid=4_000_000))
    assert event["user"] is None
