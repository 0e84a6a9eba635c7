"""Kafka requests held whole are held within ``max_held_frame`` (issue 14, finding 8).

A large Produce naming one allowed topic is judged on its first bytes and streamed
(``test_kafka_engine.py``); denied, its record batches are now dropped as they arrive
and the denial sent after its last byte. Every other request is read whole before it
is judged; it was held up to ``socket.request.max.bytes`` (100 MiB): three clients
each sending 98 MiB of such a request took the proxy to 355 MiB. Now what must be
read whole may be at most ``max_held_frame`` (16 MiB by default); a longer one closes
the connection as soon as its first bytes say what it is (Kafka has no answer for a
request it will not read), whatever the read boundaries.
"""

from __future__ import annotations

import gc
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.protocol.metadata import MetadataRequest

from parsers.base import (
    MAX_HELD_FRAME,
    Access,
    Finished,
    ParseError,
    Reply,
    ToClient,
    ToServer,
    allow_all,
)
from parsers.kafka.engine import KafkaEngine
from parsers.kafka.frames import FrameBuffer
from parsers.kafka.produce import DroppedPartitions
from parsers.varint import encode_uvarint
from tests.parsers.kafka.test_kafka_engine import allow_topics, big_produce, chunks_of, frame
from tests.support.feeding import feed, split
from tests.support.kafka_wire import assert_denied

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


# --------------------------------------------------------------------------- denied produces


def answered(out: list) -> bytes:
    return b"".join(c.data for c in out if isinstance(c, ToClient))


@pytest.mark.parametrize("version", [3, 8, 9, 12])  # 9+: flexible, with tagged fields
def test_a_denied_one_topic_produce_is_dropped_as_it_arrives_and_denied_per_partition(version):
    wire = frame(big_produce(topics=("secrets",), version=version, size=HELD), version, 3)
    # What a whole read of it answers (the engine's ordinary path) is the reference.
    whole = KafkaEngine(allow_topics("orders"), max_held_frame=4 * HELD).client_data(wire)
    for way, chunks in ways(wire):
        engine = KafkaEngine(allow_topics("orders"), max_held_frame=HELD)
        out = []
        for chunk in chunks:
            out += engine.client_data(chunk)
            assert engine.held_bytes < 64 * KiB, way  # never held
        assert sent(out) == b"", way
        assert answered(out) == answered(whole), way
        assert [type(c) for c in out] == [Access, ToClient, Reply], way
        assert not out[0].decision.allowed
    read = assert_denied(wire, answered(out), 29)
    assert [code for _, code in read.error_codes] == [29, 29]  # both partitions


def test_the_denial_comes_after_the_last_byte_and_the_next_request_is_read():
    engine = KafkaEngine(allow_topics("orders"), max_held_frame=HELD)
    wire = frame(big_produce(topics=("secrets",), size=HELD), 9, 3)
    after = frame(big_produce(size=10), 9, 4)

    out = engine.client_data(wire[:1000])
    assert [type(c) for c in out] == [Access] and engine.reading_body
    assert engine.client_data(wire[1000:-1]) == []
    out = engine.client_data(wire[-1:] + after)

    assert [type(c) for c in out] == [ToClient, Reply, Access, ToServer]
    assert out[-1] == ToServer(after)


def test_a_denied_acks0_produce_is_dropped_and_owes_nothing():
    engine = KafkaEngine(allow_topics("orders"), max_held_frame=HELD)
    wire = frame(big_produce(topics=("secrets",), acks=0, size=HELD), 9, 5)

    out = feed(engine.client_data, chunks_of(wire, 64 * KiB))

    assert [type(c) for c in out] == [Access, Reply]
    assert out[1].fields == {"api": "Produce", "acks": 0, "error_code": 29}


def test_a_denied_produce_whose_frame_outruns_its_fields_closes_the_connection():
    engine = KafkaEngine(allow_topics("orders"), max_held_frame=HELD)
    wire = frame(big_produce(topics=("secrets",), size=HELD), 9, 6)
    longer = (int.from_bytes(wire[:4], "big") + 5).to_bytes(4, "big") + wire[4:] + b"xxxxx"

    out = feed(engine.client_data, chunks_of(longer, 64 * KiB))

    [error] = [c for c in out if isinstance(c, ParseError)]
    assert error.close and "malformed" in str(error.error)
    assert answered(out) == b""


def flexible_rest() -> bytes:
    """What follows a topic name in a flexible Produce, with tagged fields everywhere."""
    first = struct.pack(">i", 7) + encode_uvarint(4) + b"abc" + encode_uvarint(1)
    first += encode_uvarint(5) + encode_uvarint(2) + b"xy"  # one tagged field: tag 5, 2 bytes
    second = struct.pack(">i", 9) + encode_uvarint(0) + encode_uvarint(0)  # null records
    topic_tags = encode_uvarint(0)
    request_tags = encode_uvarint(2) + encode_uvarint(0) + encode_uvarint(1) + b"z"
    request_tags += encode_uvarint(300) + encode_uvarint(0)
    return encode_uvarint(3) + first + second + topic_tags + request_tags


def test_the_dropped_partitions_are_read_whatever_the_cuts_tagged_fields_and_all():
    rest = flexible_rest()
    for way, chunks in [*ways(rest), ("bytewise", split(rest, "bytewise"))]:
        walk = DroppedPartitions(flexible=True)
        used = sum(walk.feed(chunk) for chunk in chunks)
        assert (walk.indices, walk.done, used) == ([7, 9], True, len(rest)), way

    walk = DroppedPartitions(flexible=True)
    assert walk.feed(rest + b"more") == len(rest)  # it says where the request ended


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_never_break_the_walk(data, flexible):
    walk = DroppedPartitions(flexible)
    try:
        for i in range(0, len(data), 7):
            walk.feed(data[i : i + 7])
    except ValueError:
        pass


def test_a_drain_finishes_right_behind_the_denial_of_a_dropped_produce():
    engine = KafkaEngine(allow_topics("orders"), max_held_frame=HELD)
    wire = frame(big_produce(topics=("secrets",), size=HELD), 9, 3)
    engine.client_data(wire[:1000])
    assert engine.finish() == []

    assert engine.client_data(wire[1000:-1]) == []
    out = engine.client_data(wire[-1:])

    assert [type(c) for c in out] == [ToClient, Reply, Finished]
    assert_denied(wire, out[0].data, 29)
