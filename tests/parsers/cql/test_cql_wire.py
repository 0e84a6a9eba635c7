"""The v5 segment codec and v4 body codecs against the driver's own implementations."""

from __future__ import annotations

import io

from cassandra.connection import lz4_compress, lz4_decompress
from cassandra.segment import SegmentCodec, compute_crc24
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers.cql import wire as w


@settings(max_examples=500)
@given(
    st.sampled_from([3, 5]).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, (1 << (8 * n)) - 1))
    )
)
def test_crc24_agrees_with_the_driver(case):
    nbytes, value = case
    assert w.crc24(value, nbytes) == compute_crc24(value, nbytes)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000) | st.text(max_size=2000).map(str.encode), st.booleans())
def test_segments_we_write_the_driver_reads(payload, compressed):
    codec = SegmentCodec(lz4_compress, lz4_decompress) if compressed else SegmentCodec()
    wire = w.encode_segments(payload, compressed)
    header = codec.decode_header(io.BytesIO(wire[: codec.header_length_with_crc]))
    assert header.is_self_contained
    assert codec.decode(io.BytesIO(wire[codec.header_length_with_crc :]), header).payload == payload


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000) | st.text(max_size=2000).map(str.encode), st.booleans())
def test_segments_the_driver_writes_we_read(payload, compressed):
    codec = SegmentCodec(lz4_compress, lz4_decompress) if compressed else SegmentCodec()
    buf = io.BytesIO()
    codec.encode(buf, payload)
    wire = buf.getvalue()
    for cut in (0, 1, len(wire) - 1):  # incomplete: not yet a segment
        if 0 < cut < len(wire):
            assert w.read_segment(wire[:cut], 0, compressed) is None
    seg = w.read_segment(wire + b"trailing", 0, compressed)
    assert seg.payload == payload and seg.raw_len == len(wire) and seg.self_contained


def test_large_payloads_are_cut_into_non_self_contained_segments():
    payload = bytes(range(256)) * 1200  # 300 KiB
    wire = w.encode_segments(payload, False)
    pos, parts = 0, []
    while pos < len(wire):
        seg = w.read_segment(wire, pos, False)
        assert not seg.self_contained
        parts.append(seg.payload)
        pos += seg.raw_len
    assert len(parts) == 3 and b"".join(parts) == payload


def test_v4_lz4_bodies_match_the_driver():
    body = b"SELECT * FROM ks.t WHERE a = 1" * 10
    assert w.lz4_frame_decompress(lz4_compress(body)) == body
    assert lz4_decompress(w.lz4_frame_compress(body)) == body
