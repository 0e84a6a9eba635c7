"""The one unsigned-varint codec: Kafka's compact lengths (and Snappy's length).

Bytes are written out by hand, as Kafka's protocol guide spells them, so the
codec is checked against the wire and not only against itself.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parsers.base import ProtocolError
from parsers.cql.wire import snappy_frame_decompress
from parsers.kafka import fetch as kafka_fetch
from parsers.kafka import produce as kafka_produce
from parsers.varint import (
    TruncatedVarint,
    VarintError,
    decode_uvarint,
    encode_uvarint,
)

BOUNDARIES = [
    (0, b"\x00"),
    (1, b"\x01"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (300, b"\xac\x02"),
    (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"),
    (2**31 - 1, b"\xff\xff\xff\xff\x07"),
    (2**32 - 1, b"\xff\xff\xff\xff\x0f"),
]


@pytest.mark.parametrize(("value", "wire"), BOUNDARIES, ids=[str(v) for v, _ in BOUNDARIES])
def test_boundaries_on_the_wire(value, wire):
    assert encode_uvarint(value) == wire
    assert decode_uvarint(wire) == (value, len(wire))


@given(st.integers(0, 2**32 - 1), st.binary(max_size=4), st.binary(max_size=4))
def test_round_trip_inside_a_buffer(value, before, after):
    buf = before + encode_uvarint(value) + after
    assert decode_uvarint(buf, len(before)) == (value, len(buf) - len(after))


@pytest.mark.parametrize("wire", [b"", b"\x80", b"\xff\xff", b"\xff\xff\xff\xff"])
def test_truncated_input_raises_truncated(wire):
    with pytest.raises(TruncatedVarint):
        decode_uvarint(wire)
    with pytest.raises(TruncatedVarint):
        decode_uvarint(b"\x05" + wire, 1)


def test_six_bytes_are_never_a_varint():
    with pytest.raises(VarintError) as caught:
        decode_uvarint(b"\x80\x80\x80\x80\x80\x01")
    assert not isinstance(caught.value, TruncatedVarint)


def test_negative_numbers_do_not_encode():
    with pytest.raises(ValueError):
        encode_uvarint(-1)


def test_truncated_compact_length_in_a_produce_prefix_asks_for_more():
    # Produce v9 (flexible): transactional id as a compact nullable string whose
    # length varint is cut after its first byte.
    with pytest.raises(kafka_produce.NeedMore):
        kafka_produce.read_prefix(b"\x80", 0, 9, True)
    with pytest.raises(VarintError):
        kafka_produce.read_prefix(b"\x80\x80\x80\x80\x80\x01", 0, 9, True)


def test_fetch_walker_reads_a_varint_split_across_chunks():
    # Fetch v12, flexible: size, correlation id, header tagged fields = 0,
    # throttle, error_code=0, session id, then the topics count: a compact array
    # of no topics (1), spelled as the two-byte varint 0x81 0x00.
    body = struct.pack(">iB", 7, 0) + struct.pack(">ihi", 0, 0, 0) + b"\x81\x00"
    wire = struct.pack(">i", len(body)) + body
    cut = len(wire) - 1  # between the varint's two bytes
    assert kafka_fetch.first_error([wire[:cut], wire[cut:]], 12) == 0


def test_fetch_walker_on_a_truncated_varint_raises_value_error():
    body = struct.pack(">iB", 7, 0) + struct.pack(">ihi", 0, 0, 0) + b"\x82"
    wire = struct.pack(">i", len(body)) + body
    with pytest.raises(ValueError):
        kafka_fetch.first_error([wire], 12)


def test_snappy_length_preamble_uses_the_same_codec():
    # A Snappy body whose length varint never ends is refused before decompression.
    with pytest.raises(ProtocolError, match="bad or oversized length"):
        snappy_frame_decompress(b"\xff\xff\xff\xff\xff\xff")
