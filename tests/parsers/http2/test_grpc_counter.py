"""gRPC messages counted from DATA payloads as they pass, however frames cut them.

A message is a 1-byte flag, a 4-byte big-endian length and that many bytes; a
frame may hold several, or end anywhere in one, its prefix included.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from parsers.http2.streams import GrpcCounter


def message(payload: bytes, compressed: bool = False) -> bytes:
    return bytes((1 if compressed else 0,)) + len(payload).to_bytes(4, "big") + payload


def counted(frames: list[bytes]) -> GrpcCounter:
    counter = GrpcCounter()
    for frame in frames:
        counter.feed(memoryview(frame))
    return counter


def test_a_unary_calls_frame_holds_one_whole_message() -> None:
    assert counted([message(b"\x08\x96\x01")]).messages == 1


def test_frames_of_one_whole_message_each() -> None:
    counter = counted([message(b"a" * 7), message(b""), message(b"b" * 300, compressed=True)])
    assert counter.messages == 3
    assert counter.skip == 0


def test_a_frame_with_two_messages_then_one_cut_in_its_prefix() -> None:
    stream = message(b"x" * 7) + message(b"y" * 3) + message(b"z" * 10)
    cut = len(message(b"x" * 7)) + len(message(b"y" * 3)) + 2  # two bytes of the third prefix
    counter = counted([stream[:cut]])
    assert counter.messages == 2
    counter.feed(memoryview(stream[cut:]))
    assert counter.messages == 3
    assert counter.skip == 0


def test_a_message_longer_than_its_frame_is_counted_once_across_frames() -> None:
    body = message(b"m" * 40000)
    counter = counted([body[:16384], body[16384:32768], body[32768:]])
    assert counter.messages == 1
    assert counter.skip == 0


@given(
    payloads=st.lists(st.binary(max_size=40), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=12),
)
def test_any_cut_of_a_message_stream_counts_every_message(
    payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(message(p) for p in payloads)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    frames = [stream[a:b] for a, b in zip(points, points[1:], strict=False)]
    counter = counted(frames)
    assert counter.messages == len(payloads)
    assert counter.skip == 0
