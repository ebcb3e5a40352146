"""Attaches the OpenSSL uprobes to libssl files, at start and as they are mapped.

The kernel side reports each libssl file once, by device and inode, when
a process maps it for execution; this decides whether to attach to it.
Every decision has a bound, because any local user can map a file named
libssl.so and every attachment is paid for at stop (the kernel takes about
0.1 s to remove each uprobe, four per file):

- at most `limit` files; past it, clients of further copies are still
  named, from their ClientHello;
- only files owned by root and writable by no one else: the collector
  parses the ELF of what it attaches to, and runs as root;
- a file that cannot be reached (the mapping failed, the process exited
  at once) is tried again when mapped again, at most MAX_TRIES times.

The file is opened once and attached through /proc/self/fd, so a process
that exits (or a path that changes) between the look-up and the attach
does not make it fail.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from agent.collector import libssl
from agent.collector.libbpf import BpfError, BpfObject

log = logging.getLogger("toktra.collector")

MAX_LIBRARIES = 16
MAX_TRIES = 3
# (program, function, return probe)
UPROBES = (
    ("ssl_ctrl", "SSL_ctrl", False),
    ("ssl_handshake_enter", "SSL_do_handshake", False),
    ("ssl_handshake_exit", "SSL_do_handshake", True),
    ("ssl_free", "SSL_free", False),
)
UPROBE_PROGRAMS = frozenset(prog for prog, _, _ in UPROBES)


@dataclass
class LibraryWatcher:
    obj: BpfObject
    limit: int = MAX_LIBRARIES
    proc_root: str = "/proc"
    attached: list[libssl.Library] = field(default_factory=list)
    errors: int = 0  # attempts that failed (counted each time)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files
    _tries: dict[tuple[int, int], int] = field(default_factory=dict)
    _limit_logged: bool = False

    def known(self, dev: int, ino: int) -> bool:
        return any((lib.dev, lib.ino) == (dev, ino) for lib in self.attached)

    def attach(self, lib: libssl.Library) -> bool:
        """Attaches to one file found by path; False (and logged) if not."""
        if self.known(lib.dev, lib.ino):
            return True
        if not self._room(lib.seen_as):
            return False
        try:
            fd = os.open(lib.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self.errors += 1
            log.warning("libssl %s skipped: %s", lib.seen_as, e.strerror)
            return False
        try:
            if not self._attach_fd(fd, lib):
                return False
        finally:
            os.close(fd)
        log.info("OpenSSL uprobes attached to %s (%s)", lib.seen_as, lib.path)
        return True

    def on_mapped(self, pid: int, dev: int, ino: int) -> bool | None:
        """A process mapped (dev, ino): True attached, False refused, None retry.

        On None the kernel side must be told to report the file again.
        """
        if self.known(dev, ino):
            return True
        lib = libssl.library_of(pid, dev, ino, self.proc_root)
        if lib is None:
            # The mapping failed, or the process is already gone.
            return self._retry(dev, ino, f"no mapping of it in pid {pid}")
        if not self._room(lib.seen_as):
            return False
        try:
            fd = os.open(lib.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            return self._retry(dev, ino, f"{lib.path}: {e.strerror}")
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (dev, ino):
                return self._retry(dev, ino, f"{lib.path} is now another file")
            if self._attach_fd(fd, lib):
                log.info(
                    "OpenSSL uprobes attached to %s (pid %d mapped it)",
                    lib.seen_as,
                    pid,
                )
                return True
            return False
        finally:
            os.close(fd)

    def _room(self, seen_as: str) -> bool:
        if len(self.attached) < self.limit:
            return True
        self.skipped["limit"] = self.skipped.get("limit", 0) + 1
        if not self._limit_logged:
            self._limit_logged = True
            log.warning(
                "%d libssl files attached, the limit: %s and later copies are "
                "not hooked (their clients are named from the ClientHello)",
                self.limit,
                seen_as,
            )
        return False

    def _attach_fd(self, fd: int, lib: libssl.Library) -> bool:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o022:
            self.skipped["untrusted"] = self.skipped.get("untrusted", 0) + 1
            log.info(
                "libssl %s not hooked: owned by uid %d, mode %o (only files "
                "root owns and only root may change are parsed as root)",
                lib.seen_as,
                st.st_uid,
                st.st_mode & 0o7777,
            )
            return False
        try:
            for prog, func, ret in UPROBES:
                self.obj.attach_uprobe(prog, f"/proc/self/fd/{fd}", func, ret)
        except BpfError as e:
            self.errors += 1
            log.warning("libssl %s skipped: %s", lib.seen_as, e)
            return False
        self.attached.append(lib)
        return True

    def _retry(self, dev: int, ino: int, why: str) -> bool | None:
        tries = self._tries.get((dev, ino), 0) + 1
        self._tries[(dev, ino)] = tries
        self.errors += 1
        where = f"device {os.major(dev)}:{os.minor(dev)} inode {ino}"
        if tries < MAX_TRIES:
            log.debug("libssl file (%s) not attached yet: %s", where, why)
            return None
        if tries == MAX_TRIES:
            log.warning(
                "libssl file (%s) not attached after %d tries, last: %s; its "
                "clients are named from their ClientHello (find it with "
                "`find / -xdev -inum %d`)",
                where,
                tries,
                why,
                ino,
            )
        return False
