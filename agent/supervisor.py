"""The supervisor: forks the stages, watches them, restarts them.

  metrics     unprivileged   started first: it binds the socket every
                             process sends its counters to, and serves them
  shipper     unprivileged   binds the socket the classifier sends to,
  classifier  unprivileged   which binds the one
  collector   privileged     the collector sends to

A stage that dies is restarted alone, with backoff; the others keep
running. One that dies again and again is reported as failing (log,
STATUS, metric) and still retried. Shutdown goes the other way, upstream
first, so each stage can empty its queue before the next one is told to
stop. In this mode the supervisor is the only process that talks to
systemd: READY, STATUS lines and, when WatchdogSec is set, keep-alives.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import os
import select
import signal
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent import stats
from agent.config import Config
from agent.runtime import (
    Account,
    Readiness,
    StopSignals,
    Watchdog,
    drop_privileges,
    lookup_account,
    sd_notify,
    set_process_name,
    setup_logging,
)

log = logging.getLogger("toktra.supervisor")

START_ORDER = ("metrics", "shipper", "classifier", "collector")
PRIVILEGED = frozenset({"collector"})
SUPERVISOR_COMM = "toktra-agent"
# Process names (comm holds 15 bytes), so ps and top tell the stages apart.
COMM = {
    "collector": "toktra-collect",
    "classifier": "toktra-classify",
    "shipper": "toktra-ship",
    "metrics": "toktra-metrics",
}
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
# A stage that ran this long before dying starts again with no delay.
HEALTHY_AFTER_S = 60.0
# This many deaths, each within HEALTHY_AFTER_S of its start, make a stage
# "failing" until it runs that long again.
FAILING_AFTER_DEATHS = 3
STOP_TIMEOUT_S = 15.0
START_TIMEOUT_S = 60.0


class StartupError(Exception):
    """The agent cannot start; the message says why."""


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"


Runner = Callable[[Readiness, StopSignals], int]


def prepare_stage(name: str, config: Config) -> Runner:
    """Imports a stage and reads what it needs, while still privileged.

    Everything a stage reads from the agent's own files (code, catalog)
    is read here, before privileges drop; what it does afterwards touches
    only its sockets and state_dir.
    """
    if name == "collector":
        from agent.collector.stage import Collector

        return Collector(config).run
    if name == "classifier":
        from agent.classifier import stage as classifier

        return classifier.prepare(config)
    if name == "shipper":
        from agent.shipper import stage as shipper

        return shipper.prepare(config)
    if name == "metrics":
        from agent import metrics

        return metrics.prepare(config)
    raise ValueError(f"unknown stage {name!r}; stages are {', '.join(START_ORDER)}")


def run_stage(
    name: str,
    config: Config,
    account: Account | None,
    ready: Readiness,
    managed: bool = False,
) -> int:
    """Runs one stage in this process: name it, prepare, drop privileges, go.

    Under the supervisor (managed) a stage stops only when the supervisor
    says so: a Ctrl-C reaches the whole process group, and stages that
    left on their own would leave in the wrong order and lose events.
    """
    set_process_name(COMM[name])
    if not os.path.isdir(config.run_dir):
        # The supervisor makes it; for units alone, systemd-tmpfiles does.
        why = (
            f"run_dir {config.run_dir} does not exist (create it owned by "
            f"{config.user}, mode 0750, or install units/toktra.tmpfiles.conf)"
        )
        log.error("%s stage cannot start: %s", name, why)
        ready.failed(why)
        return 1
    signals = StopSignals(signal.SIGTERM) if managed else StopSignals()
    if managed:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    runner = prepare_stage(name, config)
    if name not in PRIVILEGED and account is not None:
        drop_privileges(account)
    os.umask(0o027)
    log.info("%s stage starting (uid=%d)", name, os.getuid())
    return runner(ready, signals)


@dataclass
class Stage:
    name: str
    state: State = State.STOPPED
    pid: int = 0
    ready_fd: int = -1
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S
    failure: str = ""
    degraded: str = ""  # the stage runs, but short of what it should do
    quick_deaths: int = 0  # deaths in a row, each soon after its start
    failing: bool = False

    def to(self, state: State, why: str) -> None:
        if state is not self.state:
            log.info(
                "stage %s: %s -> %s (%s)", self.name, self.state.value, state.value, why
            )
            self.state = state


@dataclass
class Supervisor:
    config: Config
    account: Account | None
    stages: dict[str, Stage] = field(default_factory=dict)
    notified_ready: bool = False
    stopping: bool = False
    watchdog: Watchdog = field(default_factory=Watchdog.from_environment)
    _wake_r: int = -1
    _last_status: str = ""

    def __post_init__(self) -> None:
        self.stages = {name: Stage(name) for name in START_ORDER}

    # -- setup --

    def prepare_dirs(self) -> None:
        """run_dir and state_dir belong to the stages' user, mode 0750.

        The unprivileged stages bind their sockets in run_dir, so only
        that user (and root, for the collector) can connect to them.
        """
        for key in ("run_dir", "state_dir"):
            path = getattr(self.config, key)
            try:
                own_dir(path, self.account)
            except (OSError, ValueError) as e:
                why = getattr(e, "strerror", None) or str(e)
                raise StartupError(f"{key} {path!r}: {why}") from None

    def lock_run_dir(self) -> int:
        """Held for the supervisor's life: one agent per run directory."""
        path = os.path.join(self.config.run_dir, "supervisor.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StartupError(
                f"cannot create {path}: {e.strerror} (under systemd the unit must "
                "keep CAP_DAC_OVERRIDE to write in the toktra-owned run_dir)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(
                f"another agent is running with run_dir {self.config.run_dir}"
            ) from None
        return fd

    def remove_sockets(self) -> None:
        names = ["stats", *(n for n in START_ORDER if n != "metrics")]
        names += [f"tap-{n}" for n in START_ORDER if n != "metrics"]
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.config.run_dir, f"{name}.sock"))

    # -- processes --

    def spawn(self, stage: Stage) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            self._child(stage, w)
        os.close(w)
        stage.pid, stage.ready_fd = pid, r
        stage.started_at = time.monotonic()
        stage.failure = ""
        stage.degraded = ""
        stage.to(State.STARTING, f"pid {pid}")

    def _child(self, stage: Stage, ready_w: int) -> None:
        code = 1
        try:
            for other in self.stages.values():
                if other.ready_fd >= 0:
                    os.close(other.ready_fd)
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            for sig in (signal.SIGCHLD, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = run_stage(
                stage.name, self.config, self.account, Readiness(ready_w), managed=True
            )
        except BaseException as e:
            try:
                os.write(ready_w, f"failed: {e}\n".encode()[:512])
                sys.stderr.write(f"toktra-{stage.name}: {e}\n")
            except OSError:
                pass
        finally:
            logging.shutdown()
            os._exit(code)

    def read_ready(self, stage: Stage) -> None:
        try:
            data = os.read(stage.ready_fd, 4096)
        except OSError:
            data = b""
        if not data:
            os.close(stage.ready_fd)
            stage.ready_fd = -1
            return
        for line in data.decode("utf-8", "replace").splitlines():
            if line == "ready":
                stage.to(State.RUNNING, "ready")
            elif line.startswith("failed: "):
                stage.failure = line.removeprefix("failed: ")
            elif line.startswith("degraded: "):
                stage.degraded = line.removeprefix("degraded: ")

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for stage in self.stages.values():
                if stage.pid == pid:
                    self.exited(stage, status)

    def exited(self, stage: Stage, status: int) -> None:
        if stage.ready_fd >= 0:
            self.read_ready(stage)
            if stage.ready_fd >= 0:
                os.close(stage.ready_fd)
                stage.ready_fd = -1
        how = _describe_status(status)
        stage.pid = 0
        if self.stopping:
            stage.to(State.STOPPED, how)
            return
        now = time.monotonic()
        if now - stage.started_at >= HEALTHY_AFTER_S:
            stage.backoff_s = BACKOFF_FIRST_S
            stage.quick_deaths = 0
        stage.quick_deaths += 1
        stage.next_start = now + stage.backoff_s
        reason = f"{how}{': ' + stage.failure if stage.failure else ''}"
        if stage.quick_deaths >= FAILING_AFTER_DEATHS and not stage.failing:
            stage.failing = True
            log.error(
                "stage %s is failing: died %d times in a row soon after starting "
                "(last: %s); still retrying, the other stages keep running",
                stage.name,
                stage.quick_deaths,
                reason,
            )
        log.error(
            "stage %s died (%s); restarting in %.0fs",
            stage.name,
            reason,
            stage.backoff_s,
        )
        stage.backoff_s = min(stage.backoff_s * 2, BACKOFF_MAX_S)
        stage.to(State.BACKOFF, reason)

    # -- main loop --

    def start(self) -> None:
        """Starts every stage in order, each after the previous is ready."""
        for name in START_ORDER:
            stage = self.stages[name]
            sd_notify(f"STATUS=starting {name}")
            self.spawn(stage)
            deadline = time.monotonic() + START_TIMEOUT_S
            while stage.state is State.STARTING:
                if self.signals.stopping:
                    raise StartupError("stopped during start-up")
                if time.monotonic() > deadline:
                    raise StartupError(
                        f"{name} did not become ready in {START_TIMEOUT_S:.0f}s"
                    )
                self.wait(1.0)
            if stage.state is not State.RUNNING:
                raise StartupError(
                    f"{name} failed to start: {stage.failure or 'it exited'}"
                )

    def wait(self, timeout: float) -> None:
        fds = [self._wake_r] + [
            s.ready_fd for s in self.stages.values() if s.ready_fd >= 0
        ]
        try:
            readable, _, _ = select.select(fds, [], [], max(timeout, 0.0))
        except InterruptedError:
            readable = []
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        for stage in self.stages.values():
            if stage.ready_fd >= 0 and stage.ready_fd in readable:
                self.read_ready(stage)
        self.reap()

    def loop(self) -> None:
        reporter = self._reporter()
        try:
            while not self.signals.stopping:
                now = time.monotonic()
                for stage in self.stages.values():
                    if stage.state is State.BACKOFF and now >= stage.next_start:
                        stage.restarts += 1
                        self.spawn(stage)
                    elif (
                        stage.failing
                        and stage.state is State.RUNNING
                        and now - stage.started_at >= HEALTHY_AFTER_S
                    ):
                        stage.failing = False
                        stage.quick_deaths = 0
                        log.warning("stage %s is running steadily again", stage.name)
                up = [s.name for s in self.stages.values() if s.state is State.RUNNING]
                if len(up) == len(self.stages) and not self.notified_ready:
                    self.notified_ready = True
                    log.info("agent ready: all stages running")
                    sd_notify("READY=1\nSTATUS=" + self.status_line())
                self.notify_status()
                self.watchdog.tick()
                reporter.tick()
                self.wait(min(1.0, self.watchdog.interval_s))
        finally:
            reporter.close()

    def status_line(self) -> str:
        failing = [s.name for s in self.stages.values() if s.failing]
        down = [
            s.name
            for s in self.stages.values()
            if s.state is not State.RUNNING and not s.failing
        ]
        if failing:
            return "degraded: " + ", ".join(f"{n} keeps failing" for n in failing)
        if down:
            return "degraded: restarting " + ", ".join(down)
        short = [f"{s.name} {s.degraded}" for s in self.stages.values() if s.degraded]
        if short:
            return "degraded: " + "; ".join(short)
        return "running: " + ", ".join(self.stages)

    def notify_status(self) -> None:
        """Sends STATUS= when it changes; systemctl status shows it."""
        line = self.status_line()
        if line != self._last_status and self.notified_ready:
            sd_notify(f"STATUS={line}")
            self._last_status = line

    def samples(self) -> list[stats.Sample]:
        out: list[stats.Sample] = []
        for stage in self.stages.values():
            labels = {"stage": stage.name}
            out.append(("toktra_stage_restarts_total", labels, stage.restarts))
            out.append(("toktra_stage_failing", labels, 1.0 if stage.failing else 0.0))
        return out

    def _reporter(self) -> stats.Reporter:
        import zmq

        return stats.Reporter(
            zmq.Context.instance(), self.config.run_dir, "supervisor", self.samples
        )

    def stop(self) -> None:
        self.stopping = True
        sd_notify("STOPPING=1\nSTATUS=stopping")
        for name in reversed(START_ORDER):
            stage = self.stages[name]
            if not stage.pid:
                stage.to(State.STOPPED, "not running")
                continue
            stage.to(State.STOPPING, "agent stopping")
            _kill(stage.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while stage.pid and time.monotonic() < deadline:
                self.wait(0.1)
            if stage.pid:
                log.error(
                    "stage %s did not stop in %.0fs; killing it", name, STOP_TIMEOUT_S
                )
                _kill(stage.pid, signal.SIGKILL)
                while stage.pid:
                    self.wait(0.1)

    def run(self) -> int:
        self.signals = StopSignals()
        self._wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        try:
            self.prepare_dirs()
            self._lock = self.lock_run_dir()
            self.start()
            self.loop()
        except StartupError as e:
            log.error("start-up failed: %s", e)
            self.stop()
            # Last, so that systemctl status shows why, not "stopping".
            sd_notify(f"STATUS=start-up failed: {e}")
            return 1
        self.stop()
        self.remove_sockets()
        log.info("agent stopped")
        return 0


def own_dir(path: str, account: Account | None) -> None:
    """Creates `path` 0750 for the stages' user, or takes over an empty one."""
    try:
        os.mkdir(path, 0o750)
        created = True
    except FileExistsError:
        created = False
    if not created:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory")
        owner = account.uid if account else os.getuid()
        # An empty directory (as systemd creates them) is ours to take;
        # one holding someone else's files is not.
        if st.st_uid != owner and os.listdir(path):
            raise PermissionError(
                errno.EPERM,
                f"exists, belongs to uid {st.st_uid} and is not empty; "
                "point the key at a directory of the agent's own",
            )
    if account is not None:
        os.chown(path, account.uid, account.gid)
    os.chmod(path, 0o750)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        # Without CAP_KILL root cannot signal a stage that runs as toktra.
        log.error(
            "cannot send %s to pid %d: permission denied (the unit must keep CAP_KILL)",
            signal.Signals(sig).name,
            pid,
        )


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def resolve_account(config: Config) -> Account | None:
    """The account for unprivileged stages; None when not running as root."""
    if os.getuid() != 0:
        return None
    try:
        account = lookup_account(config.user)
    except LookupError as e:
        raise StartupError(str(e)) from None
    if account.uid == 0:
        raise StartupError(
            f"user {config.user!r} is root; the classifier and shipper must run "
            "as an unprivileged account"
        )
    return account


def unreadable_paths(account: Account) -> list[str]:
    """Paths of our own code the unprivileged stages could not read.

    They import lazily after dropping privileges, so the interpreter's
    library and the agent's package must be readable by that user; a
    checkout under /root is the usual way this goes wrong.
    """
    import agent

    needed = [os.path.dirname(os.__file__), os.path.dirname(agent.__file__)]
    return [p for p in needed if not _readable_by(p, account)]


def _readable_by(path: str, account: Account) -> bool:
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        st = os.stat(os.sep.join(parts[:i]) or os.sep)
        if st.st_uid == account.uid:
            ok = st.st_mode & 0o500 == 0o500
        elif st.st_gid == account.gid:
            ok = st.st_mode & 0o050 == 0o050
        else:
            ok = st.st_mode & 0o005 == 0o005
        if not ok:
            return False
    return True


def _file_readable_by(path: str, account: Account) -> bool:
    path = os.path.realpath(path)
    if not _readable_by(os.path.dirname(path), account):
        return False
    st = os.stat(path)
    if st.st_uid == account.uid:
        return bool(st.st_mode & 0o400)
    if st.st_gid == account.gid:
        return bool(st.st_mode & 0o040)
    return bool(st.st_mode & 0o004)


def main(config: Config) -> int:
    setup_logging(config.log_level)
    # Whatever started it (a console script, python3 -m), `status` and ps
    # know the supervisor by this name.
    set_process_name(SUPERVISOR_COMM)
    if os.getuid() != 0:
        log.error("toktra-agent run needs root: the collector loads BPF programs")
        return 1
    try:
        account = resolve_account(config)
        if account is not None and (hidden := unreadable_paths(account)):
            raise StartupError(
                f"user {account.name} cannot read {', '.join(hidden)}; install "
                "the agent where that user can read it (the Debian package, or "
                "a checkout outside /root built with Debian's python3)"
            )
        if (
            account is not None
            and config.ca_file
            and not _file_readable_by(config.ca_file, account)
        ):
            raise StartupError(
                f"ca_file {config.ca_file}: user {account.name}, who runs the "
                "shipper, cannot read it; make it and its directories readable"
            )
    except StartupError as e:
        log.error("%s", e)
        sd_notify(f"STATUS=start-up failed: {e}")
        return 1
    return Supervisor(config, account).run()
