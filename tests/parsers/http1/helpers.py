"""Helpers shared by the HTTP/1 tests (no tests here); the three ways to feed
them are in tests/support/feeding.py."""

from __future__ import annotations

from parsers.base import Decision, ToClient, ToServer

IMPLS = ("c", "python")


def normalise(commands) -> list:
    """Merge consecutive writes in one direction, so different input splits
    that mean the same thing compare equal."""
    out: list = []
    for cmd in commands:
        if isinstance(cmd, ToServer | ToClient) and out and type(out[-1]) is type(cmd):
            out[-1] = type(cmd)(out[-1].data + cmd.data)
        elif isinstance(cmd, ToServer | ToClient):
            out.append(type(cmd)(bytes(cmd.data)))
        else:
            out.append(cmd)
    return out


def sent(commands, kind) -> bytes:
    return b"".join(c.data for c in commands if type(c) is kind)


def deny_path(prefix: str):
    """A decide function that refuses paths starting with ``prefix``."""

    def decide(request):
        if request.path.startswith(prefix):
            return Decision(False, policy="test", rule="deny", reason=f"path {prefix}*")
        return Decision(True, policy="test", rule="allow")

    return decide
