"""The `toktra-agent` command line.

  run                 the supervisor and its three stages (the service)
  stage NAME          one stage alone, for one systemd unit per stage
  config              the effective configuration and where each value came from
  status              each stage, its pid and restarts, probe mode and counters
  tap STAGE           a stage's output, live, as JSON lines
  enroll              enroll (or renew) this device's certificate now
  dev-ingest          a local ingest and enrollment service to try the agent with
  osquery-extension   the connections as the osquery table toktra_connections
  doctor              check this host for the agent, one line per check

Exit codes: 0 done, 1 failed at run time, 2 bad configuration or usage;
status also 1 when degraded and 3 when the agent is not running; doctor
1 for warnings, 2 when the agent cannot run, 3 when it runs only degraded.
"""

from __future__ import annotations

import argparse
import os
import sys

from agent import __version__
from agent.config import Config, ConfigError, describe, load_config_with_sources

DOCTOR_HELP = """\
Checks, as root, what the agent needs on this host, one line per check with
what to do about each problem, including a loopback TLS handshake seen
through the real probes.

exit codes:
  0  every check is ok
  1  warnings: the agent runs with BPF capture, but something needs attention
  2  the agent cannot run (a configuration error exits 2 too)
  3  the agent runs only degraded, without server names (BPF cannot run here,
     or capture_mode = sockdiag)
"""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default: $TOKTRA_CONFIG or /etc/toktra/agent.conf)",
    )
    p = argparse.ArgumentParser(
        prog="toktra-agent",
        description="See which programs on this host talk to LLM providers.",
    )
    p.add_argument("--version", action="version", version=f"toktra-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the agent (supervisor mode)")
    stage = sub.add_parser("stage", parents=[common], help="run one stage alone")
    stage.add_argument(
        "name", choices=["collector", "classifier", "shipper", "metrics"]
    )
    sub.add_parser("status", parents=[common], help="show the running agent's state")
    tap = sub.add_parser("tap", parents=[common], help="print a stage's output live")
    tap.add_argument("name", choices=["collector", "classifier", "shipper"])
    tap.add_argument("--count", type=int, help="stop after this many messages")
    tap.add_argument("--seconds", type=float, help="stop after this long")
    sub.add_parser("config", parents=[common], help="print the effective configuration")
    sub.add_parser(
        "enroll", parents=[common], help="enroll or renew the device certificate now"
    )
    dev = sub.add_parser(
        "dev-ingest",
        help="run a local ingest and enrollment service (for trials and tests)",
        add_help=False,
    )
    dev.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser(
        "doctor",
        parents=[common],
        help="check that this host can run the agent",
        description=DOCTOR_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    osq = sub.add_parser(
        "osquery-extension",
        help="serve the connections to osquery as table toktra_connections",
        add_help=False,
    )
    osq.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _enroll(config: Config) -> int:
    """Enrolls as the shipper would, as the shipper's user, and says how it went."""
    from agent import supervisor
    from agent.runtime import drop_privileges, setup_logging
    from agent.shipper.identity import EnrollmentError
    from agent.shipper.stage import make_identity

    setup_logging(config.log_level)
    if not (config.ingest_url and config.enroll_url):
        print("toktra-agent: enroll needs ingest_url and enroll_url", file=sys.stderr)
        return 2
    try:
        account = supervisor.resolve_account(config)
        supervisor.own_dir(config.state_dir, account)
    except (supervisor.StartupError, OSError) as e:
        print(f"toktra-agent: {e}", file=sys.stderr)
        return 1
    if account is not None:
        drop_privileges(account)  # the files must belong to the shipper's user
    os.umask(0o027)  # as the shipper's own files
    identity = make_identity(config)
    assert identity is not None
    try:
        creds = identity.refresh(identity.current())
    except (EnrollmentError, OSError) as e:
        print(f"toktra-agent: enrollment failed: {e}", file=sys.stderr)
        return 1
    print(f"device       {identity.device_id}")
    print(f"certificate  {creds.cert_file} (serial {creds.serial:x})")
    print(f"key          {creds.key_file} (mode 0600)")
    print(
        f"valid        {creds.not_before:%Y-%m-%d %H:%M:%S} to "
        f"{creds.not_after:%Y-%m-%d %H:%M:%S} UTC"
    )
    print(f"renews after {creds.renew_at:%Y-%m-%d %H:%M:%S} UTC")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dev-ingest"]:
        # Its own options; it needs no agent configuration.
        from agent.ingest.cli import main as dev_ingest

        return dev_ingest(argv[1:])
    if argv[:1] == ["osquery-extension"]:
        # osquery's own flags (--socket, --timeout, --interval, --verbose).
        from agent.osquery_extension import main as osquery_extension

        return osquery_extension(argv[1:])
    args = _parser().parse_args(argv)
    try:
        config, sources = load_config_with_sources(args.config)
    except ConfigError as e:
        print(f"toktra-agent: configuration error: {e}", file=sys.stderr)
        return 2

    if args.command == "config":
        print(describe(config, sources))
        return 0
    if args.command == "enroll":
        return _enroll(config)
    if args.command == "status":
        from agent import status

        try:
            return status.show(config, sys.stdout)
        except BrokenPipeError:
            return 0  # the reader (head, less) went away
    if args.command == "doctor":
        from agent import doctor

        try:
            return doctor.run(config, sys.stdout)
        except BrokenPipeError:
            return 0  # the reader (head, less) went away
    if args.command == "tap":
        from agent import tap

        path = os.path.join(config.run_dir, f"tap-{args.name}.sock")
        if not config.taps:
            print("toktra-agent: taps are turned off (taps = false)", file=sys.stderr)
            return 1
        if not os.path.exists(path):
            print(
                f"toktra-agent: no tap at {path}: is the agent running, and may "
                "this user enter run_dir (root or the agent's group)?",
                file=sys.stderr,
            )
            return 1
        try:
            tap.follow(config.run_dir, args.name, sys.stdout, args.count, args.seconds)
        except KeyboardInterrupt:
            pass
        except BrokenPipeError:
            pass  # the reader (head, less) went away
        return 0
    if args.command == "run":
        from agent import supervisor

        return supervisor.main(config)
    if args.command == "stage":
        from agent import supervisor
        from agent.runtime import Readiness, setup_logging

        setup_logging(config.log_level)
        try:
            account = supervisor.resolve_account(config)
        except supervisor.StartupError as e:
            print(f"toktra-agent: {e}", file=sys.stderr)
            return 1
        return supervisor.run_stage(args.name, config, account, Readiness())
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
