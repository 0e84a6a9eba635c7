"""What the CQL engine tells the driver's clocks, and answers when they run out.

Frames are judged whole, so the whole frame is the head: its 9-byte header and
its body (before, only the header was, and a body left half sent was never cut).
From v5 a segment is the unit, and an envelope cut over several segments is one
head until its last segment. CQL has no answer for a request that never
arrived: the engine closes, with no bytes for the client.
"""

from __future__ import annotations

import io

from cassandra.protocol import OptionsMessage, QueryMessage
from cassandra.segment import SegmentCodec

from parsers.base import HEADER_TIMEOUT, Access, Close, ToServer, allow_all
from parsers.cql.engine import CqlEngine
from tests.parsers.cql.test_cassandra_engine import ONE, request, started
from tests.support.feeding import WAYS, feed, split


def test_a_frame_is_a_head_until_the_last_byte_of_its_body():
    query = request(QueryMessage("SELECT * FROM ks.t", ONE), 1)
    for way in WAYS:
        engine = started()
        out = feed(engine.client_data, split(query[:-1], way))
        assert out == [], way
        assert engine.reading_headers and not engine.reading_body

        assert engine.client_timed_out(HEADER_TIMEOUT) == [Close("header_timeout")]
        assert not engine.reading_headers
        assert engine.client_data(query[-1:]) == []  # never judged, never forwarded


def test_a_body_left_half_sent_is_on_the_deadline():
    engine = started()
    query = request(QueryMessage("SELECT * FROM ks.t", ONE), 1)
    engine.client_data(query[:12])  # the header, and 3 bytes of the body
    assert engine.reading_headers


def test_heads_read_tells_a_frame_that_began_in_the_read_that_ended_the_last():
    engine = CqlEngine(allow_all)
    first = request(OptionsMessage(), 0)
    engine.client_data(first[:5])
    before = engine.heads_read

    out = engine.client_data(first[5:] + first[:5])

    assert out == [ToServer(first)]
    assert engine.reading_headers and engine.heads_read != before


def test_a_v5_envelope_over_several_segments_is_one_head():
    big = "SELECT * FROM ks.t WHERE a IN (" + ",".join(str(i) for i in range(40000)) + ")"
    buf = io.BytesIO()
    SegmentCodec().encode(buf, request(QueryMessage(big, ONE), 4, 5))
    wire = buf.getvalue()
    first_segment = 6 + 128 * 1024 - 1 + 4  # header, payload, CRC32
    engine = started(version=5)
    before = engine.heads_read

    engine.client_data(wire[:first_segment])  # one whole segment, the envelope unfinished
    assert engine.reading_headers and engine.heads_read == before

    out = engine.client_data(wire[first_segment:])

    assert [type(c) for c in out] == [Access, ToServer, ToServer]  # its two segments, as read
    assert b"".join(c.data for c in out[1:]) == wire
    assert not engine.reading_headers and engine.heads_read != before
