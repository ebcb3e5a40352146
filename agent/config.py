"""Agent configuration: defaults, then a TOML file, then TOKTRA_* variables.

In: an optional file path (``--config PATH``), the process environment.
Out: one frozen ``Config`` and, per key, where its value came from.

Every later layer overrides the earlier one key by key. Each value is
converted by the key's declared type and then checked by the key's validator;
the first problem found stops loading with a ``ConfigError`` whose text is one
line naming the file and line (or the variable), the key and the bad value.
Secret keys are never echoed, neither in errors nor by ``describe``.
"""

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEFAULT_CONFIG_PATH = "/etc/toktra/agent.conf"
CONFIG_PATH_VARIABLE = "TOKTRA_CONFIG"
ENV_PREFIX = "TOKTRA_"

# Keys whose value is never shown: describe() prints "(set)" or "".
SECRET_KEYS = frozenset({"enrollment_token"})

LOG_LEVELS = ("debug", "info", "warning", "error")
SEND_HOOKS = ("auto", "tracepoint", "fexit", "syscalls")
CAPTURE_MODES = ("auto", "bpf", "sockdiag")
MAX_PORTS = 16
MIN_SPOOL_BYTES = 1024 * 1024

_UTF8_BOM = b"\xef\xbb\xbf"
_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})
_DECIMAL_INT = re.compile(r"[+-]?[0-9]+")
_DECIMAL_FLOAT = re.compile(
    r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
)
_TOML_POSITION = re.compile(
    r"^(?P<reason>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$"
)
_TOML_AT_END = re.compile(r"^(?P<reason>.*) \(at end of document\)$")


@dataclass(frozen=True)
class Config:
    ingest_url: str = ""  # empty: local mode, events go to {state_dir}/events.jsonl
    enroll_url: str = ""
    enrollment_token: str = ""  # secret
    org_id: str = ""
    device_id: str = ""
    ca_file: str = ""  # empty: verify servers against the system store
    spool_max_bytes: int = 268435456
    ports: tuple[int, ...] = (443,)
    batch_max_events: int = 50
    batch_max_seconds: float = 5.0
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9090
    state_dir: str = "/var/lib/toktra"
    run_dir: str = "/run/toktra"
    config_dir: str = "/etc/toktra"
    user: str = "toktra"
    log_level: str = "info"
    bpf_object: str = ""  # empty: search the standard locations
    send_hook: str = "auto"
    libssl_paths: tuple[str, ...] = ()  # extra libssl files to attach to
    queue_max_messages: int = 10000  # bodies a stage holds for a slow next one
    retry_max_seconds: float = 60.0  # cap of the jittered backoff between retries
    breaker_failures: int = 5  # consecutive failures that open the circuit
    breaker_open_seconds: float = 30.0  # pause before one probe batch is let through
    taps: bool = True  # publish each stage's output for `toktra-agent tap`
    connections_window_seconds: float = 300.0  # closed rows kept in the table
    # auto: BPF, or sock_diag polling (degraded: no SNI) when BPF cannot load
    capture_mode: str = "auto"
    progress_interval_seconds: float = 60.0  # byte reports of open connections
    poll_interval_seconds: float = 2.0  # sock_diag polling in degraded mode


class ConfigError(Exception):
    """A configuration that cannot be used; str() is the operator's message."""


# --- converters: TOML value -> declared type -------------------------------
#
# Each raises ValueError with the reason only; the caller adds file, line, key
# and value.


def _toml_kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def _expected(tp: object) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        tuple[int, ...]: "an array of integers",
        tuple[str, ...]: "an array of strings",
    }
    return names[tp]


def _toml_scalar(value: object, tp: object) -> object:
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise ValueError(f"expected {_expected(tp)}, got {_toml_kind(value)}")


def _toml_value(value: object, tp: object) -> object:
    """Convert one value parsed from TOML to the type ``tp``."""
    if tp not in (tuple[int, ...], tuple[str, ...]):
        return _toml_scalar(value, tp)
    if not isinstance(value, list):
        raise ValueError(f"expected {_expected(tp)}, got {_toml_kind(value)}")
    item_type = int if tp == tuple[int, ...] else str
    items = []
    for number, item in enumerate(value, start=1):
        try:
            items.append(_toml_scalar(item, item_type))
        except ValueError:
            raise ValueError(
                f"expected {_expected(tp)}, item {number} is {_toml_kind(item)}"
            ) from None
    return tuple(items)


# --- converters: environment text -> declared type -------------------------


def _env_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError("not a boolean (use true/false, 1/0, yes/no, on/off)")


def _env_int(text: str) -> int:
    if not _DECIMAL_INT.fullmatch(text.strip()):
        raise ValueError("not an integer")
    return int(text.strip())


def _env_float(text: str) -> float:
    if not _DECIMAL_FLOAT.fullmatch(text.strip()):
        raise ValueError("not a number")
    return float(text.strip())


def _env_items(text: str) -> list[str]:
    """Split a comma-separated list; an empty or blank text is no items."""
    if not text.strip():
        return []
    items = [item.strip() for item in text.split(",")]
    for number, item in enumerate(items, start=1):
        if not item:
            raise ValueError(f"item {number} of the comma-separated list is empty")
    return items


def _env_value(text: str, tp: object) -> object:
    """Convert the text of one TOKTRA_* variable to the type ``tp``."""
    if tp is bool:
        return _env_bool(text)
    if tp is int:
        return _env_int(text)
    if tp is float:
        return _env_float(text)
    if tp is str:
        return text
    if tp == tuple[str, ...]:
        return tuple(_env_items(text))
    if tp == tuple[int, ...]:
        items = []
        for number, item in enumerate(_env_items(text), start=1):
            try:
                items.append(_env_int(item))
            except ValueError:
                raise ValueError(f"item {number} ({item}) is not an integer") from None
        return tuple(items)
    raise TypeError(f"no environment converter for {tp!r}")


# --- validators: one per key, each raises ValueError with the reason -------


def _accept(value: object) -> None:
    """Any value of the declared type is valid."""


def _in_range(low: float, high: float) -> Callable[[Any], None]:
    def check(value: float) -> None:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")

    return check


def _check_port(value: int) -> None:
    if not 1 <= value <= 65535:
        raise ValueError("must be between 1 and 65535")


def _check_unprivileged_port(value: int) -> None:
    if not 1024 <= value <= 65535:
        raise ValueError(
            "must be between 1024 and 65535 (the metrics stage runs unprivileged)"
        )


def _check_ip_address(value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("must be an IP address, such as 127.0.0.1 or ::1") from None


def _check_ports(value: tuple[int, ...]) -> None:
    if not value:
        raise ValueError("must list at least one port")
    if len(value) > MAX_PORTS:
        raise ValueError(f"at most {MAX_PORTS} ports, got {len(value)}")
    seen: set[int] = set()
    for port in value:
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is not between 1 and 65535")
        if port in seen:
            raise ValueError(f"port {port} is listed twice")
        seen.add(port)


def _check_seconds(value: float) -> None:
    # Written so that NaN fails too.
    if not 0 < value <= 3600:
        raise ValueError("must be more than 0 and at most 3600")


def _check_spool(value: int) -> None:
    if value < MIN_SPOOL_BYTES:
        raise ValueError(f"must be at least {MIN_SPOOL_BYTES} (1 MiB)")


def _check_https_url(value: str) -> None:
    if not value:
        return
    if value != value.strip() or any(c.isspace() for c in value):
        raise ValueError("must not contain spaces")
    parts = urlsplit(value)
    if parts.scheme.lower() == "http":
        raise ValueError(
            "must use https://; plain http would send tokens and events unencrypted"
        )
    if parts.scheme.lower() != "https":
        raise ValueError("must be empty or an https:// URL")
    if not parts.hostname:
        raise ValueError("https:// URL has no host name")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "must not hold a user name or password; the agent authenticates "
            "with its device certificate"
        )
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ValueError("must not have a query or fragment")
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        raise ValueError("port must be between 1 and 65535") from None


_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_device_id(value: str) -> None:
    # It becomes a certificate's common name and a file's content.
    if value and not _DEVICE_ID.fullmatch(value):
        raise ValueError(
            "must be 1 to 64 of the characters A-Z a-z 0-9 . _ -, starting "
            "with a letter or digit (it becomes a certificate's common name)"
        )


def _check_file(value: str) -> None:
    if value and not os.path.isfile(value):
        raise ValueError("no such file")


def _check_directory(value: str) -> None:
    if not os.path.isabs(value):
        raise ValueError("must be an absolute path")


def _check_not_empty(value: str) -> None:
    if not value.strip():
        raise ValueError("must not be empty")


def _one_of(choices: tuple[str, ...]) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")

    return check


_VALIDATORS: dict[str, Callable[[Any], None]] = {
    "ingest_url": _check_https_url,
    "enroll_url": _check_https_url,
    "enrollment_token": _accept,
    "org_id": _accept,
    "device_id": _check_device_id,
    "ca_file": _check_file,
    "spool_max_bytes": _check_spool,
    "ports": _check_ports,
    "batch_max_events": _in_range(1, 10000),
    "batch_max_seconds": _check_seconds,
    "metrics_address": _check_ip_address,
    "metrics_port": _check_unprivileged_port,
    "state_dir": _check_directory,
    "run_dir": _check_directory,
    "config_dir": _check_directory,
    "user": _check_not_empty,
    "log_level": _one_of(LOG_LEVELS),
    "bpf_object": _accept,
    "send_hook": _one_of(SEND_HOOKS),
    "libssl_paths": _accept,
    "queue_max_messages": _in_range(1, 10_000_000),
    "retry_max_seconds": _check_seconds,
    "breaker_failures": _in_range(1, 1000),
    "breaker_open_seconds": _check_seconds,
    "taps": _accept,
    "connections_window_seconds": _in_range(1, 86400),
    "capture_mode": _one_of(CAPTURE_MODES),
    "progress_interval_seconds": _in_range(0.5, 86400),
    "poll_interval_seconds": _in_range(0.1, 3600),
}


# --- rendering -------------------------------------------------------------


def _render(value: object) -> str:
    """Show a value as it would be written in TOML."""
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False, default=str)


_URL_USERINFO = re.compile(r"(?<=://)[^/?#@]*@")


def _mask_userinfo(text: str) -> str:
    # A password written into a URL is refused, and never echoed either.
    return _URL_USERINFO.sub("(secret)@", text)


def _render_for(key: str, value: object) -> str:
    if key in SECRET_KEYS:
        return "(secret)"
    return _mask_userinfo(_render(value))


def _render_env(key: str, text: str) -> str:
    if key in SECRET_KEYS:
        return "(secret)"
    text = _mask_userinfo(text)
    return text if text.isprintable() else json.dumps(text)


def _hint(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# --- the file layer ---------------------------------------------------------


def _choose_path(path: str | None, environ: Mapping[str, str]) -> tuple[str, str]:
    """Return the file to read and who named it ("" for the default)."""
    if path is not None:
        if not path:
            raise ConfigError("the config file path given is empty")
        return path, "--config"
    named = environ.get(CONFIG_PATH_VARIABLE, "")
    if named:
        return named, CONFIG_PATH_VARIABLE
    return DEFAULT_CONFIG_PATH, ""


def _read_bytes(path: str, named_by: str) -> bytes | None:
    """Read the file; None only when the default file does not exist."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        if not named_by:
            return None
        raise ConfigError(
            f"{path}: cannot read config file: No such file or directory"
            f" (named by {named_by})"
        ) from None
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(f"{path}: cannot read config file: {reason}") from None


def _decode(path: str, data: bytes) -> str:
    if data.startswith(_UTF8_BOM):
        raise ConfigError(
            f"{path}:1: file starts with a UTF-8 byte-order mark (BOM), which TOML"
            " does not allow; save it as UTF-8 without a BOM"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8 (byte {data[error.start]:#04x})"
        ) from None


def _parse_toml(path: str, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        at = _TOML_POSITION.match(message)
        if at:
            where = f"{path}:{at['line']}:{at['col']}"
            raise ConfigError(f"{where}: invalid TOML: {at['reason']}") from None
        at_end = _TOML_AT_END.match(message)
        if at_end:
            line = max(len(text.splitlines()), 1)
            raise ConfigError(
                f"{path}:{line}: invalid TOML: {at_end['reason']} at end of file"
            ) from None
        raise ConfigError(f"{path}: invalid TOML: {message}") from None


def _line_of(text: str, key: str) -> int | None:
    """Find the line that sets ``key`` (or opens a table of that name)."""
    name = re.escape(key)
    pattern = re.compile(rf"^[ \t]*(?:\[\[?[ \t]*)?([\"']?){name}\1[ \t]*[=.\]]")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return None


def _file_layer(
    path: str, text: str, types: dict[str, object]
) -> dict[str, tuple[object, str]]:
    """Convert and check every key of the file; key -> (value, "path:line")."""
    document = _parse_toml(path, text)
    found: dict[str, tuple[object, str]] = {}
    for key, raw in document.items():
        line = _line_of(text, key)
        where = f"{path}:{line}" if line else path
        if isinstance(raw, dict):
            raise ConfigError(
                f"{where}: table [{key}] is not allowed; the configuration is"
                " flat keys only"
            )
        if key not in types:
            raise ConfigError(f"{where}: unknown key {key}{_hint(key, list(types))}")
        shown = f"{key} = {_render_for(key, raw)}"
        try:
            value = _toml_value(raw, types[key])
            _VALIDATORS[key](value)
        except ValueError as error:
            raise ConfigError(f"{where}: {shown}: {error}") from None
        found[key] = (value, where)
    return found


# --- the environment layer --------------------------------------------------


def _env_layer(
    environ: Mapping[str, str], types: dict[str, object]
) -> dict[str, tuple[object, str]]:
    """Convert and check every TOKTRA_* variable; key -> (value, "env NAME")."""
    by_variable = {ENV_PREFIX + key.upper(): key for key in types}
    found: dict[str, tuple[object, str]] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_PATH_VARIABLE:
            continue
        key = by_variable.get(name)
        if key is None:
            raise ConfigError(
                f"environment variable {name} is not a configuration key"
                f"{_hint(name, list(by_variable))}"
            )
        text = environ[name]
        try:
            value = _env_value(text, types[key])
            _VALIDATORS[key](value)
        except ValueError as error:
            shown = _render_env(key, text)
            raise ConfigError(f"environment variable {name}={shown}: {error}") from None
        found[key] = (value, f"env {name}")
    return found


# --- public API ------------------------------------------------------------


def load_config_with_sources(
    path: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Config, dict[str, str]]:
    """Load the configuration and say, per key, where its value came from.

    ``path`` is the file named by ``--config``; without it TOKTRA_CONFIG names
    the file, else DEFAULT_CONFIG_PATH, which alone may be missing.
    ``environ`` defaults to ``os.environ``. Sources are "default",
    "FILE:LINE" or "env TOKTRA_KEY".
    """
    env = os.environ if environ is None else environ
    types = {field.name: field.type for field in dataclasses.fields(Config)}
    sources = dict.fromkeys(types, "default")
    values: dict[str, Any] = {}

    file_path, named_by = _choose_path(path, env)
    data = _read_bytes(file_path, named_by)
    layers = []
    if data is not None:
        layers.append(_file_layer(file_path, _decode(file_path, data), types))
    layers.append(_env_layer(env, types))

    for layer in layers:
        for key, (value, source) in layer.items():
            values[key] = value
            sources[key] = source
    config = Config(**values)
    if config.enroll_url and not config.ingest_url:
        raise ConfigError(
            f"{sources['enroll_url']}: enroll_url is set but ingest_url is empty; "
            "enrollment is for shipping to an ingest service"
        )
    return config, sources


def load_config(
    path: str | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Load the configuration; see load_config_with_sources."""
    config, _ = load_config_with_sources(path, environ)
    return config


def describe(config: Config, sources: Mapping[str, str]) -> str:
    """One line per key, ``key = value  # source``; secrets are masked.

    Values are written as TOML. A secret shows as "(set)" when it has a value
    and as "" when not. No trailing newline.
    """
    lines = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in SECRET_KEYS:
            value = "(set)" if value else ""
        source = sources.get(field.name, "default")
        lines.append(f"{field.name} = {_render(value)}  # {source}")
    return "\n".join(lines)
