"""KafkaEngine against frames recorded from real clients (tests/fixtures/kafka/record.py):
kafka-python 3.0.12 and librdkafka (confluent-kafka 2.16.1) talking to Tansu."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from parsers.base import Access, Decision, Reply, ToClient, ToServer
from parsers.kafka import apis as kafka_apis
from parsers.kafka.engine import KafkaEngine
from tests.support import FIXTURES
from tests.support.feeding import WAYS, feed, split
from tests.support.kafka_wire import (
    AUTHORIZATION_FAILED,
    assert_denied,
    brokers_answer,
    read_answer,
)

FRAMES = json.loads((FIXTURES / "kafka" / "frames.json").read_text())
TOPIC_APIS = {0, 1, 2, 8, 19}  # APIs the scenario used with exactly its one topic
GROUP_APIS = {8, 9, 11, 12, 13, 14}  # APIs the scenario used with its one group


def ident(rec):
    return f"{rec['client']}-{kafka_apis.api_name(rec['api_key'])}-v{rec['api_version']}"


def request_bytes(rec) -> bytes:
    return base64.b64decode(rec["request_b64"])


def metadata_first(rec):
    """The same client's recorded Metadata exchange: it names the topic ids Fetch uses."""
    for other in FRAMES:
        if other["client"] == rec["client"] and other["api_key"] == 3 and other["response_b64"]:
            return base64.b64decode(other["request_b64"]), base64.b64decode(other["response_b64"])
    return None


def primed(rec, allow_after: bool):
    """An engine that has seen the client's recorded Metadata exchange (so the
    topic ids its Fetch names are known), then allows or denies everything."""
    verdict = {"allow": True}
    engine = KafkaEngine(lambda r: Decision(verdict["allow"]))
    primer = metadata_first(rec)
    if primer and rec["api_key"] != 3:
        engine.client_data(primer[0])
        engine.server_data(primer[1])
    verdict["allow"] = allow_after
    return engine


def test_recording_covers_both_clients_and_the_core_apis():
    seen = {(r["client"], r["api_key"]) for r in FRAMES}
    for client in ("kafka-python", "confluent-kafka"):
        for api in (0, 1, 3, 8, 9, 11, 14, 18):
            assert (client, api) in seen, (client, api)


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize("rec", FRAMES, ids=ident)
def test_recorded_request_is_judged_with_its_resources_and_forwarded_unchanged(rec, how):
    seen = []
    engine = KafkaEngine(lambda r: seen.append(r) or Decision(True))
    primer = metadata_first(rec)
    if primer and rec["api_key"] in (1, 0, 8, 9):
        engine.client_data(primer[0])
        engine.server_data(primer[1])
        seen.clear()
    wire = request_bytes(rec)
    cmds = feed(engine.client_data, split(wire, how, seed=len(wire)))
    (request,) = seen
    api_key, api_version, correlation_id = struct.unpack_from(">hhi", wire, 4)
    assert (request.api_key, request.api_version, request.correlation_id) == (
        api_key,
        api_version,
        correlation_id,
    )
    assert request.undecodable is None, request.undecodable
    assert b"".join(c.data for c in cmds if isinstance(c, ToServer)) == wire
    assert set(request.topics) <= {rec["scenario_topic"]}
    if api_key in TOPIC_APIS:
        assert request.topics == (rec["scenario_topic"],)
    if api_key in GROUP_APIS:
        assert request.groups == (rec["scenario_group"],)


@pytest.mark.parametrize("rec", [r for r in FRAMES if r["response_b64"]], ids=ident)
def test_recorded_response_goes_back_unchanged_with_a_reply_record(rec):
    engine = primed(rec, allow_after=True)
    engine.client_data(request_bytes(rec))
    response = base64.b64decode(rec["response_b64"])
    cmds = feed(engine.server_data, split(response, "random", seed=len(response)))
    assert b"".join(c.data for c in cmds if isinstance(c, ToClient)) == response
    (reply,) = [c for c in cmds if isinstance(c, Reply)]
    assert reply.key == struct.unpack_from(">i", request_bytes(rec), 8)[0]
    assert reply.fields["api"] == kafka_apis.api_name(rec["api_key"])
    if rec["api_key"] in kafka_apis.RESPONSES:
        assert isinstance(reply.fields["error_code"], int) and "decode_error" not in reply.fields


@pytest.mark.parametrize("rec", FRAMES, ids=ident)
def test_recorded_request_denied_gets_a_decodable_error_response(rec):
    engine = primed(rec, allow_after=False)
    wire = request_bytes(rec)
    cmds = engine.client_data(wire)
    if rec["api_key"] == 3:  # the brokers its denial lists are learnt first
        cmds = engine.server_data(brokers_answer(cmds))
    assert isinstance(cmds[0], Access) and not cmds[0].decision.allowed
    assert not any(isinstance(c, ToServer) for c in cmds)
    (denial,) = [c.data for c in cmds if isinstance(c, ToClient)]
    if rec["api_key"] == 3 and rec["api_version"] < 13 and not cmds[0].request.topics:
        # Metadata for no topic at all: before v13 the response has no field
        # that could carry an error, so the denial is an empty answer.
        answer = read_answer(wire, denial)
        assert answer.error_codes == [] and answer.message.topics == []
        return
    assert_denied(wire, denial, AUTHORIZATION_FAILED)
