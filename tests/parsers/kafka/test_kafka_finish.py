"""How the Kafka engine ends a healthy connection when asked to ``finish()`` (a
takeover's drain). Kafka has no word to tell a client that a connection ends, so
the engine says ``Finished(told=False)`` only right behind an answer, when nothing
is owed and no request is partly read: the client has nothing outstanding. What
the client sends after that is never read. Fed whole, byte by byte and at random.
"""

from __future__ import annotations

import pytest
from kafka.protocol.producer import ProduceResponse

from parsers.base import Access, Close, Finished, Reply, ToClient, ToServer
from parsers.kafka.engine import KafkaEngine
from tests.parsers.kafka.test_kafka_engine import allow_topics, frame, produce, response
from tests.support.feeding import WAYS, feed, split
from tests.support.kafka_wire import AUTHORIZATION_FAILED, assert_denied


def produce_response(correlation_id: int) -> bytes:
    P = ProduceResponse.TopicProduceResponse
    partition = P.PartitionProduceResponse(index=0, error_code=0, base_offset=1)
    return response(
        ProduceResponse,
        9,
        correlation_id,
        responses=[P(name="orders", partition_responses=[partition])],
    )


@pytest.mark.parametrize("how", WAYS)
def test_finished_right_behind_the_last_answer_owed(how):
    engine = KafkaEngine(allow_topics("orders"))
    feed(engine.client_data, split(frame(produce("orders"), 9, 1), how))
    feed(engine.client_data, split(frame(produce("orders"), 9, 2), how))
    assert engine.finish() == []

    out = feed(engine.server_data, split(produce_response(1), how))
    assert Finished(told=False) not in out  # the second is still owed
    out = feed(engine.server_data, split(produce_response(2), how))

    assert out[-2:] == [Reply(2, {"api": "Produce", "error_code": 0}), Finished(told=False)]
    assert b"".join(c.data for c in out if type(c) is ToClient) == produce_response(2)


def test_a_request_after_the_last_answer_is_never_read():
    engine = KafkaEngine(allow_topics("orders"))
    engine.client_data(frame(produce("orders"), 9, 1))
    engine.finish()
    assert engine.server_data(produce_response(1))[-1] == Finished(told=False)

    assert engine.client_data(frame(produce("orders"), 9, 2)) == []  # never forwarded
    assert not engine.reading_headers and not engine.reading_body
    assert engine.server_data(b"") == []  # nothing owed: the driver ends it
    assert engine.client_data(b"") == [Close("client closed")]


def test_nothing_is_finished_while_a_request_is_partly_read():
    engine = KafkaEngine(allow_topics("orders"))
    engine.client_data(frame(produce("orders"), 9, 1))
    second = frame(produce("orders"), 9, 2)
    engine.client_data(second[:7])
    engine.finish()

    assert Finished(told=False) not in engine.server_data(produce_response(1))
    out = engine.client_data(second[7:])
    assert [type(c) for c in out] == [Access, ToServer]  # read and forwarded: it is owed
    assert engine.server_data(produce_response(2))[-1] == Finished(told=False)


def test_an_idle_connection_is_not_finished_until_an_answer_goes_out():
    engine = KafkaEngine(allow_topics("orders"))
    assert engine.finish() == []
    assert engine.finish() == []  # asking again changes nothing
    out = engine.client_data(frame(produce("orders"), 9, 1))
    assert [type(c) for c in out] == [Access, ToServer]
    assert engine.server_data(produce_response(1))[-1] == Finished(told=False)


def test_a_denial_answered_at_once_is_an_answer_to_end_behind():
    engine = KafkaEngine(allow_topics("orders"))
    engine.finish()
    denied = frame(produce("secrets"), 9, 5)
    out = engine.client_data(denied)
    assert out[-1] == Finished(told=False)
    answer = b"".join(c.data for c in out if type(c) is ToClient)
    assert_denied(denied, answer, AUTHORIZATION_FAILED)
