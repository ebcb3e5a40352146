"""`toktra-agent dev-ingest`: run the reference ingest service on this machine.

In: command-line options (state directory, listen address, enrollment token,
certificate lifetime).
Out: a running IngestServer until SIGINT or SIGTERM; on stdout the ingest and
enroll URLs, the CA file, where the token is kept and an agent.conf snippet;
logs on stderr. Exit status 0 after a clean stop, 1 when the service cannot
start, 2 for bad usage.

The token is printed only on the run that generated it. On later runs it is
read from `{dir}/token`, and a token given with --token is never echoed (it
is visible to other users in the process list anyway; prefer the file).
"""

from __future__ import annotations

import argparse
import datetime
import errno
import ipaddress
import json
import logging
import os
import secrets
import signal
import sys

from agent.ingest.ca import CAError, write_file_atomic
from agent.ingest.server import IngestServer

log = logging.getLogger("toktra.ingest")

PROG = "toktra-agent dev-ingest"
TOKEN_FILE = "token"
READY_LINE = "dev-ingest: serving until SIGINT or SIGTERM"


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    if int(port) > 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range")
    return host, int(port)


def _positive_days(value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    # `not days > 0` also catches NaN.
    if not days > 0 or days == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return days


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # A name could resolve anywhere; only addresses are judged.
        return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run the reference ingest and enrollment service "
        "(development and tests only).",
    )
    parser.add_argument(
        "--dir",
        default="./dev-ingest",
        help="state directory: CA, server certificate, token, received.jsonl "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--listen",
        type=_listen_address,
        default=("127.0.0.1", 8443),
        metavar="HOST:PORT",
        help="address to listen on (default: 127.0.0.1:8443; port 0 picks one)",
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --listen address other than loopback",
    )
    parser.add_argument(
        "--server-name",
        action="append",
        metavar="NAME",
        help="DNS name or IP for the server certificate; repeatable "
        "(default: localhost); the listen address is always included",
    )
    parser.add_argument(
        "--token",
        help="enrollment token (default: generated once and kept in DIR/token)",
    )
    parser.add_argument(
        "--cert-days",
        type=_positive_days,
        default=90.0,
        help="lifetime of issued device certificates in days (default: 90)",
    )
    return parser


def _load_token(directory: str) -> tuple[str, bool]:
    """The token kept in `directory`, made now if there is none; (token, new)."""
    path = os.path.join(directory, TOKEN_FILE)
    if not os.path.exists(path):
        token = secrets.token_urlsafe(32)
        try:
            write_file_atomic(path, token.encode() + b"\n", 0o600, replace=False)
            return token, True
        except FileExistsError:
            pass  # another instance made one first; use that
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"{path} is empty; remove it to generate a new token")
    return token, False


def _toml(value: str) -> str:
    # A JSON string is a valid TOML basic string.
    return json.dumps(value)


def _announce(server: IngestServer, token: str, token_note: str, new: bool) -> None:
    lines = [
        f"ingest URL:  {server.url}",
        f"enroll URL:  {server.enroll_url}",
        f"CA file:     {server.ca_file}",
        f"token:       {token_note}",
    ]
    if new:
        lines.append(f"new enrollment token (shown once): {token}")
    lines += [
        "",
        "# agent.conf",
        f"ingest_url = {_toml(server.url)}",
        f"enroll_url = {_toml(server.enroll_url)}",
        f"ca_file = {_toml(server.ca_file)}",
    ]
    if new:
        lines.append(f"enrollment_token = {_toml(token)}")
    else:
        lines.append(f'# enrollment_token = "..."  ({token_note})')
    lines += ["", READY_LINE]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    host, port = args.listen
    if not _is_loopback(host) and not args.allow_remote:
        print(
            f"{PROG}: refusing to listen on {host}, which is not a loopback "
            "address; add --allow-remote to do it anyway",
            file=sys.stderr,
        )
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )

    directory = os.path.abspath(args.dir)
    try:
        # As DevCA makes it: the agent's unprivileged user must read ca.crt;
        # the secrets in it (CA key, token) are 0600 files.
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if args.token is not None:
            token, new = args.token, False
            token_note = "the one given with --token"
        else:
            token, new = _load_token(directory)
            token_note = f"kept in {os.path.join(directory, TOKEN_FILE)}"
        server = IngestServer(
            directory,
            token=token,
            host=host,
            port=port,
            cert_lifetime=datetime.timedelta(days=args.cert_days),
            server_names=args.server_name,
        )
    except (OSError, ValueError, CAError) as err:
        print(f"{PROG}: cannot set up {directory}: {err}", file=sys.stderr)
        return 1

    # Blocked before any thread starts, so every thread inherits the mask
    # and the signals wait, undelivered, for sigwait below: no handler runs
    # in the middle of anything.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        try:
            server.start()
        except OSError as err:
            reason = (
                "address already in use"
                if err.errno == errno.EADDRINUSE
                else err.strerror or str(err)
            )
            print(f"{PROG}: cannot listen on {host}:{port}: {reason}", file=sys.stderr)
            return 1
        _announce(server, token, token_note, new)
        received = signal.sigwait(stop_signals)
        log.info("stopping on %s", signal.Signals(received).name)
        server.stop()
        # A second signal sent during the stop would otherwise be delivered
        # when the mask is restored, and kill the process after a clean stop.
        while stop_signals & signal.sigpending():
            signal.sigwait(stop_signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return 0
