"""A TLS client process for the capture tests, run as its own process.

It makes one HTTPS-like request per SNI, concurrently, with Python's ssl
module either on threads (blocking sockets) or on asyncio (memory BIOs),
and prints one JSON line per connection with what the client itself knows:
its pid and comm, its source port, and the kernel's TCP_INFO byte counts
read just before it closes.

usage: pyclient.py threads|asyncio HOST PORT CAFILE SECRET SNI [SNI ...]
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import struct
import sys
import threading

# Offsets of tcpi_bytes_acked and tcpi_bytes_received in struct tcp_info.
TCP_INFO_BYTES = struct.Struct("<QQ")
TCP_INFO_BYTES_OFFSET = 120


def tcp_bytes(sock) -> tuple[int, int]:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return TCP_INFO_BYTES.unpack_from(info, TCP_INFO_BYTES_OFFSET)


def request(sni: str, secret: str) -> bytes:
    body = json.dumps({"prompt": secret, "pad": "x" * 700}).encode()
    head = (
        f"POST /v1/chat HTTP/1.1\r\nHost: {sni}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def read_response(read) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = read()
        if not chunk:
            raise ConnectionError("server closed before the response headers")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        chunk = read()
        if not chunk:
            raise ConnectionError("server closed mid-body")
        rest += chunk


def result(sni: str, sock, acked: int, received: int) -> dict:
    with open("/proc/self/comm") as f:
        comm = f.read().strip()
    return {
        "sni": sni,
        "pid": os.getpid(),
        "comm": comm,
        "src_port": sock.getsockname()[1],
        "acked": acked,
        "received": received,
    }


def one_blocking(ctx, host, port, sni, secret, out, lock) -> None:
    with socket.create_connection((host, port), timeout=20) as raw:
        tls = ctx.wrap_socket(raw, server_hostname=sni)
        tls.sendall(request(sni, secret))
        read_response(lambda: tls.recv(65536))
        acked, received = tcp_bytes(tls)
        row = result(sni, tls, acked, received)
        tls.close()
    with lock:
        out.append(row)


async def one_async(ctx, host, port, sni, secret) -> dict:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ctx, server_hostname=sni), 20
    )
    writer.write(request(sni, secret))
    await writer.drain()
    await asyncio.wait_for(_read_async(reader), 20)
    sock = writer.get_extra_info("socket")
    acked, received = tcp_bytes(sock)
    row = result(sni, sock, acked, received)
    # Close the TCP connection at once, as the blocking clients do, instead
    # of the TLS close_notify exchange asyncio would start (and wait on).
    writer.transport.abort()
    return row


async def _read_async(reader) -> None:
    buf = bytearray()
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError("server closed early")
        buf += chunk
        if b"\r\n\r\n" in buf:
            head, rest = bytes(buf).split(b"\r\n\r\n", 1)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            if len(rest) >= length:
                return


def main() -> None:
    mode, host, port, cafile, secret, *snis = sys.argv[1:]
    ctx = ssl.create_default_context(cafile=cafile)
    # Some names are sent as "API.OPENAI.COM." on purpose, which Python's
    # name check refuses; the chain is still verified.
    ctx.check_hostname = False
    out: list[dict] = []
    if mode == "threads":
        lock = threading.Lock()
        threads = [
            threading.Thread(
                target=one_blocking, args=(ctx, host, int(port), s, secret, out, lock)
            )
            for s in snis
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:

        async def all_of_them():
            return await asyncio.gather(
                *(one_async(ctx, host, int(port), s, secret) for s in snis)
            )

        out = asyncio.run(all_of_them())
    for row in out:
        print(json.dumps(row), flush=True)
    if len(out) != len(snis):
        sys.exit(f"only {len(out)} of {len(snis)} connections completed")


if __name__ == "__main__":
    main()
