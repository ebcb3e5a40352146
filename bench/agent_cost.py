"""What the agent costs on this machine, measured in one run.

  start-up   seconds from exec to READY=1 (BPF load and attach included)
  memory     PSS of the supervisor and its three stages, summed
  overhead   time for N sequential TLS connections to a watched port with
             the agent running, as a ratio to the same without it

Run as root from a checkout: .venv/bin/python -m bench.agent_cost [N]
"""

from __future__ import annotations

import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

from tests.harness import Agent, TlsServer, dual_stack_port, make_pki


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


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
    agent.start()
    startup = time.perf_counter() - t0
    pids = [agent.proc.pid, *agent.stage_pids().values()]
    with_agent = connections(server.port, pki.ca_file, n)
    agent.wait_events(lambda evs: len(evs) >= n)
    memory = {pid: pss_kib(pid) for pid in pids}
    agent.stop()
    server.stop()

    print(f"start-up to READY=1: {startup:.2f} s")
    print(
        f"memory (PSS): {sum(memory.values()) / 1024:.1f} MiB in {len(pids)} processes"
    )
    print(
        f"{n} TLS connections: {without:.2f} s without the agent, "
        f"{with_agent:.2f} s with it: ratio {with_agent / without:.3f}"
    )


if __name__ == "__main__":
    main()
