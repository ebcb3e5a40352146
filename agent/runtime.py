"""What every stage process shares: logging, signals, readiness, privileges.

These are the seams through which a stage touches the OS (signal
handlers, setuid, the systemd notify socket), kept in one place.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import grp
import logging
import math
import os
import pwd
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("toktra")

LOG_FORMAT = "%(levelname)s %(name)s[%(process)d]: %(message)s"


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()), format=LOG_FORMAT, stream=sys.stderr
    )


def endpoint(run_dir: str, name: str) -> str:
    """The ZeroMQ address of a stage's input socket in the run directory."""
    return "ipc://" + os.path.join(run_dir, f"{name}.sock")


class StopSignals:
    """SIGTERM and SIGINT only set a flag; the stage's loop acts on it."""

    def __init__(self, *signals: signal.Signals) -> None:
        self.received: int | None = None
        for sig in signals or (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._record)

    def _record(self, signum: int, _frame: object) -> None:
        self.received = signum

    @property
    def stopping(self) -> bool:
        return self.received is not None


def sd_notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Sends one notification to systemd; False when not run by systemd."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode(), address)
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", address, e)
            return False
    return True


class Watchdog:
    """Keep-alives for systemd's WatchdogSec: WATCHDOG=1 at half its interval.

    Sent from a process's main loop, so a loop that hangs stops them and
    systemd restarts the service; disabled unless systemd asked for them
    (WATCHDOG_USEC, and WATCHDOG_PID naming this process if set).
    """

    def __init__(self, interval_s: float, clock=time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._next = 0.0

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Watchdog:
        env = os.environ if environ is None else environ
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
            pid = int(env.get("WATCHDOG_PID", "0") or 0)
        except ValueError:
            usec = 0
            pid = 0
        if usec <= 0 or (pid and pid != os.getpid()):
            return cls(math.inf)
        return cls(usec / 1e6 / 2)

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.interval_s)

    def tick(self) -> None:
        if self.enabled and self._clock() >= self._next:
            self._next = self._clock() + self.interval_s
            sd_notify("WATCHDOG=1")


class Readiness:
    """Tells whoever started this stage that it is running.

    Under the supervisor that is a pipe the supervisor reads; started
    alone (its own systemd unit) it is systemd's notify socket.
    """

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd
        # Alone under systemd a stage keeps its own watchdog; under the
        # supervisor the supervisor does.
        self.watchdog = (
            Watchdog.from_environment() if fd is None else Watchdog(math.inf)
        )

    def alive(self) -> None:
        """Called from the stage's main loop."""
        self.watchdog.tick()

    def ready(self, status: str, degraded: bool = False) -> None:
        """Running; `degraded` says it runs short of its job, and `status` how."""
        if self.fd is not None:
            note = f"degraded: {_one_line(status)}\n" if degraded else ""
            self._tell(f"{note}ready\n", "this stage is ready")
            return
        sd_notify(f"READY=1\nSTATUS={'degraded: ' if degraded else ''}{status}")

    def _tell(self, lines: str, what: str) -> None:
        """Writes to the supervisor's ready pipe; a failure is only logged."""
        try:
            os.write(self.fd, lines.encode())
        except OSError as e:
            log.warning("cannot tell the supervisor %s: %s", what, e)

    def status(self, status: str) -> None:
        if self.fd is None:
            sd_notify(f"STATUS={status}")

    def failed(self, why: str) -> None:
        """Says why the stage cannot start, before it exits non-zero."""
        line = _one_line(why)
        if self.fd is not None:
            self._tell(f"failed: {line}\n", "why this stage failed")
            return
        sd_notify(f"STATUS=start-up failed: {line}")


class DropCounter:
    """Counts messages a stage had to drop; logs once per episode.

    An episode starts with the first drop and ends at the next message
    that gets through, so a stalled consumer yields two log lines, not
    one per message.
    """

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.log = logger
        self.what = what
        self.total = 0
        self._episode = 0

    def dropped(self, why: str, count: int = 1) -> None:
        first = self._episode == 0
        self.total += count
        self._episode += count
        if first:
            self.log.error("dropping %s: %s", self.what, why)

    def passed(self) -> None:
        if self._episode:
            self.log.warning(
                "%s flowing again; %d dropped in that episode, %d in all",
                self.what,
                self._episode,
                self.total,
            )
            self._episode = 0


class Episode:
    """Logs the first of a run of like failures, and the end of the run."""

    def __init__(self, logger: logging.Logger, start: str, end: str) -> None:
        self.log = logger
        self.start = start
        self.end = end
        self.count = 0

    def happened(self, detail: str, level: int = logging.ERROR) -> None:
        self.count += 1
        if self.count == 1:
            self.log.log(level, "%s: %s", self.start, detail)

    def over(self) -> None:
        if self.count:
            self.log.warning("%s (%d times in that episode)", self.end, self.count)
            self.count = 0


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, for the calls Python's os module lacks (errno kept)."""
    return ctypes.CDLL(None, use_errno=True)


def set_process_name(name: str) -> None:
    """Sets comm (15 bytes) so ps and /proc show which stage this is."""
    with contextlib.suppress(OSError, AttributeError):
        libc().prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def lookup_account(user: str) -> Account:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise LookupError(
            f"user {user!r} does not exist; create it (useradd --system "
            f"--no-create-home --shell /usr/sbin/nologin {user}) or set `user`"
        ) from None
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid)


def drop_privileges(account: Account) -> None:
    """Becomes `account` for good: groups, then gid, then uid.

    A change of uid away from 0 clears every capability set (no
    keep-caps), which is checked afterwards rather than assumed.
    """
    if os.getuid() != 0:
        return
    os.setgroups([])
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    with open("/proc/self/status") as f:
        caps = {
            k: int(v, 16)
            for k, v in (line.split(":", 1) for line in f if line.startswith("Cap"))
        }
    held = {k: v for k, v in caps.items() if k != "CapBnd" and v}
    if held:
        raise PermissionError(
            f"capabilities remain after dropping to {account}: {held}"
        )


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _one_line(text: str) -> str:
    """A reason as one bounded line, for the ready pipe and STATUS=."""
    return " ".join(text.split())[:400]


def accept_each(
    sock: socket.socket,
    stop: threading.Event,
    handle: Callable[[socket.socket], None],
) -> None:
    """Accepts clients until `stop` is set or the socket is closed.

    The listening socket needs a timeout, so that the flag is looked at;
    `handle` gets each client and must not block.
    """
    while not stop.is_set():
        try:
            client, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        handle(client)
