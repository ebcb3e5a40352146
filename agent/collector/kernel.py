"""Facts about the running kernel that decide how the collector loads.

Each check reads files under an injectable root so tests can point it at a
prepared tree; `ensure_tracefs` is the only one that changes the system.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass

from agent.runtime import libc

log = logging.getLogger("toktra.collector")

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


class KernelSupportError(Exception):
    """The kernel or the process lacks something BPF capture needs."""


@dataclass(frozen=True)
class Kernel:
    sys_root: str = "/sys"
    proc_root: str = "/proc"

    @property
    def btf_path(self) -> str:
        return os.path.join(self.sys_root, "kernel/btf/vmlinux")

    @property
    def tracefs(self) -> str:
        return os.path.join(self.sys_root, "kernel/tracing")

    def release(self) -> str:
        return os.uname().release

    def require_btf(self) -> None:
        if not os.path.exists(self.btf_path):
            raise KernelSupportError(
                f"this kernel ({self.release()}) has no BTF ({self.btf_path} is "
                "missing); CO-RE capture needs CONFIG_DEBUG_INFO_BTF=y"
            )

    def effective_caps(self) -> int:
        with open(os.path.join(self.proc_root, "self/status")) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
        return 0

    def require_bpf_privilege(self) -> None:
        caps = self.effective_caps()
        if caps & (1 << CAP_SYS_ADMIN):
            return
        need = {"CAP_BPF": CAP_BPF, "CAP_PERFMON": CAP_PERFMON}
        missing = [name for name, bit in need.items() if not caps & (1 << bit)]
        if missing:
            raise KernelSupportError(
                "the collector lacks " + " and ".join(missing) + " (run it as "
                "root, or grant CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN (uprobes, "
                "tracefs), CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH)"
            )

    def ensure_tracefs(self) -> None:
        """Tracepoints are attached by id, read from tracefs: mount it."""
        if os.path.isdir(os.path.join(self.tracefs, "events")):
            return
        rc = libc().mount(b"tracefs", self.tracefs.encode(), b"tracefs", 0, None)
        if rc != 0:
            err = ctypes.get_errno()
            raise KernelSupportError(
                f"tracefs is not mounted at {self.tracefs} and mounting it "
                f"failed: {os.strerror(err)}"
            )
        log.info("mounted tracefs at %s (it was not mounted)", self.tracefs)

    def has_tracepoint(self, category: str, name: str) -> bool:
        return os.path.isdir(os.path.join(self.tracefs, "events", category, name))
