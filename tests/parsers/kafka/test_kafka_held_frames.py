"""Kafka requests held whole are held within ``max_held_frame`` (issue 14, finding 8).

A large Produce naming one allowed topic is judged on its first bytes and streamed
(``test_kafka_engine.py``). Every other request is read whole before it is judged;
it was held up to ``socket.request.max.bytes`` (100 MiB): three clients each sending
98 MiB of such a request took the proxy to 355 MiB. Now what must be read whole may
be at most ``max_held_frame`` (16 MiB by default); a longer one closes the
connection as soon as its first bytes say what it is (Kafka has no answer for a
request it will not read), whatever the read boundaries.
"""

from __future__ import annotations

import gc
import tracemalloc

from kafka.protocol.metadata import MetadataRequest

from parsers.base import MAX_HELD_FRAME, Access, ParseError, ToServer, allow_all
from parsers.kafka.engine import KafkaEngine
from parsers.kafka.frames import FrameBuffer
from tests.parsers.kafka.test_kafka_engine import allow_topics, big_produce, chunks_of, frame
from tests.support.feeding import feed, split

KiB, MiB = 1 << 10, 1 << 20
HELD = 200 * KiB  # max_held_frame of the engines here


def ways(data: bytes):
    yield "whole", [data]
    yield "random", split(data, "random")
    yield "reads", chunks_of(data, 64 * KiB)


def sent(out: list) -> bytes:
    return b"".join(c.data for c in out if isinstance(c, ToServer))


def closed_for_holding(out: list) -> bool:
    [error] = [c for c in out if isinstance(c, ParseError)]
    return error.close and error.error.limit == MAX_HELD_FRAME


def test_a_request_past_the_limit_that_must_be_read_whole_closes_the_connection():
    metadata = frame(MetadataRequest[4](topics=[f"t{i:06}" for i in range(30_000)]), 4, 1)
    assert len(metadata) > HELD
    for way, chunks in ways(metadata):
        engine = KafkaEngine(allow_all, max_held_frame=HELD)
        out = feed(engine.client_data, chunks)
        assert sent(out) == b"" and closed_for_holding(out), way
        assert engine.client_data(b"more") == []


def test_it_is_closed_as_soon_as_its_first_bytes_say_what_it_is():
    metadata = frame(MetadataRequest[4](topics=[f"t{i:06}" for i in range(30_000)]), 4, 1)
    engine = KafkaEngine(allow_all, max_held_frame=HELD)

    assert engine.client_data(metadata[:10]) == []  # size, api key, not yet its version
    out = engine.client_data(metadata[10:14])  # api version, correlation id

    assert closed_for_holding(out)


def test_a_produce_past_the_limit_naming_several_topics_closes_the_connection():
    wire = frame(big_produce(topics=("orders", "audit"), size=HELD), 9, 4)
    for way, chunks in ways(wire):
        engine = KafkaEngine(allow_topics("orders", "audit"), max_held_frame=HELD)
        out = feed(engine.client_data, chunks)
        assert sent(out) == b"" and closed_for_holding(out), way


def test_a_produce_past_the_limit_naming_one_allowed_topic_still_streams():
    wire = frame(big_produce(size=HELD), 9, 5)
    for way, chunks in ways(wire):
        engine = KafkaEngine(allow_topics("orders"), max_held_frame=HELD)
        out = feed(engine.client_data, chunks)
        assert sent(out) == wire, way
        assert [c.key for c in out if isinstance(c, Access)] == [5], way
        assert engine.held_bytes == 0, way


def test_a_request_within_the_limit_is_held_whole_and_handed_on_without_a_join():
    wire = frame(big_produce(topics=("orders", "audit"), size=HELD // 8), 9, 6)
    engine = KafkaEngine(allow_topics("orders", "audit"), max_held_frame=HELD)

    assert feed(engine.client_data, chunks_of(wire[:-1], 64 * KiB)) == []
    assert engine.held_bytes == len(wire) - 1 and engine.reading_headers
    out = engine.client_data(wire[-1:])

    assert [type(c) for c in out] == [Access, ToServer]
    assert out[1].data == wire and isinstance(out[1].data, bytearray)
    assert engine.held_bytes == 0


def test_a_frame_taken_from_many_chunks_costs_about_its_size():
    size = 16 * MiB
    buffer = FrameBuffer()
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(size // (256 * KiB)):
            buffer.feed(b"k" * (256 * KiB))  # each read a fresh object, as the transport's
        taken = buffer.take(size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(taken) == size and len(buffer) == 0
    # The chunks and a join of them would be 2x; chunks let go as they are copied: ~1x.
    assert peak < 1.3 * size, peak / size
