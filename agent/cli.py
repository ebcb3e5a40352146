"""The `toktra-agent` command line.

  run                 the supervisor and its three stages (the service)
  stage NAME          one stage alone, for one systemd unit per stage
  config              the effective configuration and where each value came from

Exit codes: 0 done, 1 failed at run time, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import sys

from agent import __version__
from agent.config import ConfigError, describe, load_config_with_sources


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
    stage.add_argument("name", choices=["collector", "classifier", "shipper"])
    sub.add_parser("config", parents=[common], help="print the effective configuration")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config, sources = load_config_with_sources(args.config)
    except ConfigError as e:
        print(f"toktra-agent: configuration error: {e}", file=sys.stderr)
        return 2

    if args.command == "config":
        print(describe(config, sources))
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
