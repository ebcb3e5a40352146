"""Tests of agent.config: layering, conversion, and the exact error texts."""

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from agent import config
from agent.config import Config, ConfigError, describe, load_config
from agent.config import load_config_with_sources as load_with_sources


@pytest.fixture(autouse=True)
def no_default_file(tmp_path, monkeypatch):
    """Point the default path into tmp_path so no test reads the real /etc."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.conf"))


def write(tmp_path: Path, content: str | bytes, name: str = "agent.conf") -> str:
    target = tmp_path / name
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content, encoding="utf-8")
    return str(target)


# --- bad configurations: (id, file content or None, environ, expected text) --
#
# FILE in the expected text stands for the path of the file written.

BAD_FILES = [
    (
        "unknown key, with a suggestion",
        "# agent\nmetric_port = 9091\n",
        "FILE:2: unknown key metric_port (did you mean metrics_port?)",
    ),
    (
        "unknown key, nothing close",
        "ports = [443]\ncolour = 'blue'\n",
        "FILE:2: unknown key colour",
    ),
    (
        "string where an array is expected",
        'ports = "443"\n',
        'FILE:1: ports = "443": expected an array of integers, got a string',
    ),
    (
        "bool for an int key",
        "metrics_port = true\n",
        "FILE:1: metrics_port = true: expected an integer, got a boolean",
    ),
    (
        "float for an int key",
        "batch_max_events = 5.0\n",
        "FILE:1: batch_max_events = 5.0: expected an integer, got a float",
    ),
    (
        "string item in an int array",
        'ports = [443, "8443"]\n',
        'FILE:1: ports = [443, "8443"]: expected an array of integers,'
        " item 2 is a string",
    ),
    (
        "date for a string key",
        "org_id = 1979-05-27\n",
        'FILE:1: org_id = "1979-05-27": expected a string, got a date or time',
    ),
    (
        "broken TOML",
        'log_level = "info"\nmetrics_port = \n',
        "FILE:2:16: invalid TOML: Invalid value",
    ),
    (
        "a key set twice",
        "metrics_port = 9100\nmetrics_port = 9200\n",
        "FILE:2:20: invalid TOML: Cannot overwrite a value",
    ),
    (
        "TOML cut short",
        'ports = [443]\nuser = "toktra',
        "FILE:2: invalid TOML: Unterminated string at end of file",
    ),
    (
        "byte-order mark",
        b"\xef\xbb\xbfports = [443]\n",
        "FILE:1: file starts with a UTF-8 byte-order mark (BOM), which TOML does"
        " not allow; save it as UTF-8 without a BOM",
    ),
    (
        "not UTF-8",
        b'ports = [443]\nuser = "t\xe9\xe9"\n',
        "FILE:2: not valid UTF-8 (byte 0xe9)",
    ),
    (
        "nested table",
        "ports = [443]\n\n[shipper]\nbatch_max_events = 5\n",
        "FILE:3: table [shipper] is not allowed; the configuration is flat keys only",
    ),
    (
        "dotted key makes a table",
        'ingest.url = "https://ingest.example.com"\n',
        "FILE:1: table [ingest] is not allowed; the configuration is flat keys only",
    ),
    (
        "http ingest_url",
        'ingest_url = "http://ingest.example.com/"\n',
        'FILE:1: ingest_url = "http://ingest.example.com/": must use https://;'
        " plain http would send tokens and events unencrypted",
    ),
    (
        "ftp enroll_url",
        'enroll_url = "ftp://enroll.example.com"\n',
        'FILE:1: enroll_url = "ftp://enroll.example.com": must be empty or an'
        " https:// URL",
    ),
    (
        "https URL without a host",
        'ingest_url = "https:///v1"\n',
        'FILE:1: ingest_url = "https:///v1": https:// URL has no host name',
    ),
    (
        "duplicate ports",
        "ports = [443, 8443, 443]\n",
        "FILE:1: ports = [443, 8443, 443]: port 443 is listed twice",
    ),
    (
        "port 0",
        "ports = [0]\n",
        "FILE:1: ports = [0]: port 0 is not between 1 and 65535",
    ),
    (
        "no ports",
        "ports = []\n",
        "FILE:1: ports = []: must list at least one port",
    ),
    (
        "too many ports",
        f"ports = [{', '.join(str(p) for p in range(1000, 1017))}]\n",
        "at most 16 ports, got 17",
    ),
    (
        "metrics_port out of range, quoted key",
        '"metrics_port" = 65536\n',
        "FILE:1: metrics_port = 65536: must be between 1024 and 65535 (the"
        " metrics stage runs unprivileged)",
    ),
    (
        "batch_max_events 0",
        "batch_max_events = 0\n",
        "FILE:1: batch_max_events = 0: must be between 1 and 10000",
    ),
    (
        "batch_max_seconds too long",
        "batch_max_seconds = 3600.5\n",
        "FILE:1: batch_max_seconds = 3600.5: must be more than 0 and at most 3600",
    ),
    (
        "batch_max_seconds nan",
        "batch_max_seconds = nan\n",
        "FILE:1: batch_max_seconds = NaN: must be more than 0 and at most 3600",
    ),
    (
        "small spool",
        "spool_max_bytes = 1000\n",
        "FILE:1: spool_max_bytes = 1000: must be at least 1048576 (1 MiB)",
    ),
    (
        "relative state_dir",
        'ports = [443]\n  state_dir = "var/lib/toktra"\n',
        'FILE:2: state_dir = "var/lib/toktra": must be an absolute path',
    ),
    (
        "unknown log_level",
        'log_level = "verbose"\n',
        'FILE:1: log_level = "verbose": must be one of debug, info, warning, error',
    ),
    (
        "unknown send_hook",
        'send_hook = "kprobe"\n',
        'FILE:1: send_hook = "kprobe": must be one of auto, tracepoint, fexit,'
        " syscalls",
    ),
    (
        "queue_max_messages 0",
        "queue_max_messages = 0\n",
        "FILE:1: queue_max_messages = 0: must be between 1 and 10000000",
    ),
    (
        "device_id that cannot be a certificate name",
        'device_id = "host/../x"\n',
        'FILE:1: device_id = "host/../x": must be 1 to 64 of the characters'
        " A-Z a-z 0-9 . _ -, starting with a letter or digit (it becomes a"
        " certificate's common name)",
    ),
    (
        "credentials in a URL",
        'ingest_url = "https://admin:pw@ingest.example"\n',
        'FILE:1: ingest_url = "https://(secret)@ingest.example": must not hold a'
        " user name or password; the agent authenticates with its device"
        " certificate",
    ),
    (
        "query in a URL",
        'ingest_url = "https://ingest.example/?a=b"\n',
        'FILE:1: ingest_url = "https://ingest.example/?a=b": must not have a query'
        " or fragment",
    ),
    (
        "port out of range",
        'ingest_url = "https://127.0.0.1:99999"\n',
        'FILE:1: ingest_url = "https://127.0.0.1:99999": port must be between 1'
        " and 65535",
    ),
    (
        "missing ca_file",
        'ca_file = "/nonexistent/ca.pem"\n',
        'FILE:1: ca_file = "/nonexistent/ca.pem": no such file',
    ),
    (
        "enroll_url without ingest_url",
        'enroll_url = "https://ingest.example/v1/enroll"\n',
        "FILE:1: enroll_url is set but ingest_url is empty; enrollment is for"
        " shipping to an ingest service",
    ),
    (
        "privileged metrics port",
        "metrics_port = 80\n",
        "FILE:1: metrics_port = 80: must be between 1024 and 65535 (the metrics"
        " stage runs unprivileged)",
    ),
    (
        "metrics address that is not an address",
        'metrics_address = "not an ip"\n',
        'FILE:1: metrics_address = "not an ip": must be an IP address, such as'
        " 127.0.0.1 or ::1",
    ),
    (
        "breaker_failures 0",
        "breaker_failures = 0\n",
        "FILE:1: breaker_failures = 0: must be between 1 and 1000",
    ),
    (
        "secret of the wrong type is not echoed",
        "enrollment_token = 123456789\n",
        "FILE:1: enrollment_token = (secret): expected a string, got an integer",
    ),
]


@pytest.mark.parametrize(
    ("content", "expected"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_bad_file(tmp_path, content, expected):
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert expected.replace("FILE", path) in message
    assert "\n" not in message
    assert "123456789" not in message


BAD_ENVIRONMENTS = [
    (
        "not an integer",
        {"TOKTRA_METRICS_PORT": "abc"},
        "environment variable TOKTRA_METRICS_PORT=abc: not an integer",
    ),
    (
        "hex is not decimal",
        {"TOKTRA_METRICS_PORT": "0x10"},
        "environment variable TOKTRA_METRICS_PORT=0x10: not an integer",
    ),
    (
        "underscores are not decimal",
        {"TOKTRA_BATCH_MAX_EVENTS": "1_000"},
        "environment variable TOKTRA_BATCH_MAX_EVENTS=1_000: not an integer",
    ),
    (
        "unknown variable",
        {"TOKTRA_SOME_BOOL": "false"},
        "environment variable TOKTRA_SOME_BOOL is not a configuration key",
    ),
    (
        "typo of a key",
        {"TOKTRA_METRIC_PORT": "9091"},
        "environment variable TOKTRA_METRIC_PORT is not a configuration key"
        " (did you mean TOKTRA_METRICS_PORT?)",
    ),
    (
        "lower-case key after the prefix",
        {"TOKTRA_metrics_port": "9091"},
        "environment variable TOKTRA_metrics_port is not a configuration key",
    ),
    (
        "empty list item",
        {"TOKTRA_PORTS": "443,,8443"},
        "environment variable TOKTRA_PORTS=443,,8443: item 2 of the"
        " comma-separated list is empty",
    ),
    (
        "trailing comma",
        {"TOKTRA_LIBSSL_PATHS": "/usr/lib/libssl.so.3,"},
        "environment variable TOKTRA_LIBSSL_PATHS=/usr/lib/libssl.so.3,: item 2"
        " of the comma-separated list is empty",
    ),
    (
        "list item not an integer",
        {"TOKTRA_PORTS": "443,https"},
        "environment variable TOKTRA_PORTS=443,https: item 2 (https) is not an integer",
    ),
    (
        "duplicate ports",
        {"TOKTRA_PORTS": "443,443"},
        "environment variable TOKTRA_PORTS=443,443: port 443 is listed twice",
    ),
    (
        "empty ports",
        {"TOKTRA_PORTS": ""},
        "environment variable TOKTRA_PORTS=: must list at least one port",
    ),
    (
        "nan seconds",
        {"TOKTRA_BATCH_MAX_SECONDS": "nan"},
        "environment variable TOKTRA_BATCH_MAX_SECONDS=nan: not a number",
    ),
    (
        "zero seconds",
        {"TOKTRA_BATCH_MAX_SECONDS": "0"},
        "environment variable TOKTRA_BATCH_MAX_SECONDS=0: must be more than 0 and"
        " at most 3600",
    ),
    (
        "http ingest_url",
        {"TOKTRA_INGEST_URL": "http://127.0.0.1:8080"},
        "environment variable TOKTRA_INGEST_URL=http://127.0.0.1:8080: must use"
        " https://",
    ),
    (
        "control characters are escaped",
        {"TOKTRA_LOG_LEVEL": "info\n"},
        'environment variable TOKTRA_LOG_LEVEL="info\\n": must be one of',
    ),
]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [case[1:] for case in BAD_ENVIRONMENTS],
    ids=[case[0] for case in BAD_ENVIRONMENTS],
)
def test_bad_environment(environ, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(environ=environ)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_explicit_file(tmp_path):
    path = str(tmp_path / "nowhere.conf")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(caught.value) == (
        f"{path}: cannot read config file: No such file or directory"
        " (named by --config)"
    )


def test_missing_file_named_by_variable(tmp_path):
    path = str(tmp_path / "nowhere.conf")
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"TOKTRA_CONFIG": path})
    assert str(caught.value) == (
        f"{path}: cannot read config file: No such file or directory"
        " (named by TOKTRA_CONFIG)"
    )


def test_directory_as_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path), environ={})
    assert str(caught.value) == f"{tmp_path}: cannot read config file: Is a directory"


def test_default_path_that_is_a_directory_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="Is a directory"):
        load_config(environ={})


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = write(tmp_path, "ports = [443]\n")
    os.chmod(path, 0)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(caught.value) == f"{path}: cannot read config file: Permission denied"


def test_empty_explicit_path():
    with pytest.raises(ConfigError, match="path given is empty"):
        load_config("", environ={})


def test_file_errors_come_before_environment_errors(tmp_path):
    path = write(tmp_path, "metrics_port = 0\n")
    with pytest.raises(ConfigError, match=r"agent\.conf:1: metrics_port = 0"):
        load_config(path, environ={"TOKTRA_METRICS_PORT": "9100"})


# --- good configurations -----------------------------------------------------


def test_defaults_when_the_default_file_is_absent():
    config_, sources = load_with_sources(environ={})
    assert config_ == Config()
    assert set(sources.values()) == {"default"}


def test_env_overrides_file_overrides_default(tmp_path):
    path = write(
        tmp_path,
        "# toktra agent\n"
        "metrics_port = 9100\n"
        "batch_max_events = 20\n"
        'log_level = "debug"\n',
    )
    environ = {"TOKTRA_METRICS_PORT": "9200", "TOKTRA_LOG_LEVEL": "warning"}
    loaded, sources = load_with_sources(path, environ)
    assert loaded.metrics_port == 9200
    assert loaded.log_level == "warning"
    assert loaded.batch_max_events == 20
    assert loaded.batch_max_seconds == 5.0
    assert sources["metrics_port"] == "env TOKTRA_METRICS_PORT"
    assert sources["log_level"] == "env TOKTRA_LOG_LEVEL"
    assert sources["batch_max_events"] == f"{path}:3"
    assert sources["batch_max_seconds"] == "default"
    assert set(sources) == {field.name for field in dataclasses.fields(Config)}


@pytest.mark.parametrize(
    ("text", "expected"), [("false", False), ("off", False), ("YES", True)]
)
def test_bool_key_from_environment(text, expected):
    assert load_config(None, environ={"TOKTRA_TAPS": text}).taps is expected


def test_bool_key_rejects_other_words():
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ={"TOKTRA_TAPS": "maybe"})
    assert str(caught.value).startswith("environment variable TOKTRA_TAPS=maybe:")


def test_ports_from_environment():
    assert load_config(environ={"TOKTRA_PORTS": "443,8443"}).ports == (443, 8443)
    assert load_config(environ={"TOKTRA_PORTS": " 8443 , 443 "}).ports == (8443, 443)


def test_sixteen_ports_are_allowed():
    ports = ",".join(str(port) for port in range(1000, 1016))
    assert len(load_config(environ={"TOKTRA_PORTS": ports}).ports) == 16


def test_float_key_from_toml_int(tmp_path):
    path = write(tmp_path, "batch_max_seconds = 2\n")
    value = load_config(path, environ={}).batch_max_seconds
    assert value == 2.0
    assert type(value) is float


def test_float_key_from_environment():
    loaded = load_config(environ={"TOKTRA_BATCH_MAX_SECONDS": "0.25"})
    assert loaded.batch_max_seconds == 0.25


def test_string_tuple_from_file_and_environment(tmp_path):
    path = write(tmp_path, 'libssl_paths = ["/opt/a/libssl.so.3"]\n')
    assert load_config(path, environ={}).libssl_paths == ("/opt/a/libssl.so.3",)
    environ = {"TOKTRA_LIBSSL_PATHS": "/opt/b/libssl.so.3, /opt/c/libssl.so.1.1"}
    assert load_config(path, environ).libssl_paths == (
        "/opt/b/libssl.so.3",
        "/opt/c/libssl.so.1.1",
    )
    assert load_config(path, {"TOKTRA_LIBSSL_PATHS": ""}).libssl_paths == ()


def test_https_urls_are_accepted(tmp_path):
    path = write(
        tmp_path,
        'ingest_url = "https://ingest.example.com"\n'
        'enroll_url = "https://enroll.example.com/v1/enroll"\n',
    )
    loaded = load_config(path, environ={})
    assert loaded.ingest_url == "https://ingest.example.com"
    assert loaded.enroll_url == "https://enroll.example.com/v1/enroll"


def test_variable_names_the_file(tmp_path):
    path = write(tmp_path, "metrics_port = 9101\n")
    loaded, sources = load_with_sources(environ={"TOKTRA_CONFIG": path})
    assert loaded.metrics_port == 9101
    assert sources["metrics_port"] == f"{path}:1"


def test_explicit_path_wins_over_variable(tmp_path):
    chosen = write(tmp_path, "metrics_port = 9102\n", name="chosen.conf")
    other = write(tmp_path, "metrics_port = 9103\n", name="other.conf")
    assert load_config(chosen, {"TOKTRA_CONFIG": other}).metrics_port == 9102


def test_empty_variable_means_the_default_path(tmp_path, monkeypatch):
    path = write(tmp_path, "metrics_port = 9104\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", path)
    assert load_config(environ={"TOKTRA_CONFIG": ""}).metrics_port == 9104


def test_environ_none_reads_the_process_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TOKTRA_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TOKTRA_METRICS_PORT", "9105")
    assert load_config().metrics_port == 9105


def test_other_variables_are_ignored():
    loaded = load_config(environ={"PATH": "/bin", "TOKTRA": "x", "toktra_ports": "1"})
    assert loaded == Config()


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().metrics_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("Yes", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("NO", False),
        ("off", False),
    ],
)
def test_env_bool_words(text, expected):
    assert config._env_bool(text) is expected


@pytest.mark.parametrize("text", ["", "2", "y", "n", "enabled", "truthy"])
def test_env_bool_rejects_other_words(text):
    with pytest.raises(ValueError, match="not a boolean"):
        config._env_bool(text)


def test_every_key_has_a_validator():
    assert set(config._VALIDATORS) == {f.name for f in dataclasses.fields(Config)}


def test_defaults_pass_their_own_validators():
    for field in dataclasses.fields(Config):
        config._VALIDATORS[field.name](field.default)


# --- describe ------------------------------------------------------------------


def test_describe_masks_the_token_and_names_sources(tmp_path):
    path = write(tmp_path, '# agent\n\nports = [443, 8443]\norg_id = "acme"\n')
    environ = {"TOKTRA_ENROLLMENT_TOKEN": "s3cr3t-token"}
    text = describe(*load_with_sources(path, environ))
    lines = text.split("\n")
    assert len(lines) == len(dataclasses.fields(Config))
    assert "s3cr3t" not in text
    assert 'enrollment_token = "(set)"  # env TOKTRA_ENROLLMENT_TOKEN' in lines
    assert f"ports = [443, 8443]  # {path}:3" in lines
    assert f'org_id = "acme"  # {path}:4' in lines
    assert "batch_max_seconds = 5.0  # default" in lines
    assert "libssl_paths = []  # default" in lines
    assert lines[0] == 'ingest_url = ""  # default'


def test_describe_shows_an_unset_token_as_empty():
    text = describe(Config(), {})
    assert 'enrollment_token = ""  # default' in text.split("\n")


CLI = [str(Path(__file__).resolve().parent.parent / ".venv/bin/toktra-agent")]


@pytest.mark.parametrize(
    ("content", "environ", "expected"),
    [
        ("metrics_prot = 9091\n", {}, "FILE:1: unknown key metrics_prot"),
        ("ports = 443\n", {}, "FILE:1: ports = 443: expected an array of integers"),
        ("ports = [443\n", {}, "FILE:"),
        ("\ufeffports = [443]\n", {}, "byte-order mark"),
        ("", {"TOKTRA_METRICS_PORT": "abc"}, "TOKTRA_METRICS_PORT=abc: not an integer"),
        ("", {"TOKTRA_SOME_BOOL": "false"}, "TOKTRA_SOME_BOOL is not a configuration"),
    ],
    ids=["unknown key", "wrong type", "broken toml", "bom", "env int", "env unknown"],
)
@pytest.mark.parametrize("command", ["run", "status", "enroll", "config"])
def test_every_command_refuses_bad_configuration_with_exit_2(
    tmp_path, content, environ, expected, command
):
    path = tmp_path / "agent.conf"
    path.write_text(content, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKTRA_")}
    done = subprocess.run(
        [*CLI, command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, **environ},
        check=False,
    )
    assert done.returncode == 2, done.stderr
    message = done.stderr.replace(str(path), "FILE")
    assert message.startswith("toktra-agent: configuration error: "), message
    assert expected in message
    assert "Traceback" not in done.stderr and len(message.splitlines()) == 1
