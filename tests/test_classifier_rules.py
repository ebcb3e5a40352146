"""SNI normalization and provider matching, without any kernel or socket."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from agent.classifier.catalog import (
    Catalog,
    CatalogError,
    Category,
    Match,
    MatchKind,
    estimate_tokens,
)
from agent.classifier.normalize import Sni, SniReason, normalize_sni


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def _name_of_length(length: int, tail: str) -> str:
    """A hostname of exactly `length` bytes, in labels of at most 63, ending in tail."""
    labels: list[str] = []
    remaining = length - len(tail)
    while remaining > 0:
        # Each label costs its own length plus one dot.
        size = min(63, remaining - 1)
        labels.append("a" * size)
        remaining -= size + 1
    name = ".".join([*labels, tail])
    assert len(name) == length
    return name


def _rule(kind: str, pattern: str, category: str = "api") -> str:
    return f'{{ match = "{kind}", pattern = "{pattern}", category = "{category}" }}'


def _provider(
    provider_id: str,
    *rules: str,
    ratio_in: str | None = "5.0",
    ratio_out: str | None = "50.0",
) -> str:
    """One [[provider]] table; a ratio of None leaves its key out."""
    lines = ["[[provider]]", f'id = "{provider_id}"', f'name = "{provider_id.title()}"']
    if ratio_in is not None:
        lines.append(f"bytes_per_token_in = {ratio_in}")
    if ratio_out is not None:
        lines.append(f"bytes_per_token_out = {ratio_out}")
    lines += ["rules = [", *(f"  {rule}," for rule in rules), "]", ""]
    return "\n".join(lines)


def _write(tmp_path: Path, *providers: str) -> str:
    path = tmp_path / "providers.toml"
    path.write_text("version = 1\n\n" + "\n".join(providers), encoding="utf-8")
    return str(path)


NAME_240 = _name_of_length(240, "openai.azure.com")
NAME_256 = _name_of_length(256, "openai.azure.com")


# raw SNI, truncated flag, expected hostname, reason, provider, category
CASES = [
    # Canonical form: case and one trailing dot.
    (b"API.OpenAI.com.", False, "api.openai.com", None, "openai", "api"),
    ("api.anthropic.com", False, "api.anthropic.com", None, "anthropic", "api"),
    (b"claude.ai", False, "claude.ai", None, "anthropic", "chat"),
    (b"chatgpt.com", False, "chatgpt.com", None, "openai", "chat"),
    (b"chat.openai.com", False, "chat.openai.com", None, "openai", "chat"),
    # Wildcards stay inside one label.
    (
        b"bedrock-runtime.eu-west-1.amazonaws.com",
        False,
        "bedrock-runtime.eu-west-1.amazonaws.com",
        None,
        "aws_bedrock",
        "api",
    ),
    (
        b"bedrock-runtime-fips.us-east-1.amazonaws.com",
        False,
        "bedrock-runtime-fips.us-east-1.amazonaws.com",
        None,
        "aws_bedrock",
        "api",
    ),
    (
        b"bedrock-runtime.a.b.amazonaws.com",
        False,
        "bedrock-runtime.a.b.amazonaws.com",
        None,
        None,
        None,
    ),
    (
        b"us-central1-aiplatform.googleapis.com",
        False,
        "us-central1-aiplatform.googleapis.com",
        None,
        "google_vertex",
        "api",
    ),
    (
        b"aiplatform.googleapis.com",
        False,
        "aiplatform.googleapis.com",
        None,
        "google_vertex",
        "api",
    ),
    (
        b"-aiplatform.googleapis.com",
        False,
        "-aiplatform.googleapis.com",
        None,
        None,
        None,
    ),
    # Suffixes on label boundaries only.
    (
        b"myres.openai.azure.com",
        False,
        "myres.openai.azure.com",
        None,
        "azure_openai",
        "api",
    ),
    (
        b"myres.privatelink.openai.azure.com",
        False,
        "myres.privatelink.openai.azure.com",
        None,
        "azure_openai",
        "api",
    ),
    (b"evilopenai.azure.com", False, "evilopenai.azure.com", None, None, None),
    (
        b"openai.azure.com.evil.example",
        False,
        "openai.azure.com.evil.example",
        None,
        None,
        None,
    ),
    (b"example.com", False, "example.com", None, None, None),
    (b"openai.com.evil.example", False, "openai.com.evil.example", None, None, None),
    (
        b"notapi.openai.com.attacker.net",
        False,
        "notapi.openai.com.attacker.net",
        None,
        None,
        None,
    ),
    (b"notapi.openai.com", False, "notapi.openai.com", None, None, None),
    (b"api.openai.com.", False, "api.openai.com", None, "openai", "api"),
    (
        b"x.us-east-1.aws.endpoints.huggingface.cloud",
        False,
        "x.us-east-1.aws.endpoints.huggingface.cloud",
        None,
        "huggingface",
        "inference",
    ),
    # Length: 240 bytes is a name, 256 or a truncated capture is flagged.
    (NAME_240.encode(), False, NAME_240, None, "azure_openai", "api"),
    (NAME_256.encode(), False, None, SniReason.TOO_LONG, None, None),
    (NAME_240[:200].encode(), True, None, SniReason.TOO_LONG, None, None),
    # Addresses are not hostnames.
    (b"1.2.3.4", False, None, SniReason.IP_LITERAL, None, None),
    (b"1.2.3.4.", False, None, SniReason.IP_LITERAL, None, None),
    (b"127.1", False, None, SniReason.IP_LITERAL, None, None),
    (b"2001:db8::1", False, None, SniReason.IP_LITERAL, None, None),
    (b"[::1]", False, None, SniReason.IP_LITERAL, None, None),
    (b"::ffff:1.2.3.4", False, None, SniReason.IP_LITERAL, None, None),
    (b"fe80::1%eth0", False, None, SniReason.IP_LITERAL, None, None),
    # Nothing there.
    (b"", False, None, SniReason.EMPTY, None, None),
    ("", False, None, SniReason.EMPTY, None, None),
    (None, False, None, SniReason.EMPTY, None, None),
    # Hostile or broken input is reported, never raised.
    (b"\xff\xfeapi.openai.com", False, None, SniReason.INVALID, None, None),
    ("api.öpenai.com", False, None, SniReason.INVALID, None, None),
    ("api.openai.com\udcff", False, None, SniReason.INVALID, None, None),
    (b"api.openai.com\x00", False, None, SniReason.INVALID, None, None),
    (b"api.openai.com\r\n", False, None, SniReason.INVALID, None, None),
    (b"api openai.com", False, None, SniReason.INVALID, None, None),
    (b"api%2eopenai.com", False, None, SniReason.INVALID, None, None),
    (b"[::1]:443", False, None, SniReason.INVALID, None, None),
    (b"a..b", False, None, SniReason.INVALID, None, None),
    (b".api.openai.com", False, None, SniReason.INVALID, None, None),
    (b"api.openai.com..", False, None, SniReason.INVALID, None, None),
    (b".", False, None, SniReason.INVALID, None, None),
    (
        ("a" * 64 + ".openai.azure.com").encode(),
        False,
        None,
        SniReason.INVALID,
        None,
        None,
    ),
    # Punycode stays punycode, lower-cased, never decoded.
    (b"XN--BCHER-KVA.example", False, "xn--bcher-kva.example", None, None, None),
    # Underscores appear in real service names and are accepted.
    (b"_srv.example.com", False, "_srv.example.com", None, None, None),
]


@pytest.mark.parametrize(
    ("raw", "truncated", "hostname", "reason", "provider", "category"), CASES
)
def test_normalize_and_match(
    catalog: Catalog,
    raw: bytes | str | None,
    truncated: bool,
    hostname: str | None,
    reason: SniReason | None,
    provider: str | None,
    category: str | None,
) -> None:
    sni = normalize_sni(raw, truncated=truncated)
    assert sni == Sni(hostname=hostname, reason=reason)

    found = catalog.match(sni.hostname) if sni.hostname is not None else None
    if provider is None:
        assert found is None
    else:
        assert found is not None
        assert (found.provider, found.category) == (provider, category)


def test_reasons_are_labels() -> None:
    assert {reason.value for reason in SniReason} == {
        "empty",
        "too_long",
        "invalid",
        "ip_literal",
    }


def test_sni_requires_exactly_one_field() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Sni(hostname=None, reason=None)
    with pytest.raises(ValueError, match="exactly one"):
        Sni(hostname="a.example", reason=SniReason.EMPTY)


def test_punycode_pattern_matches_punycode_name(tmp_path: Path) -> None:
    path = _write(
        tmp_path, _provider("idn", _rule("suffix", "xn--bcher-kva.example", "chat"))
    )
    sni = normalize_sni("API.XN--BCHER-KVA.example")
    found = Catalog.load(path).match(sni.hostname or "")
    assert found is not None and found.rule == "xn--bcher-kva.example"
    # The Unicode spelling is rejected, not encoded into a match.
    assert normalize_sni("api.bücher.example").reason is SniReason.INVALID


def test_match_carries_provider_details(catalog: Catalog) -> None:
    found = catalog.match("api.openai.com")
    assert isinstance(found, Match)
    assert (found.provider, found.provider_name) == ("openai", "OpenAI")
    assert (found.category, found.rule) == ("api", "api.openai.com")
    # A plain str, so every encoder downstream writes it as text.
    assert type(found.category) is str
    openai = next(p for p in catalog.providers if p.id == "openai")
    assert found.bytes_per_token_in == openai.bytes_per_token_in
    assert found.bytes_per_token_out == openai.bytes_per_token_out


# hostname, provider, category, rule that must win
PACKAGED_PRECEDENCE = [
    ("api.perplexity.ai", "perplexity", "api", "api.perplexity.ai"),
    ("www.perplexity.ai", "perplexity", "chat", "perplexity.ai"),
    (
        "api.githubcopilot.com",
        "github_copilot",
        "coding_assistant",
        "api.githubcopilot.com",
    ),
    (
        "api.individual.githubcopilot.com",
        "github_copilot",
        "coding_assistant",
        "githubcopilot.com",
    ),
    ("api2.cursor.sh", "cursor", "coding_assistant", "api2.cursor.sh"),
    ("repo42.cursor.sh", "cursor", "coding_assistant", "cursor.sh"),
]


@pytest.mark.parametrize(
    ("hostname", "provider", "category", "rule"), PACKAGED_PRECEDENCE
)
def test_packaged_precedence(
    catalog: Catalog, hostname: str, provider: str, category: str, rule: str
) -> None:
    found = catalog.match(hostname)
    assert found is not None
    assert (found.provider, found.category, found.rule) == (provider, category, rule)


# hostname, rule that must win (None: no match)
SYNTHETIC_PRECEDENCE = [
    # exact beats wildcard and suffix
    ("api.example.com", "api.example.com"),
    # wildcard beats suffix, and the one with more literal characters wins,
    # although the broader one comes first in the file
    ("eu-api.example.com", "*-api.example.com"),
    ("eu.example.com", "*.example.com"),
    ("deep.example.com", "*.example.com"),
    # longest suffix wins
    ("a.deep.example.com", "deep.example.com"),
    ("a.b.deep.example.com", "deep.example.com"),
    ("a.shallow.example.com", "example.com"),
    ("example.com", "example.com"),
    # wildcards never cross a dot
    ("a.b-api.example.com", "example.com"),
    ("other.net", None),
    ("example.com.other.net", None),
]


@pytest.mark.parametrize(("hostname", "rule"), SYNTHETIC_PRECEDENCE)
def test_synthetic_precedence(tmp_path: Path, hostname: str, rule: str | None) -> None:
    path = _write(
        tmp_path,
        _provider("broad", _rule("suffix", "example.com", "chat")),
        _provider(
            "narrow",
            _rule("suffix", "deep.example.com", "inference"),
            _rule("wildcard", "*.example.com", "aggregator"),
            _rule("wildcard", "*-api.example.com"),
            _rule("exact", "api.example.com"),
        ),
    )
    found = Catalog.load(path).match(hostname)
    assert (found.rule if found else None) == rule


# rules of one provider, text the error must contain
BROKEN = [
    (
        '{ match = "regex", pattern = "api.x.example", category = "api" }',
        "unknown match",
    ),
    ('{ match = "exact", pattern = "api.x.example", category = "ads" }', "category"),
    ('{ match = "exact", pattern = "api.x.example", category = 3 }', "category"),
    ('{ match = "exact", pattern = "API.x.example", category = "api" }', "lower-case"),
    ('{ match = "exact", pattern = "api.x.example.", category = "api" }', "lower-case"),
    ('{ match = "exact", pattern = "*.x.example", category = "api" }', "'*'"),
    ('{ match = "wildcard", pattern = "api.x.example", category = "api" }', "'*'"),
    ('{ match = "wildcard", pattern = "api.*.example", category = "api" }', "literal"),
    ('{ match = "suffix", pattern = "example", category = "api" }', "two labels"),
    (
        '{ match = "exact", pattern = "api.x.example", category = "api", x = 1 }',
        "unknown",
    ),
    ('{ match = "exact", category = "api" }', "pattern"),
]


@pytest.mark.parametrize(("rule", "message"), BROKEN)
def test_broken_rule_names_provider_and_rule(
    tmp_path: Path, rule: str, message: str
) -> None:
    path = _write(tmp_path, _provider("acme", _rule("exact", "ok.x.example"), rule))
    with pytest.raises(CatalogError, match=message) as caught:
        Catalog.load(path)
    text = str(caught.value)
    assert path in text
    assert "provider 'acme' rule 2" in text


def test_duplicate_exact_pattern_names_both_providers(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        _provider("first", _rule("exact", "api.x.example")),
        _provider(
            "second", _rule("suffix", "x.example"), _rule("exact", "api.x.example")
        ),
    )
    with pytest.raises(CatalogError) as caught:
        Catalog.load(path)
    text = str(caught.value)
    assert "provider 'second' rule 2 (pattern 'api.x.example')" in text
    assert "duplicate exact" in text and "'first'" in text


def test_duplicate_within_one_provider(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        _provider("acme", _rule("suffix", "x.example"), _rule("suffix", "x.example")),
    )
    with pytest.raises(CatalogError, match="provider 'acme' rule 2"):
        Catalog.load(path)


@pytest.mark.parametrize(
    ("ratio_in", "ratio_out", "message"),
    [
        ('"five"', "50.0", "bytes_per_token_in must be a positive number"),
        ("5", "0", "bytes_per_token_out must be a positive number"),
        ("5", "true", "bytes_per_token_out must be a positive number"),
        ("5", "nan", "bytes_per_token_out must be a positive number"),
        ("-5", "50", "bytes_per_token_in must be a positive number"),
        (None, "50", "missing bytes_per_token_in"),
        ("5", None, "missing bytes_per_token_out"),
    ],
)
def test_bad_ratios_name_provider(
    tmp_path: Path, ratio_in: str | None, ratio_out: str | None, message: str
) -> None:
    rule = _rule("exact", "api.x.example")
    path = _write(
        tmp_path, _provider("acme", rule, ratio_in=ratio_in, ratio_out=ratio_out)
    )
    with pytest.raises(CatalogError, match=f"provider 'acme': {message}"):
        Catalog.load(path)


def test_integer_ratios_are_accepted(tmp_path: Path) -> None:
    rule = _rule("exact", "api.x.example")
    path = _write(tmp_path, _provider("acme", rule, ratio_in="5", ratio_out="50"))
    found = Catalog.load(path).match("api.x.example")
    assert found is not None and found.bytes_per_token_out == 50.0


def test_unreadable_catalogs(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        Catalog.load(str(tmp_path / "absent.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("version = \n", encoding="utf-8")
    with pytest.raises(CatalogError, match="not valid TOML"):
        Catalog.load(str(bad))
    bad.write_text("version = 2\n", encoding="utf-8")
    with pytest.raises(CatalogError, match="version must be 1"):
        Catalog.load(str(bad))


def test_packaged_providers_are_sane(catalog: Catalog) -> None:
    ids = [provider.id for provider in catalog.providers]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 20
    for provider in catalog.providers:
        assert provider.rules, provider.id
        assert provider.name.strip(), provider.id
        # Text alone is about 4 bytes per token; framing only adds to it.
        assert 3.0 <= provider.bytes_per_token_in <= 20.0, provider.id
        assert 3.0 <= provider.bytes_per_token_out <= 500.0, provider.id
        assert provider.bytes_per_token_out >= provider.bytes_per_token_in, provider.id
        for rule in provider.rules:
            assert rule.kind in MatchKind
            assert rule.category in Category
            # Every rule is reachable: its own pattern (a sample name for a
            # wildcard) resolves to this provider.
            sample = rule.pattern.replace("*", "us-east-1")
            found = catalog.match(sample)
            assert found is not None and found.provider == provider.id, rule


@pytest.mark.parametrize(
    ("nbytes", "ratio", "tokens"),
    [
        (0, 5.0, 0),
        (1, 5.0, 0),
        (3, 5.0, 1),
        (5000, 5.0, 1000),
        (10_000, 200.0, 50),
        (2**63, 4.0, 2**61),
    ],
)
def test_estimate_tokens(nbytes: int, ratio: float, tokens: int) -> None:
    assert estimate_tokens(nbytes, ratio) == tokens


@pytest.mark.parametrize(
    ("nbytes", "ratio"),
    [(-1, 5.0), (10, 0.0), (10, -1.0), (10, math.inf), (10, math.nan)],
)
def test_estimate_tokens_rejects_nonsense(nbytes: int, ratio: float) -> None:
    with pytest.raises(ValueError):
        estimate_tokens(nbytes, ratio)
