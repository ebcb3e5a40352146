"""The open-connections file a collector leaves to its next run.

Its directory is shared with the unprivileged stages, so what is read back
must be root's own, from this boot, and well-formed in every field.
"""

from __future__ import annotations

import json
import os

import pytest

from agent.collector import carryover
from agent.collector.carryover import Carried

ENDS = ("10.0.0.2", 40000, "203.0.113.7", 443)
ONE = Carried(
    "0123456789abcdef01234567", 1_700_000_000_000_000_000, b"api.x", False, "openssl"
)


@pytest.fixture
def path(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the file must be root's own")
    return str(tmp_path / carryover.FILE_NAME)


def test_round_trip(path):
    carryover.save(path, "boot-1", {ENDS: ONE})
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert carryover.load(path, "boot-1") == {ENDS: ONE}


def test_another_boot_is_ignored(path):
    carryover.save(path, "boot-1", {ENDS: ONE})
    assert carryover.load(path, "boot-2") == {}


def test_a_missing_file_is_nothing(path):
    assert carryover.load(path, "boot-1") == {}


def test_a_file_root_does_not_own_is_refused(path, caplog):
    carryover.save(path, "boot-1", {ENDS: ONE})
    os.chown(path, 65534, 65534)
    assert carryover.load(path, "boot-1") == {}
    assert "not root's own" in caplog.text


def test_a_symlink_is_not_followed(path, tmp_path):
    target = tmp_path / "elsewhere"
    carryover.save(str(target), "boot-1", {ENDS: ONE})
    os.symlink(target, path)
    assert carryover.load(path, "boot-1") == {}


@pytest.mark.parametrize(
    "change",
    [
        {"sni": ""},
        {"sni": "x" * 256},
        {"sni": 5},
        {"conn_id": "../../etc"},
        {"start_unix_ns": -1},
        {"start_unix_ns": "now"},
        {"sni_source": "dns"},
        {"sni_truncated": "no"},
        {"endpoints": ["10.0.0.2", 0, "203.0.113.7", 443]},
        {"endpoints": ["10.0.0.2", 40000]},
    ],
)
def test_a_bad_field_discards_the_file(path, change, caplog):
    carryover.save(path, "boot-1", {ENDS: ONE})
    with open(path) as f:
        body = json.load(f)
    body["connections"][0].update(change)
    with open(path, "w") as f:
        json.dump(body, f)
    assert carryover.load(path, "boot-1") == {}
    assert "ignoring" in caplog.text


def test_garbage_is_ignored(path, caplog):
    with open(path, "wb") as f:
        f.write(b"\x00not json")
    os.chmod(path, 0o600)
    assert carryover.load(path, "boot-1") == {}
