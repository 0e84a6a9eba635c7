"""Argument types and the event loop shared by the command groups."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from l7proxy.observe.flowlog import DEFAULT_ROTATION, Rotation
from l7proxy.policy.identity import parse_labels

if TYPE_CHECKING:
    from l7proxy.proxy.driver import ProxyLimits

DEFAULT_STATE = Path("/var/lib/l7proxy")

log = logging.getLogger("l7proxy")


def address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (an empty host means every address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "0.0.0.0", int(port)


def labels(text: str) -> dict[str, str]:
    """``k=v,...``"""
    try:
        return parse_labels(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def size(text: str) -> int:
    """A byte count: ``1048576``, ``512K``, ``100M`` or ``2G``."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = (text[:-1], text[-1].upper()) if text[-1:].upper() in units else (text, "")
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"expected a size like 100M, got {text!r}")
    return int(number) * units.get(unit, 1)


def seconds(text: str) -> float:
    """A duration in seconds, more than 0: ``10``, ``0.5``."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def add_proxy_options(parser: argparse.ArgumentParser) -> None:
    """Options every command that runs the proxy takes (``run`` and ``firewall``)."""
    parser.add_argument(
        "--audit",
        action="store_true",
        help="compute verdicts, log would-denies as AUDIT, allow all",
    )
    parser.add_argument(
        "--header-timeout",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="a request head (HTTP/2 header block, Kafka or CQL frame) must be complete "
        "this long after its first byte; then 408, GOAWAY or close (default 10)",
    )
    parser.add_argument(
        "--body-timeout",
        type=seconds,
        default=60.0,
        metavar="SECONDS",
        help="close a client whose request body sends no byte for this long (default 60)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=seconds,
        default=300.0,
        metavar="SECONDS",
        help="close a connection with no bytes either way for this long (default 300)",
    )
    parser.add_argument(
        "--flowlog-max-bytes",
        type=size,
        default=DEFAULT_ROTATION.max_bytes,
        metavar="SIZE",
        help="rotate the flow log when it reaches this size (default 100M)",
    )
    parser.add_argument(
        "--flowlog-backups",
        type=int,
        default=DEFAULT_ROTATION.backups,
        metavar="N",
        help="rotated flow-log files kept (default 5)",
    )
    parser.add_argument(
        "--max-pending-requests",
        type=int,
        default=256,
        metavar="N",
        help="requests awaiting an answer on one connection before reading it stops (default 256)",
    )
    parser.add_argument(
        "--max-held-bytes",
        type=size,
        default="256M",
        metavar="SIZE",
        help="bytes all connections together may hold in Kafka and CQL frames not yet "
        "judged; past it a client holding one is not read until that falls (default 256M)",
    )
    parser.add_argument(
        "--backlog",
        type=int,
        metavar="N",
        help="accept queue of each listening socket (default: net.core.somaxconn)",
    )
    parser.add_argument(
        "--tls-secrets-dir",
        type=Path,
        metavar="DIR",
        help="where the secrets that terminatingTLS/originatingTLS name live: "
        "DIR/NAMESPACE/NAME/{tls.crt,tls.key,ca.crt} (run: STATE_DIR/secrets by default)",
    )
    parser.add_argument(
        "--metrics",
        type=address,
        metavar="ADDR:PORT",
        help="serve Prometheus /metrics and /healthz here",
    )
    parser.add_argument(
        "--ui",
        type=address,
        metavar="ADDR:PORT",
        help="serve the web UI here (service map, flows, decisions; docs/ui.md), e.g. "
        "127.0.0.1:9964; it has no login: keep it on loopback",
    )


def flowlog_rotation(args: argparse.Namespace) -> Rotation:
    try:
        return Rotation(args.flowlog_max_bytes, args.flowlog_backups)
    except ValueError as err:
        raise SystemExit(f"l7proxy: {err}") from None


def proxy_limits(args: argparse.Namespace) -> ProxyLimits:
    """The ``ProxyLimits`` that ``add_proxy_options`` set (docs/limits.md)."""
    from l7proxy.proxy.driver import ProxyLimits

    if args.max_pending_requests < 1:
        raise SystemExit("l7proxy: --max-pending-requests must be at least 1")
    if args.max_held_bytes < 1:
        raise SystemExit("l7proxy: --max-held-bytes must be at least 1")
    limits = ProxyLimits(
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        idle_timeout=args.idle_timeout,
        max_pending_requests=args.max_pending_requests,
        max_held_bytes=args.max_held_bytes,
    )
    if args.backlog is not None:
        limits.backlog = args.backlog
    return limits


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop for the proxy's own loop, without making it the global policy:
    pyroute2 runs its own asyncio loop in the agent's kernel thread and needs
    the standard one (uvloop cannot open netlink datagram endpoints).
    ``L7PROXY_LOOP=asyncio`` forces the standard loop."""
    if os.environ.get("L7PROXY_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop

            log.info("event loop: uvloop")
            return uvloop.new_event_loop
        except ImportError:  # pragma: no cover
            pass
    log.info("event loop: asyncio")
    return asyncio.new_event_loop


def workers(text: str) -> int:
    """``--workers N|auto`` (``firewall`` and ``run``)."""
    from l7proxy.proxy.workers import worker_count

    try:
        return worker_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
