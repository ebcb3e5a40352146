"""Pipeline throughput: connection events per second, with no loss.

Method, in one run as root from a checkout:

  collector  the user-space half of the collector (record decoding, the
             tracker, checking and batch encoding) in this process, fed N real
             ring-buffer records in the kernel's layout (an OPEN and a
             CLOSE per connection): records turned into messages per second.
  downstream the real agent (`toktra-agent run`, its classifier and
             shipper as the toktra user, the local sink with its spool
             and fsyncs), fed N connection messages for LLM hosts on the
             classifier's own socket as fast as the socket takes them,
             standing in for the collector: seconds until all N events are
             in events.jsonl, and how many were dropped (must be 0).

The kernel half cannot be driven at this rate with real connections on
this machine; its cost per connection is in bench/agent_cost.py.

  .venv/bin/python -m bench.pipeline [N]
"""

from __future__ import annotations

import ipaddress
import sys
import tempfile
import time
from pathlib import Path

import zmq

from agent import wire
from agent.collector.records import RECORD, RECORD_VERSION, Kind
from agent.collector.tracker import Tracker
from agent.runtime import endpoint
from tests.harness import Agent, free_port

HOSTS = [b"api.openai.com", b"api.anthropic.com", b"generativelanguage.googleapis.com"]


def record(kind: Kind, i: int) -> bytes:
    name = HOSTS[i % len(HOSTS)]
    return RECORD.pack(
        RECORD_VERSION,
        kind,
        1,  # the name came from OpenSSL
        2,
        1000 + i % 50,
        1000 + i % 50,
        1000,
        0xFFFF888000000000 + i * 4096,
        10**12 + i,
        10**12 + i + 5_000_000,
        12_345 if kind is Kind.CLOSE else 0,
        67_890 if kind is Kind.CLOSE else 0,
        30000 + i % 30000,
        443,
        len(name),
        0,
        ipaddress.IPv4Address("127.0.0.1").packed + bytes(12),
        ipaddress.IPv4Address("203.0.113.9").packed + bytes(12),
        b"bench",
        b"bench",
        name,
    )


def collector_rate(n: int) -> float:
    records = [
        r for i in range(n) for r in (record(Kind.OPEN, i), record(Kind.CLOSE, i))
    ]
    tracker = Tracker("bench-boot", lambda pid: None)
    start = time.perf_counter()
    for data in records:
        tracker.on_record(data)
    messages = batches(tracker.take())
    elapsed = time.perf_counter() - start
    assert sum(len(wire.decode_batch("connection", m).bodies) for m in messages) == n
    return n / elapsed


def batches(conns: list[dict]) -> list[bytes]:
    """Messages as the collector's outbox makes them: checked, then batched."""
    for conn in conns:
        wire.check("connection", conn)
    return [
        wire.encode_batch("connection", conns[i : i + wire.MAX_BATCH], checked=True)
        for i in range(0, len(conns), wire.MAX_BATCH)
    ]


def connection(i: int) -> dict:
    return {
        "conn_id": f"{i:024x}",
        "final": True,
        "timestamp": 1_700_000_000_000_000_000 + i,
        "duration_ns": 5_000_000,
        "pid": 1000 + i % 50,
        "tid": 1000 + i % 50,
        "comm": "bench",
        "exe": "/usr/bin/bench",
        "uid": 1000,
        "src_port": 30000 + i % 30000,
        "dst_ip": "203.0.113.9",
        "dst_port": 443,
        "sni": HOSTS[i % len(HOSTS)].decode(),
        "sni_truncated": False,
        "sni_source": "openssl",
        "bytes_sent": 12_345,
        "bytes_received": 67_890,
    }


def downstream(n: int) -> tuple[float, int]:
    work = Path(tempfile.mkdtemp(prefix="toktra-bench-"))
    work.chmod(0o755)
    agent = Agent(work, [free_port()], {"log_level": "info", "queue_max_messages": n})
    agent.start()
    try:
        messages = batches([connection(i) for i in range(n)])
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)  # the bench may wait; the agent's bound holds
        push.connect(endpoint(str(agent.run_dir), "classifier"))
        time.sleep(0.5)  # connected before the clock starts
        start = time.perf_counter()
        for m in messages:
            push.send(m)
        lines = 0
        deadline = time.monotonic() + 300
        while lines < n and time.monotonic() < deadline:
            time.sleep(0.05)
            if agent.events_file.exists():
                with open(agent.events_file, "rb") as f:
                    lines = sum(1 for _ in f)
        elapsed = time.perf_counter() - start
        push.close()
    finally:
        agent.stop()
    return elapsed, n - lines


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rate = collector_rate(n)
    elapsed, lost = downstream(n)
    print(f"collector (user space): {rate:,.0f} connections/s over {n:,}")
    print(
        f"classifier + shipper to the local sink: {n:,} events in {elapsed:.2f} s, "
        f"{n / elapsed:,.0f} events/s, {lost} missing"
    )
    print(f"pipeline (the slower of the two): {min(rate, n / elapsed):,.0f} events/s")


if __name__ == "__main__":
    main()
