"""The ``l7proxy`` command line: one argparse tree, one module per command group.

Each group module has ``register(subparsers)``, which adds its commands and
binds each to its handler with ``set_defaults(func=...)``; handlers take the
parsed arguments and return the exit code. The work itself is done by the
packages the handlers call (agent, node, policy, proxy, observe).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from l7proxy.cli import agent, endpoint, firewall, observe, policy
from l7proxy.cli.common import DEFAULT_STATE

GROUPS = (firewall, policy, observe, agent, endpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l7proxy", description="Transparent L7 policy proxy fed by eBPF redirection"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE,
        help="agent state (endpoints, identities, policies)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The command as given: ``firewall --workers`` starts its workers with it.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    exit_code: int = args.func(args)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
