"""Which libssl files the collector hooks, with the real object and files.

Each test maps real copies of the system libssl in real processes; the
bounds (how many files, whose files, how many tries) must hold, because any
local user can map a file named libssl.so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.collector import probes
from agent.collector.libwatch import MAX_TRIES, LibraryWatcher
from tests.conftest import needs_root_and_bpf

SYSTEM_LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


@pytest.fixture
def obj():
    needs_root_and_bpf()
    capture = probes.load([1])
    yield capture.obj
    capture.close()


def copies(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        path = tmp_path / f"c{i}" / "libssl.so.3"
        path.parent.mkdir()
        shutil.copy(SYSTEM_LIBSSL, path)
        out.append(path)
    return out


def mapping(path: Path) -> subprocess.Popen:
    """A process that maps `path` and waits."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ctypes, sys; ctypes.CDLL(sys.argv[1]); print('up', flush=True);"
            " sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "up\n"
    return proc


def test_files_mapped_by_processes_are_attached_up_to_the_limit(obj, tmp_path):
    watcher = LibraryWatcher(obj, limit=2)
    files = copies(tmp_path, 3)
    procs = [mapping(f) for f in files]
    try:
        results = [
            watcher.on_mapped(p.pid, os.stat(f).st_dev, os.stat(f).st_ino)
            for p, f in zip(procs, files, strict=True)
        ]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert results == [True, True, False]
    assert [lib.ino for lib in watcher.attached] == [
        os.stat(f).st_ino for f in files[:2]
    ]
    assert watcher.skipped == {"limit": 1}


def test_a_file_another_user_owns_is_not_parsed(obj, tmp_path):
    watcher = LibraryWatcher(obj)
    (mine,) = copies(tmp_path, 1)
    os.chown(mine, 65534, 65534)
    proc = mapping(mine)
    try:
        st = os.stat(mine)
        assert watcher.on_mapped(proc.pid, st.st_dev, st.st_ino) is False
    finally:
        proc.kill()
        proc.wait()
    assert watcher.attached == []
    assert watcher.skipped == {"untrusted": 1}


def test_a_file_no_process_maps_is_retried_then_given_up(obj, tmp_path):
    """A failed mmap (or a process gone at once) reports the file again, a
    bounded number of times."""
    watcher = LibraryWatcher(obj)
    (copy,) = copies(tmp_path, 1)
    st = os.stat(copy)
    results = [
        watcher.on_mapped(os.getpid(), st.st_dev, st.st_ino)
        for _ in range(MAX_TRIES + 2)
    ]
    assert results == [None] * (MAX_TRIES - 1) + [False] * 3
    assert watcher.errors == MAX_TRIES + 2
