"""The Fetch error-code walker agrees with kafka-python's full decode, on
responses of every version it handles, split into chunks anywhere."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.protocol.consumer import FetchResponse

from parsers.kafka import fetch as kafka_fetch
from parsers.kafka.engine import _first_error

R = FetchResponse.FetchableTopicResponse
P = R.PartitionData
A = P.AbortedTransaction

partition = st.builds(
    lambda i, code, aborted, records: P(
        partition_index=i,
        error_code=code,
        high_watermark=5,
        last_stable_offset=4,
        log_start_offset=0,
        aborted_transactions=[A(producer_id=1, first_offset=2)] * aborted
        if aborted is not None
        else None,
        preferred_read_replica=-1,
        records=records,
    ),
    st.integers(0, 9),
    st.sampled_from([0, 0, 0, 1, 3, 6]),
    st.one_of(st.none(), st.integers(0, 2)),
    st.one_of(st.none(), st.binary(max_size=300)),
)
topic = st.builds(
    lambda name, parts: R(topic=name, topic_id=uuid.uuid4(), partitions=parts),
    st.text("abc", min_size=1, max_size=5),
    st.lists(partition, max_size=3),
)


def encode(version, top, topics, correlation_id=9):
    msg = FetchResponse[version](throttle_time_ms=0, error_code=top, session_id=3, responses=topics)
    msg.with_header(correlation_id=correlation_id)
    return bytes(msg.encode(header=True, framed=True))


@settings(max_examples=300, deadline=None)
@given(
    version=st.integers(kafka_fetch.MIN_VERSION, kafka_fetch.MAX_VERSION),
    top=st.sampled_from([0, 0, 7]),
    topics=st.lists(topic, max_size=3),
    cuts=st.lists(st.integers(1, 2000), max_size=6),
)
def test_walker_matches_full_decode(version, top, topics, cuts):
    wire = encode(version, top, topics)
    decoded = FetchResponse.decode(wire, version=version, header=True, framed=True)
    points = sorted({c for c in cuts if c < len(wire)})
    parts = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    assert kafka_fetch.first_error(parts, version) == _first_error(decoded)


def test_old_versions_fall_back():
    assert kafka_fetch.first_error([encode(3, 0, [])], 3) is None


def test_truncated_response_is_an_error_not_a_wrong_answer():
    wire = encode(
        12, 0, [R(topic="t", partitions=[P(partition_index=0, error_code=1, records=b"x" * 50)])]
    )
    with pytest.raises((ValueError, IndexError)):
        kafka_fetch.first_error([wire[:20]], 12)
