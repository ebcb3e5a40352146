"""Finding libssl files as processes map them, on a made-up /proc.

Each layout distributions and containers use must be found through the
process's own root, de-duplicated by device and inode, and never confused
with a file that only looks like libssl. (The real /proc and the real
attach are exercised by tests/test_coverage_e2e.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.collector import libssl

LAYOUTS = [
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/lib64/libssl.so.3",
    "/usr/lib64/libssl.so.1.1",
    "/opt/app/lib/libssl.so",
]


def fake_process(proc: Path, pid: int, files: list[str]) -> list[os.stat_result]:
    """A process whose root holds `files` and whose maps name them."""
    root = proc / str(pid) / "root"
    lines, stats = [], []
    for i, path in enumerate(files):
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"\x7fELF" + path.encode())
        st = target.stat()
        stats.append(st)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        base = 0x7F0000000000 + i * 0x100000
        for off, perms in ((0, "r--p"), (0x1000, "r-xp")):
            lines.append(
                f"{base + off:x}-{base + off + 0x1000:x} {perms} {off:08x} {dev} "
                f"{st.st_ino}    {path}"
            )
    lines.append("7ffd0000-7ffd1000 rw-p 00000000 00:00 0    [stack]")
    (proc / str(pid) / "maps").write_text("\n".join(lines) + "\n")
    return stats


@pytest.mark.parametrize("path", LAYOUTS)
def test_library_of_finds_each_layout_through_the_process_root(tmp_path, path):
    proc = tmp_path / "proc"
    (st,) = fake_process(proc, 4321, [path])
    lib = libssl.library_of(4321, st.st_dev, st.st_ino, str(proc))
    assert lib is not None
    assert lib.seen_as == path
    assert lib.path == str(proc / "4321/root" / path.lstrip("/"))
    assert (lib.dev, lib.ino) == (st.st_dev, st.st_ino)


def test_library_of_refuses_a_path_that_now_names_another_file(tmp_path):
    proc = tmp_path / "proc"
    (st,) = fake_process(proc, 4321, ["/lib64/libssl.so.3"])
    # Made while the old file still exists, so it cannot reuse its inode.
    other = proc / "4321/root/lib64/other"
    other.write_bytes(b"another file")
    other.replace(proc / "4321/root/lib64/libssl.so.3")
    assert libssl.library_of(4321, st.st_dev, st.st_ino, str(proc)) is None


def test_library_of_a_process_gone_is_none(tmp_path):
    assert libssl.library_of(99999, 1, 2, str(tmp_path)) is None


def test_find_libraries_dedupes_by_inode_and_skips_look_alikes(tmp_path):
    proc = tmp_path / "proc"
    first = fake_process(proc, 100, ["/lib64/libssl.so.3", "/usr/lib/libssl3.so"])
    # A second process in the same "container": same files, same inodes.
    (proc / "101").mkdir()
    (proc / "101/maps").write_text((proc / "100/maps").read_text())
    (proc / "101/root").symlink_to(proc / "100/root")
    found = libssl.find_libraries((), proc_root=str(proc))
    ours = [lib for lib in found if lib.path.startswith(str(proc))]
    assert [(lib.seen_as, lib.ino) for lib in ours] == [
        ("/lib64/libssl.so.3", first[0].st_ino)
    ]


def test_a_configured_library_that_is_missing_is_a_warning(tmp_path, caplog):
    found = libssl.find_libraries(
        [str(tmp_path / "nope/libssl.so.3")], proc_root=str(tmp_path)
    )
    assert all("nope" not in lib.path for lib in found)
    assert "does not exist" in caplog.text
