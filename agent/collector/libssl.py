"""Finds the OpenSSL libraries that processes on this host use.

A uprobe is attached to a file's inode, not to a path, so each distinct
file is attached once, through a path that reaches it from our mount
namespace: `/proc/PID/root/<path as the process sees it>` covers copies
inside containers and other mount namespaces.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

log = logging.getLogger("toktra.collector")

_LIBSSL = re.compile(r"/libssl\.so(\.[0-9]+)*$")
# Where distributions keep the system library, checked even when no
# running process maps it yet (a client started later uses the same inode).
STANDARD_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/x86_64-linux-gnu/libssl.so.1.1",
    "/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib64/libssl.so.3",
    "/lib64/libssl.so.3",
    "/usr/lib64/libssl.so.1.1",
    "/usr/lib/aarch64-linux-gnu/libssl.so.3",
    "/usr/lib/libssl.so.3",
)


@dataclass(frozen=True)
class Library:
    path: str  # a path that opens the file from this mount namespace
    dev: int
    ino: int
    seen_as: str  # the path as the first process that maps it names it


def _mapped_paths(proc_root: str) -> Iterator[tuple[str, str]]:
    """(pid, path) for every libssl file mapped by a running process."""
    try:
        pids = [p for p in os.listdir(proc_root) if p.isdigit()]
    except OSError as e:
        log.warning("cannot list %s: %s", proc_root, e)
        return
    for pid in pids:
        try:
            with open(os.path.join(proc_root, pid, "maps"), "rb") as f:
                data = f.read()
        except OSError:
            continue  # exited, or a kernel thread
        seen: set[bytes] = set()
        for line in data.splitlines():
            parts = line.split(None, 5)
            if len(parts) < 6 or b"libssl.so" not in parts[5]:
                continue
            path = parts[5]
            if path in seen or path.endswith(b" (deleted)"):
                continue
            seen.add(path)
            text = os.fsdecode(path)
            if _LIBSSL.search(text):
                yield pid, text


def find_libraries(
    extra: Iterable[str] = (), proc_root: str = "/proc", scan_processes: bool = True
) -> list[Library]:
    """Every distinct libssl file, de-duplicated by device and inode."""
    found: dict[tuple[int, int], Library] = {}

    def consider(path: str, seen_as: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        if key not in found:
            found[key] = Library(path, st.st_dev, st.st_ino, seen_as)

    for path in extra:
        if not os.path.exists(path):
            log.warning("configured libssl %s does not exist; skipped", path)
        consider(path, path)
    for path in STANDARD_PATHS:
        consider(path, path)
    if scan_processes:
        for pid, path in _mapped_paths(proc_root):
            consider(os.path.join(proc_root, pid, "root", path.lstrip("/")), path)
    return list(found.values())


def library_of(
    pid: int, dev: int, ino: int, proc_root: str = "/proc"
) -> Library | None:
    """The libssl file (dev, ino) as process `pid` maps it, or None.

    The path is reached through the process's own root, so a copy inside a
    container opens as that copy; the inode is checked again after the
    lookup, so a path that now names another file is not used.
    """
    try:
        with open(os.path.join(proc_root, str(pid), "maps"), "rb") as f:
            data = f.read()
    except OSError:
        return None
    for line in data.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or parts[4] != str(ino).encode():
            continue
        text = os.fsdecode(parts[5]).removesuffix(" (deleted)")
        path = os.path.join(proc_root, str(pid), "root", text.lstrip("/"))
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (dev, ino):
            return Library(path, dev, ino, text)
    return None
