"""Helpers shared by the HTTP/1 tests (no tests here): feeding engines and readers three ways."""

from __future__ import annotations

import random

from parsers.base import Decision, ToClient, ToServer

IMPLS = ("c", "python")


def splits(data: bytes, seed: int = 0, count: int = 3):
    """Ways to cut ``data`` into pieces: whole, byte by byte, random splits."""
    yield "whole", [data]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    for n in range(count):
        cuts = (
            sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8))))
            if len(data) > 1
            else []
        )
        edges = [0, *cuts, len(data)]
        yield f"random{n}", [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


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


def feed(engine, pieces, side: str = "client") -> list:
    fn = engine.client_data if side == "client" else engine.server_data
    commands: list = []
    for piece in pieces:
        commands.extend(fn(piece))
    return commands


def sent(commands, kind) -> bytes:
    return b"".join(c.data for c in commands if type(c) is kind)


def deny_path(prefix: str):
    """A decide function that refuses paths starting with ``prefix``."""

    def decide(request):
        if request.path.startswith(prefix):
            return Decision(False, policy="test", rule="deny", reason=f"path {prefix}*")
        return Decision(True, policy="test", rule="allow")

    return decide
