"""Loads toktra_socket.bpf.o with the send hook this kernel supports.

The object holds three variants of the send hook. libbpf loads an object
all or nothing, so exactly one variant is switched on before each load
attempt, in a fixed order of preference, and the first that loads wins:

  tracepoint  sock/sock_send_length   (Linux 6.3+; one event per send)
  fexit       tcp_sendmsg             (where tracing programs may load)
  syscalls    sys_enter_write/...     (always there; resolves fd -> socket)
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
from agent.collector.records import Stat, encode_config

log = logging.getLogger("toktra.collector")

SEND_HOOKS: dict[str, tuple[str, ...]] = {
    "tracepoint": ("send_tp",),
    "fexit": ("send_fexit",),
    "syscalls": (
        "send_sys_write",
        "send_sys_writev",
        "send_sys_sendto",
        "send_sys_sendmsg",
    ),
}
SEND_HOOK_ORDER = ("tracepoint", "fexit", "syscalls")
# (program, function, return probe)
UPROBES = (
    ("ssl_ctrl", "SSL_ctrl", False),
    ("ssl_handshake_enter", "SSL_do_handshake", False),
    ("ssl_handshake_exit", "SSL_do_handshake", True),
    ("ssl_free", "SSL_free", False),
)
OBJECT_NAME = "toktra_socket.bpf.o"
PENDING_TTL_MS = 2000
# max_entries of the conns map in bpf/toktra_socket.bpf.c, and where its
# value (struct conn) keeps the name: u64 start, u32 pid, tid, uid, u8
# established, flags, u16 sni_len, comm[16], exe[64], sni[256].
CONNS_MAX_ENTRIES = 65536
CONN_SNI_LEN = struct.Struct("<H")
CONN_SNI_LEN_OFFSET = 22
CONN_SNI_OFFSET = 24 + 16 + 64
SNI_MAX = 256
CONN_SIZE = CONN_SNI_OFFSET + SNI_MAX


class ProbeError(Exception):
    """Capture cannot start; the message says what is missing."""


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
            raise ProbeError(f"BPF object {configured} (bpf_object) does not exist")
        return configured
    for path in object_candidates():
        if os.path.isfile(path):
            return path
    raise ProbeError(
        "BPF object not found; looked in "
        + ", ".join(object_candidates())
        + " (build it with `make bpf`, or set bpf_object)"
    )


@dataclass
class Capture:
    """A loaded and attached object, and what it was attached to."""

    obj: BpfObject
    send_hook: str
    object_path: str
    libraries: list[libssl.Library] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # mode -> why
    attach_failures: dict[str, str] = field(default_factory=dict)  # libssl -> why

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

    def detach(self) -> None:
        self.obj.detach()

    def close(self) -> None:
        self.obj.close()


def _candidate_modes(requested: str, kernel: Kernel) -> list[tuple[str, str | None]]:
    """(mode, reason it is skipped or None) in the order to try."""
    modes = SEND_HOOK_ORDER if requested == "auto" else (requested,)
    out = []
    for mode in modes:
        skip = None
        if mode == "tracepoint" and not kernel.has_tracepoint(
            "sock", "sock_send_length"
        ):
            skip = "tracepoint sock/sock_send_length does not exist (Linux < 6.3)"
        elif mode == "syscalls" and not kernel.has_tracepoint(
            "syscalls", "sys_enter_write"
        ):
            skip = "syscall tracepoints are not available"
        out.append((mode, skip))
    return out


def _open_variant(bpf: Libbpf, path: str, mode: str, rodata: bytes) -> BpfObject:
    obj = BpfObject(bpf, path)
    try:
        obj.set_rodata(rodata)
        for variant, programs in SEND_HOOKS.items():
            for prog in programs:
                obj.set_autoload(prog, variant == mode)
        obj.load()
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
    rodata = encode_config(tuple(ports), PENDING_TTL_MS)

    refused: dict[str, str] = {}
    obj = None
    chosen = ""
    for mode, skip in _candidate_modes(send_hook, kernel):
        if skip:
            refused[mode] = skip
            log.info("send hook %s skipped: %s", mode, skip)
            continue
        try:
            obj = _open_variant(bpf, path, mode, rodata)
        except BpfError as e:
            refused[mode] = str(e)
            log.warning("send hook %s did not load: %s", mode, e)
            continue
        chosen = mode
        break
    if obj is None:
        detail = "; ".join(f"{m}: {why}" for m, why in refused.items())
        raise ProbeError(f"no send hook variant loads on {kernel.release()}: {detail}")

    capture = Capture(obj, chosen, path, refused=refused)
    try:
        obj.attach("on_state")
        for prog in SEND_HOOKS[chosen]:
            obj.attach(prog)
        capture.libraries = attach_libssl(obj, extra_libssl, capture.attach_failures)
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


def attach_libssl(
    obj: BpfObject, extra: Iterable[str], failures: dict[str, str] | None = None
) -> list[libssl.Library]:
    """Attaches the OpenSSL uprobes to every libssl found; never fatal.

    Files that could not be attached go into `failures` with the reason.
    """
    attached = []
    for lib in libssl.find_libraries(extra):
        try:
            for prog, func, ret in UPROBES:
                obj.attach_uprobe(prog, lib.path, func, retprobe=ret)
        except BpfError as e:
            log.warning("libssl %s skipped: %s", lib.seen_as, e)
            if failures is not None:
                failures[lib.seen_as] = str(e)
            continue
        attached.append(lib)
        log.info("OpenSSL uprobes attached to %s (%s)", lib.seen_as, lib.path)
    if not attached:
        log.warning(
            "no libssl could be attached: connections are still counted, "
            "but without the SNI OpenSSL clients ask for"
        )
    return attached
