"""The catalog of LLM providers and the hostname rules that identify them.

In: a hostname already canonical (from `normalize.normalize_sni`). Out: the
provider, the kind of endpoint and the ratios used to estimate tokens from
bytes, or None for a destination that is not an LLM provider.

The data lives in `providers.toml` next to this module; a deployment may load
its own file instead. Every file is checked completely on load, so a broken
catalog fails start-up rather than silently classifying less.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from agent.classifier.normalize import normalize_sni

CATALOG_VERSION = 1
PACKAGED_CATALOG = "providers.toml"
_PACKAGE = "agent.classifier"

_PROVIDER_ID = re.compile(r"[a-z][a-z0-9_]*")
_PROVIDER_KEYS = frozenset(
    {"id", "name", "bytes_per_token_in", "bytes_per_token_out", "rules"}
)
_RULE_KEYS = frozenset({"match", "pattern", "category"})


class CatalogError(ValueError):
    """A catalog file that cannot be read or breaks a rule of its schema."""


class MatchKind(StrEnum):
    EXACT = "exact"
    WILDCARD = "wildcard"
    SUFFIX = "suffix"


class Category(StrEnum):
    """What kind of endpoint a hostname is; the value is shipped as is."""

    API = "api"
    CHAT = "chat"
    CODING_ASSISTANT = "coding_assistant"
    AGGREGATOR = "aggregator"
    INFERENCE = "inference"


_KINDS = tuple(kind.value for kind in MatchKind)
_CATEGORIES = tuple(category.value for category in Category)


@dataclass(frozen=True, slots=True)
class Rule:
    kind: MatchKind
    pattern: str
    category: Category


@dataclass(frozen=True, slots=True)
class Provider:
    id: str
    name: str
    bytes_per_token_in: float
    bytes_per_token_out: float
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class Match:
    """The outcome of a lookup; `rule` is the pattern that matched."""

    provider: str
    provider_name: str
    category: str
    rule: str
    bytes_per_token_in: float
    bytes_per_token_out: float


@dataclass(frozen=True, slots=True)
class _Wildcard:
    regex: re.Pattern[str]
    literal_chars: int
    match: Match


class Catalog:
    """Hostname lookups against a validated set of providers.

    Precedence: an exact rule, then a wildcard (the one with the most literal
    characters, then the first in the file), then the longest suffix.
    """

    def __init__(self, providers: Iterable[Provider], source: str = "catalog") -> None:
        self._providers = tuple(providers)
        self._exact: dict[str, Match] = {}
        self._suffix: dict[str, Match] = {}
        # Wildcards are bucketed by label count and their two literal final
        # labels, so a lookup tries only the few that could possibly match.
        self._wildcards: dict[tuple[int, str], list[_Wildcard]] = {}
        owners: dict[tuple[MatchKind, str], str] = {}

        for provider in self._providers:
            for index, rule in enumerate(provider.rules, start=1):
                owner = owners.get((rule.kind, rule.pattern))
                if owner is not None:
                    raise CatalogError(
                        f"{source}: {_where(provider.id, index, rule.pattern)}: "
                        f"duplicate {rule.kind} pattern, already defined by "
                        f"provider {owner!r}"
                    )
                owners[(rule.kind, rule.pattern)] = provider.id
                self._add(provider, rule)

        for bucket in self._wildcards.values():
            bucket.sort(key=lambda wildcard: -wildcard.literal_chars)

    @classmethod
    def load(cls, path: str | None = None) -> Catalog:
        """Read and validate a catalog file; None means the packaged one."""
        source = path or f"{_PACKAGE}/{PACKAGED_CATALOG}"
        try:
            if path is None:
                resource = resources.files(_PACKAGE).joinpath(PACKAGED_CATALOG)
                text = resource.read_text(encoding="utf-8")
            else:
                text = Path(path).read_text(encoding="utf-8")
            document = tomllib.loads(text)
        except (OSError, UnicodeDecodeError) as exc:
            raise CatalogError(f"{source}: cannot read catalog: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise CatalogError(f"{source}: not valid TOML: {exc}") from exc
        return cls(_parse(document, source), source)

    @property
    def providers(self) -> tuple[Provider, ...]:
        return self._providers

    def match(self, hostname: str) -> Match | None:
        """Classify a canonical hostname; None if no provider claims it."""
        found = self._exact.get(hostname)
        if found is not None:
            return found

        for wildcard in self._wildcards.get(_wildcard_key(hostname), ()):
            if wildcard.regex.fullmatch(hostname):
                return wildcard.match

        # The name itself, then each shorter tail that starts on a label
        # boundary; the first hit is the longest suffix.
        start = 0
        while True:
            found = self._suffix.get(hostname[start:])
            if found is not None:
                return found
            dot = hostname.find(".", start)
            if dot < 0:
                return None
            start = dot + 1

    def _add(self, provider: Provider, rule: Rule) -> None:
        match = Match(
            provider=provider.id,
            provider_name=provider.name,
            category=rule.category.value,
            rule=rule.pattern,
            bytes_per_token_in=provider.bytes_per_token_in,
            bytes_per_token_out=provider.bytes_per_token_out,
        )
        if rule.kind is MatchKind.EXACT:
            self._exact[rule.pattern] = match
        elif rule.kind is MatchKind.SUFFIX:
            self._suffix[rule.pattern] = match
        else:
            wildcard = _Wildcard(
                regex=_compile_wildcard(rule.pattern),
                literal_chars=len(rule.pattern) - rule.pattern.count("*"),
                match=match,
            )
            key = _wildcard_key(rule.pattern)
            self._wildcards.setdefault(key, []).append(wildcard)


def estimate_tokens(nbytes: int, bytes_per_token: float) -> int:
    """Estimate a token count from a byte count, rounded to the nearest token."""
    if nbytes < 0:
        raise ValueError(f"byte count must not be negative, got {nbytes}")
    if not (math.isfinite(bytes_per_token) and bytes_per_token > 0):
        raise ValueError(
            f"bytes per token must be a positive finite number, got {bytes_per_token!r}"
        )
    return math.floor(nbytes / bytes_per_token + 0.5)


def _wildcard_key(name: str) -> tuple[int, str]:
    """Label count and last two labels: the key of the wildcard buckets."""
    last_dot = name.rfind(".")
    tail_start = name.rfind(".", 0, last_dot) + 1 if last_dot > 0 else 0
    return name.count(".") + 1, name[tail_start:]


def _compile_wildcard(pattern: str) -> re.Pattern[str]:
    # '*' stands for one or more characters of a single label, never a dot.
    labels = (
        "[^.]+".join(re.escape(part) for part in label.split("*"))
        for label in pattern.split(".")
    )
    return re.compile(r"\.".join(labels))


def _where(provider_id: str, index: int | None = None, pattern: Any = None) -> str:
    """Name the place of an error the way an editor of the file would look."""
    where = f"provider {provider_id!r}"
    if index is not None:
        where += f" rule {index}"
        if pattern is not None:
            where += f" (pattern {pattern!r})"
    return where


def _parse(document: Mapping[str, Any], source: str) -> list[Provider]:
    """Check a parsed catalog document against the schema and build providers."""
    unknown = sorted(set(document) - {"version", "provider"})
    if unknown:
        raise CatalogError(f"{source}: unknown top-level keys {unknown}")
    version = document.get("version")
    if version != CATALOG_VERSION:
        raise CatalogError(
            f"{source}: version must be {CATALOG_VERSION}, got {version!r}"
        )
    tables = document.get("provider")
    if not isinstance(tables, list) or not tables:
        raise CatalogError(f"{source}: no [[provider]] tables")

    providers: list[Provider] = []
    seen_ids: set[str] = set()
    for position, table in enumerate(tables, start=1):
        provider = _parse_provider(table, position, source)
        if provider.id in seen_ids:
            raise CatalogError(f"{source}: provider id {provider.id!r} is repeated")
        seen_ids.add(provider.id)
        providers.append(provider)
    return providers


def _parse_provider(table: Any, position: int, source: str) -> Provider:
    if not isinstance(table, dict):
        raise CatalogError(f"{source}: provider #{position} is not a table")
    provider_id = table.get("id")
    if not isinstance(provider_id, str) or not _PROVIDER_ID.fullmatch(provider_id):
        raise CatalogError(
            f"{source}: provider #{position} needs an id of lower-case letters, "
            f"digits and '_', got {provider_id!r}"
        )
    where = f"{source}: {_where(provider_id)}"

    unknown = sorted(set(table) - _PROVIDER_KEYS)
    if unknown:
        raise CatalogError(f"{where}: unknown keys {unknown}")
    name = table.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CatalogError(f"{where}: needs a non-empty display name")
    ratio_in = _ratio(table, "bytes_per_token_in", where)
    ratio_out = _ratio(table, "bytes_per_token_out", where)

    rules = table.get("rules")
    if not isinstance(rules, list) or not rules:
        raise CatalogError(f"{where}: needs a non-empty list of rules")
    parsed = tuple(
        _parse_rule(rule, provider_id, index, source)
        for index, rule in enumerate(rules, start=1)
    )
    return Provider(provider_id, name, ratio_in, ratio_out, parsed)


def _ratio(table: Mapping[str, Any], key: str, where: str) -> float:
    if key not in table:
        raise CatalogError(f"{where}: missing {key}")
    value = table[key]
    # bool is an int to Python but never a ratio.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise CatalogError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def _parse_rule(table: Any, provider_id: str, index: int, source: str) -> Rule:
    pattern = table.get("pattern") if isinstance(table, dict) else None
    where = f"{source}: {_where(provider_id, index, pattern)}"
    if not isinstance(table, dict):
        raise CatalogError(f"{where}: a rule must be a table, got {table!r}")

    unknown = sorted(set(table) - _RULE_KEYS)
    if unknown:
        raise CatalogError(f"{where}: unknown keys {unknown}")
    kind = table.get("match")
    if not isinstance(kind, str) or kind not in _KINDS:
        expected = ", ".join(_KINDS)
        raise CatalogError(f"{where}: unknown match kind {kind!r}, expected {expected}")
    category = table.get("category")
    if not isinstance(category, str) or category not in _CATEGORIES:
        expected = ", ".join(_CATEGORIES)
        raise CatalogError(
            f"{where}: unknown category {category!r}, expected {expected}"
        )
    if not isinstance(pattern, str):
        raise CatalogError(f"{where}: pattern must be a string")

    match_kind = MatchKind(kind)
    problem = _pattern_problem(match_kind, pattern)
    if problem:
        raise CatalogError(f"{where}: {problem}")
    return Rule(match_kind, pattern, Category(category))


def _pattern_problem(kind: MatchKind, pattern: str) -> str | None:
    """Why a pattern could never match a canonical hostname, or None."""
    if kind is not MatchKind.WILDCARD and "*" in pattern:
        return f"'*' is only allowed in wildcard rules, not {kind} ones"
    # A pattern must itself be canonical, or it silently never matches;
    # standing in a letter for '*' lets normalize_sni judge the rest.
    probe = pattern.replace("*", "x")
    if normalize_sni(probe).hostname != probe:
        return "pattern is not a lower-case hostname without a trailing dot"

    labels = pattern.split(".")
    if kind is MatchKind.SUFFIX and len(labels) < 2:
        return "a suffix needs at least two labels, or it would claim a whole TLD"
    if kind is MatchKind.WILDCARD:
        if "*" not in pattern:
            return "a wildcard pattern needs a '*'"
        if len(labels) < 3 or "*" in labels[-1] or "*" in labels[-2]:
            return "a wildcard must end in two literal labels, as in *.example.com"
    return None
