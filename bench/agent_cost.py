"""What the agent costs on this machine, measured in one run.

  start-up   seconds from exec to READY=1 (BPF load and attach included)
  memory     RSS and PSS of the supervisor and its four stages, summed
  overhead   TLS connections per second a loopback client reaches with the
             agent running, divided by the same without it (one client,
             N sequential connections each way, in the same run)
  cpu        the agent's CPU time per observed connection: user and system
             time of all its processes over the N connections, plus the
             time the kernel spent in its BPF programs (bpf_stats), over N

Run as root from a checkout: .venv/bin/python -m bench.agent_cost [N]
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.collector.libwatch import UPROBE_PROGRAMS
from agent.collector.probes import SEND_HOOKS, SYSCALL_PROGRAMS
from tests.harness import Agent, TlsServer, dual_stack_port, make_pki

PROGRAMS = {
    "on_state",
    *UPROBE_PROGRAMS,
    *SYSCALL_PROGRAMS,
    *(p for progs in SEND_HOOKS.values() for p in progs),
}


def proc_kib(path: str, key: str) -> int:
    """A `key: N kB` line of a /proc file, in KiB (0 when absent)."""
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pids: list[int]) -> float:
    """User plus system time of the processes (fields 14 and 15 of stat)."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def bpf_seconds(since: float) -> float:
    """Run time of the object's programs loaded since `since` (Unix time).

    bpftool cannot name the owning process here (that needs an iterator
    program, a tracing type this kernel refuses), so programs are told by
    name and load time: run this on a machine with no other agent.
    """
    names = {p[:15] for p in PROGRAMS}
    shown = subprocess.run(
        ["bpftool", "prog", "show", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    total = 0
    for prog in json.loads(shown.stdout):
        if prog.get("name") in names and prog.get("loaded_at", 0) >= since:
            total += prog.get("run_time_ns", 0)
    return total / 1e9


def connections(port: int, ca: Path, n: int) -> float:
    ctx = ssl.create_default_context(cafile=str(ca))
    start = time.perf_counter()
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            # Without it a delayed ACK stalls each request by ~40 ms and
            # hides what the probes cost.
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(raw, server_hostname="api.openai.com") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data:
                    data += tls.recv(65536)
    return time.perf_counter() - start


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    work = Path(tempfile.mkdtemp(prefix="toktra-bench-"))
    work.chmod(0o755)  # the stages' user must reach state/ and run/ below it
    pki = make_pki(work / "pki", ["api.openai.com"])
    server = TlsServer(pki, dual_stack_port()).start()
    connections(server.port, pki.ca_file, 20)  # warm up
    without = connections(server.port, pki.ca_file, n)

    agent = Agent(work / "agent", [server.port], {"log_level": "info"})
    t0 = time.perf_counter()
    loaded_after = int(time.time())
    agent.start()
    startup = time.perf_counter() - t0
    pids = [agent.proc.pid, *agent.stage_pids().values()]
    with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
        f.write("1")
    try:
        cpu0, bpf0 = cpu_seconds(pids), bpf_seconds(loaded_after)
        with_agent = connections(server.port, pki.ca_file, n)
        agent.wait_events(lambda evs: len(evs) >= n)
        cpu1, bpf1 = cpu_seconds(pids), bpf_seconds(loaded_after)
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write("0")
    pss = sum(proc_kib(f"/proc/{pid}/smaps_rollup", "Pss") for pid in pids)
    rss = sum(proc_kib(f"/proc/{pid}/status", "VmRSS") for pid in pids)
    agent.stop()
    server.stop()

    print(f"start-up to READY=1: {startup:.2f} s")
    print(
        f"memory: RSS {rss / 1024:.1f} MiB, PSS {pss / 1024:.1f} MiB, "
        f"{len(pids)} processes"
    )
    print(
        f"{n} TLS connections: {n / without:.0f}/s without the agent, "
        f"{n / with_agent:.0f}/s with it: ratio {without / with_agent:.3f}"
    )
    user = (cpu1 - cpu0) / n * 1e6
    kernel = (bpf1 - bpf0) / n * 1e6
    print(
        f"CPU per connection: {user + kernel:.0f} us "
        f"({user:.0f} us in the agent's processes, {kernel:.0f} us in BPF programs)"
    )


if __name__ == "__main__":
    main()
