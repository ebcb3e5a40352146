"""Loads toktra_socket.bpf.o with the send hook this kernel supports.

The object holds three variants of the send hook. libbpf loads an object
all or nothing, so exactly one variant is switched on before each load
attempt, in a fixed order of preference, and the first that loads wins:

  tracepoint  sock/sock_send_length   (Linux 6.3+; one event per send)
  fexit       tcp_sendmsg             (where tracing programs may load)
  syscalls    sys_enter_write/...     (always there; resolves fd -> socket)

The syscall programs load in every mode, because they also copy each
connection's ClientHello and report new libssl files as they are mapped;
in the syscalls mode a flag in the read-only data makes them bind names
too.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.collector import libssl
from agent.collector.kernel import Kernel, KernelSupportError
from agent.collector.libbpf import BpfError, BpfObject, Libbpf, RingBuffer
from agent.collector.libwatch import UPROBE_PROGRAMS, LibraryWatcher
from agent.collector.records import Stat, encode_config

log = logging.getLogger("toktra.collector")

SEND_HOOKS: dict[str, tuple[str, ...]] = {
    "tracepoint": ("send_tp",),
    "fexit": ("send_fexit",),
    "syscalls": (),  # the always-on syscall programs, with bind_on_syscall
}
# Always loaded when the kernel has syscall tracepoints.
SYSCALL_PROGRAMS = (
    "send_sys_write",
    "send_sys_writev",
    "send_sys_sendto",
    "send_sys_sendmsg",
    "on_mmap",
)
SEND_HOOK_ORDER = ("tracepoint", "fexit", "syscalls")
OBJECT_NAME = "toktra_socket.bpf.o"
PENDING_TTL_MS = 2000
# max_entries of the conns map in bpf/toktra_socket.bpf.c, and where its
# value (struct conn) keeps the name: u64 start, u32 pid, tid, uid, u8
# established, flags, u16 sni_len, comm[16], exe[64], sni[256], then the
# ClientHello capture state (u16, u16, u8, u8, 2 bytes of padding).
CONNS_MAX_ENTRIES = 65536
CONN_SNI_LEN = struct.Struct("<H")
CONN_SNI_LEN_OFFSET = 22
CONN_SNI_OFFSET = 24 + 16 + 64
SNI_MAX = 256
CONN_SIZE = CONN_SNI_OFFSET + SNI_MAX + 8
_U64 = struct.Struct("<Q")
_LIB_KEY = struct.Struct("<QQ")


class ProbeError(Exception):
    """Capture cannot start; the message says what is missing.

    `environment` is true when the host cannot run the probes (no BTF, no
    privilege, a kernel that refuses every variant), false when the
    install is broken (no object): only the first may fall back to
    polling.
    """

    def __init__(self, message: str, environment: bool = True) -> None:
        super().__init__(message)
        self.environment = environment


def object_candidates() -> list[str]:
    """Where the object is looked for when no path is configured."""
    checkout = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "build",
        OBJECT_NAME,
    )
    return [checkout, os.path.join("/usr/lib/toktra", OBJECT_NAME)]


def find_object(configured: str) -> str:
    if configured:
        if not os.path.isfile(configured):
            raise ProbeError(
                f"BPF object {configured} (bpf_object) does not exist",
                environment=False,
            )
        return configured
    for path in object_candidates():
        if os.path.isfile(path):
            return path
    raise ProbeError(
        "BPF object not found; looked in "
        + ", ".join(object_candidates())
        + " (build it with `make bpf`, or set bpf_object)",
        environment=False,
    )


@dataclass
class Capture:
    """A loaded and attached object, and what it was attached to."""

    obj: BpfObject
    send_hook: str
    object_path: str
    watcher: LibraryWatcher
    hello: bool = True  # ClientHello capture and libssl watching are on
    refused: dict[str, str] = field(default_factory=dict)  # mode -> why
    requested: str = "auto"  # the configured send_hook

    @property
    def fell_back(self) -> bool:
        """A configured send hook was refused and another one runs."""
        return self.requested not in ("auto", self.send_hook)

    @property
    def libraries(self) -> list[libssl.Library]:
        return self.watcher.attached

    def ring_buffer(self, handler: Callable[[bytes], None]) -> RingBuffer:
        return self.obj.ring_buffer("events", handler)

    def stats(self) -> dict[Stat, int]:
        values = self.obj.read_percpu_u64("stats", len(Stat))
        return {s: values[s] for s in Stat}

    def tracked_connections(self) -> int:
        return self.obj.count_u64_keys("conns", CONNS_MAX_ENTRIES)

    def bound_sni(self, sock: int) -> bytes | None:
        """The name bound so far to an open connection, from the conns map."""
        value = self.obj.lookup_u64("conns", sock, CONN_SIZE)
        if value is None:
            return None
        (length,) = CONN_SNI_LEN.unpack_from(value, CONN_SNI_LEN_OFFSET)
        if length == 0:
            return None
        return value[CONN_SNI_OFFSET : CONN_SNI_OFFSET + min(length, SNI_MAX)]

    def adopt(self, cookie: int) -> None:
        """Asks for a close record of a connection opened before us."""
        self.obj.update("adopted", _U64.pack(cookie), b"\x01")

    def mark_library(self, dev: int, ino: int, seen: bool) -> None:
        """Tells the kernel side a libssl file needs no report (or again one)."""
        key = _LIB_KEY.pack(_kernel_dev(dev), ino)
        if seen:
            self.obj.update("libs_seen", key, b"\x01")
        else:
            self.obj.delete("libs_seen", key)

    def on_mapped(self, pid: int, dev: int, ino: int) -> None:
        """A process mapped a libssl file the kernel side had not reported."""
        if self.watcher.on_mapped(pid, dev, ino) is None:
            self.mark_library(dev, ino, seen=False)  # report it again

    def detach_events(self) -> None:
        """Stops everything that makes records; the uprobes stay.

        Removing uprobes is slow (about 0.1 s each), so a stopping
        collector first hands over what it holds, then lets them go.
        """
        self.obj.detach(
            [name for name, _ in self.obj.programs() if name not in UPROBE_PROGRAMS]
        )

    def detach(self) -> None:
        self.obj.detach()

    def close(self) -> None:
        self.obj.close()


def _candidate_modes(requested: str, kernel: Kernel) -> list[tuple[str, str | None]]:
    """(mode, reason it is skipped or None) in the order to try.

    A requested mode goes first, and a requested tracepoint is tried even
    where tracefs does not list it: the kernel's refusal is the evidence an
    operator needs. (The syscalls mode would load without its programs and
    see nothing, so it is always skipped when they are missing.) The auto
    order follows, so a wrong choice costs an error line, not the capture.
    """
    modes = list(SEND_HOOK_ORDER)
    if requested != "auto":
        modes.remove(requested)
        modes.insert(0, requested)
    out = []
    for mode in modes:
        skip = None
        if (
            mode == "tracepoint"
            and mode != requested
            and not kernel.has_tracepoint("sock", "sock_send_length")
        ):
            skip = "tracepoint sock/sock_send_length does not exist (Linux < 6.3)"
        elif mode == "syscalls" and not kernel.has_tracepoint(
            "syscalls", "sys_enter_write"
        ):
            skip = "syscall tracepoints are not available"
        out.append((mode, skip))
    return out


def _kernel_dev(dev: int) -> int:
    """os.stat()'s st_dev as the kernel keeps it (major << 20 | minor)."""
    return os.major(dev) << 20 | os.minor(dev)


def _open_variant(
    bpf: Libbpf, path: str, mode: str, rodata: bytes, syscalls: bool
) -> BpfObject:
    obj = BpfObject(bpf, path)
    try:
        obj.set_rodata(rodata)
        for variant, programs in SEND_HOOKS.items():
            for prog in programs:
                obj.set_autoload(prog, variant == mode)
        for prog in SYSCALL_PROGRAMS:
            obj.set_autoload(prog, syscalls)
        obj.load()
        # A tracepoint program loads anywhere; only attaching it finds out
        # whether the kernel has that tracepoint, so it decides here too.
        for prog in SEND_HOOKS[mode]:
            obj.attach(prog)
    except BaseException:
        obj.close()
        raise
    return obj


def load(
    ports: Iterable[int],
    send_hook: str = "auto",
    object_path: str = "",
    extra_libssl: Iterable[str] = (),
    kernel: Kernel | None = None,
    bpf: Libbpf | None = None,
) -> Capture:
    """Loads, attaches, and returns the capture; raises ProbeError."""
    kernel = kernel or Kernel()
    try:
        kernel.require_btf()
        kernel.require_bpf_privilege()
        kernel.ensure_tracefs()
    except KernelSupportError as e:
        raise ProbeError(str(e)) from e
    path = find_object(object_path)
    try:
        bpf = bpf or Libbpf()
    except BpfError as e:
        raise ProbeError(str(e)) from e
    syscalls = kernel.has_tracepoint("syscalls", "sys_enter_write")
    if not syscalls:
        log.warning(
            "syscall tracepoints are missing: no ClientHello capture (only "
            "OpenSSL clients get a name) and no attach to libssl files "
            "mapped after start"
        )

    refused: dict[str, str] = {}
    obj = None
    chosen = ""
    for mode, skip in _candidate_modes(send_hook, kernel):
        if skip:
            refused[mode] = skip
            log.info("send hook %s skipped: %s", mode, skip)
            continue
        rodata = encode_config(tuple(ports), PENDING_TTL_MS, mode == "syscalls")
        try:
            obj = _open_variant(bpf, path, mode, rodata, syscalls)
        except BpfError as e:
            refused[mode] = str(e)
            if mode == send_hook:
                log.error(
                    "configured send_hook = %s does not load on %s, falling "
                    "back to the next that does (set send_hook = auto to let "
                    "the agent choose): %s",
                    mode,
                    kernel.release(),
                    e,
                )
            else:
                log.warning("send hook %s did not load: %s", mode, e)
            continue
        chosen = mode
        break
    if obj is None:
        detail = "; ".join(f"{m}: {why}" for m, why in refused.items())
        raise ProbeError(f"no send hook variant loads on {kernel.release()}: {detail}")

    capture = Capture(
        obj,
        chosen,
        path,
        LibraryWatcher(obj),
        hello=syscalls,
        refused=refused,
        requested=send_hook,
    )
    try:
        obj.attach("on_state")
        if syscalls:
            for prog in SYSCALL_PROGRAMS:
                obj.attach(prog)
        for lib in libssl.find_libraries(extra_libssl):
            capture.watcher.attach(lib)
            # Decided, either way: no need to hear of it again.
            capture.mark_library(lib.dev, lib.ino, seen=True)
        if not capture.libraries:
            log.warning(
                "no libssl could be attached: OpenSSL clients are named from "
                "their ClientHello only"
            )
    except BpfError as e:
        capture.close()
        raise ProbeError(f"attaching probes failed: {e}") from e
    log.info(
        "capture attached: send_hook=%s object=%s libssl=%d kernel=%s",
        chosen,
        path,
        len(capture.libraries),
        kernel.release(),
    )
    return capture
