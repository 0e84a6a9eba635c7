"""What the Kafka engine tells the driver's clocks, and answers when they run out.

Kafka has no separate head: a frame is judged whole, so a partly received frame
is a head on the header deadline, unless it is a large Produce judged on its
first bytes, whose rest streams and is a body. Kafka has no answer for a request
that never arrived: the engine's answer is a close, with no bytes for the client.
"""

from __future__ import annotations

from kafka.protocol.metadata import MetadataRequest

from parsers.base import BODY_TIMEOUT, HEADER_TIMEOUT, Access, Close, Decision, ToServer
from parsers.kafka.engine import KafkaEngine
from tests.parsers.kafka.test_kafka_engine import allow_topics, big_produce, frame, produce
from tests.support.feeding import WAYS, feed, split


def test_a_frame_is_a_head_until_its_last_byte_and_past_its_deadline_is_closed():
    wire = frame(produce("orders"), 9, 1)
    for way in WAYS:
        engine = KafkaEngine(allow_topics("orders"))
        assert feed(engine.client_data, split(wire[:-1], way)) == [], way
        assert engine.reading_headers and not engine.reading_body

        assert engine.client_timed_out(HEADER_TIMEOUT) == [Close("header_timeout")]
        assert not engine.reading_headers
        assert engine.client_data(wire[-1:]) == []  # never judged, never forwarded


def test_a_frame_header_alone_is_a_head_too():
    engine = KafkaEngine(allow_topics("orders"))
    engine.client_data(b"\x00\x00")  # half of the size
    assert engine.reading_headers


def test_heads_read_tells_a_frame_that_began_in_the_read_that_ended_the_last():
    engine = KafkaEngine(allow_topics("orders"))
    first = frame(MetadataRequest[4](topics=None, allow_auto_topic_creation=False), 4, 1)
    second = frame(produce("orders"), 9, 2)
    engine.client_data(first[:7])
    before = engine.heads_read

    out = engine.client_data(first[7:] + second[:7])

    assert [type(c) for c in out] == [Access, ToServer]
    assert engine.reading_headers and engine.heads_read != before


def test_a_large_produce_judged_on_its_first_bytes_streams_its_rest_as_a_body():
    engine = KafkaEngine(lambda r: Decision(True))
    wire = frame(big_produce(), 9, 7)
    out = engine.client_data(wire[:1000])
    assert [type(c) for c in out] == [Access, ToServer]
    assert engine.reading_body and not engine.reading_headers

    assert engine.client_timed_out(BODY_TIMEOUT) == [Close("body_timeout")]
    assert not engine.reading_body
    assert engine.client_data(wire[1000:]) == []


def test_a_large_frame_read_whole_is_one_head():
    engine = KafkaEngine(allow_topics("orders", "audit"))
    wire = frame(big_produce(topics=("orders", "audit")), 9, 3)  # two topics: read whole
    before = engine.heads_read
    for start in range(0, len(wire) - 1, 16_384):
        engine.client_data(wire[start : min(start + 16_384, len(wire) - 1)])
        assert engine.reading_headers and engine.heads_read == before
    assert not engine.reading_body
