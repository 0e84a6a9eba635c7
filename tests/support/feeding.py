"""Feed a sans-I/O reader its input three ways: whole, byte by byte, split at random.

A parser that is right only when its input arrives in one piece is wrong:
TCP may cut anywhere. So every reader here is fed the same bytes

- ``whole``: one piece;
- ``bytewise``: one byte at a time (every boundary inside every field);
- ``random``: cut at seeded random points (some short pieces, some long).

and the tests assert the same outcome. Trailing garbage after a complete
message is the other half of that contract; each protocol tests it with its
own bytes, next to its framing tests.

    for way, chunks in splits(request):
        commands = feed(engine.client_data, chunks)

    cut = splitter("random")          # for a stream fed over time (transcripts):
    for chunk in cut(data_to_send):   # one generator across calls, seeded once
        ...
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator

WAYS = ("whole", "bytewise", "random")

Splitter = Callable[[bytes], list[bytes]]


def split(data: bytes, way: str, seed: int | random.Random = 0) -> list[bytes]:
    """``data`` cut one of the three ways (``random`` cut with ``seed``)."""
    if way == "whole":
        return [data]
    if way == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    if way == "random":
        rng = seed if isinstance(seed, random.Random) else random.Random(seed)
        return _random_cuts(data, rng)
    raise ValueError(f"unknown way to split: {way!r}")


def splits(data: bytes, seed: int = 0, randoms: int = 1) -> Iterator[tuple[str, list[bytes]]]:
    """Every way to cut ``data``: ``whole``, ``bytewise``, then ``randoms``
    random splits (``random`` alone, or ``random0``, ``random1``... for several)."""
    yield "whole", [data]
    yield "bytewise", split(data, "bytewise")
    rng = random.Random(seed)
    for n in range(randoms):
        yield ("random" if randoms == 1 else f"random{n}"), _random_cuts(data, rng)


def splitter(way: str, seed: int = 7) -> Splitter:
    """A function that cuts each piece of a stream ``way``; random cuts come
    from one generator seeded once, so a transcript is the same every run."""
    rng = random.Random(seed)
    return lambda data: split(data, way, rng)


def feed(receive: Callable[[bytes], list], chunks: Iterable[bytes]) -> list:
    """Hand ``chunks`` to ``receive`` (``engine.client_data``, ``reader.feed``...)
    one after the other; everything it returned, in order."""
    out: list = []
    for chunk in chunks:
        out.extend(receive(chunk))
    return out


def _random_cuts(data: bytes, rng: random.Random) -> list[bytes]:
    # A few cuts anywhere, plus about one per 4 KiB so that large inputs
    # (bodies, batches) are cut inside their frames too.
    if len(data) < 2:
        return [data]  # b"" stays one (end-of-input) piece, as whole
    count = min(len(data) - 1, rng.randint(1, 8) + len(data) // 4096)
    edges = [0, *sorted(rng.sample(range(1, len(data)), count)), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]
