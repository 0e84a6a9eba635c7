"""Agent subcommands (run, status, endpoint, policy import/list/delete, cleanup)."""

from __future__ import annotations


def add_commands(sub) -> None:
    pass


def dispatch(args) -> int:
    raise SystemExit(f"unknown command {args.command!r}")
