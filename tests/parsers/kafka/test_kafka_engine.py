"""KafkaEngine, sans-I/O: frames built with kafka-python's encoders, fed whole,
byte by byte and split at random points; transcripts of the commands out."""

from __future__ import annotations

import uuid

import pytest
from kafka.protocol.admin import (
    AlterConfigsRequest,
    CreatePartitionsRequest,
    CreateTopicsRequest,
    DeleteRecordsRequest,
    DeleteTopicsRequest,
    DescribeConfigsRequest,
)
from kafka.protocol.consumer import (
    FetchRequest,
    JoinGroupRequest,
    ListOffsetsRequest,
    OffsetCommitRequest,
    OffsetDeleteRequest,
    OffsetFetchRequest,
    OffsetForLeaderEpochRequest,
)
from kafka.protocol.metadata import ApiVersionsRequest, MetadataRequest, MetadataResponse
from kafka.protocol.producer import (
    AddPartitionsToTxnRequest,
    InitProducerIdRequest,
    ProduceRequest,
    ProduceResponse,
    TxnOffsetCommitRequest,
)

from parsers.base import (
    Access,
    Close,
    Decision,
    Log,
    ParseError,
    Reply,
    ShutdownClient,
    ShutdownServer,
    ToClient,
    ToServer,
)
from parsers.kafka.engine import KafkaEngine
from parsers.requests import KafkaRequest
from tests.support.feeding import WAYS, feed, split
from tests.support.kafka_wire import (
    AUTHORIZATION_FAILED,
    assert_denied,
    brokers_answer,
    read_answer,
    request_naming_everything,
)


def frame(message, version: int, correlation_id: int, client_id: str = "test-client") -> bytes:
    message.with_header(correlation_id=correlation_id, client_id=client_id)
    return bytes(message.encode(version=version, header=True, framed=True))


def response(cls, version: int, correlation_id: int, **fields) -> bytes:
    msg = cls[version](**fields)
    msg.with_header(correlation_id=correlation_id)
    return bytes(msg.encode(header=True, framed=True))


def produce(topic: str, acks: int = 1, transactional_id=None):
    P = ProduceRequest
    part = P.TopicProduceData.PartitionProduceData(index=0, records=b"batch")
    return P(
        acks=acks,
        timeout_ms=1000,
        transactional_id=transactional_id,
        topic_data=[P.TopicProduceData(name=topic, partition_data=[part])],
    )


def allow_topics(*allowed: str, groups=None):
    def decide(request: KafkaRequest) -> Decision:
        ok = all(t in allowed for t in request.topics) and request.undecodable is None
        if groups is not None:
            ok = ok and all(g in groups for g in request.groups)
        return Decision(ok, reason="test")

    return decide


@pytest.mark.parametrize("how", WAYS)
def test_allowed_produce_is_forwarded_and_reply_carries_error_code(how):
    engine = KafkaEngine(allow_topics("orders"))
    wire = frame(produce("orders"), 9, 11)
    cmds = feed(engine.client_data, split(wire, how, seed=7))
    assert [type(c) for c in cmds] == [Access, ToServer]
    assert cmds[0].request.topics == ("orders",) and cmds[0].request.client_id == "test-client"
    assert cmds[0].key == 11 and b"".join(c.data for c in cmds if isinstance(c, ToServer)) == wire

    P = ProduceResponse.TopicProduceResponse
    reply = response(
        ProduceResponse,
        9,
        11,
        responses=[
            P(
                name="orders",
                partition_responses=[
                    P.PartitionProduceResponse(index=0, error_code=6, base_offset=-1)
                ],
            )
        ],
    )
    back = feed(engine.server_data, split(reply, how, seed=7))
    assert b"".join(c.data for c in back if isinstance(c, ToClient)) == reply
    assert [c for c in back if isinstance(c, Reply)] == [
        Reply(11, {"api": "Produce", "error_code": 6})
    ]


def test_client_eof_with_nothing_owed_ends_the_connection():
    # Kafka has no half-close: a connection left half open would hold two
    # descriptors until the idle timeout.
    engine = KafkaEngine(allow_topics("orders"))
    assert engine.client_data(b"") == [
        ShutdownServer(),
        Close("client closed; every response delivered"),
    ]


def test_client_eof_waits_for_the_response_still_owed():
    engine = KafkaEngine(allow_topics("orders"))
    engine.client_data(frame(produce("orders"), 9, 11))
    assert engine.client_data(b"") == [ShutdownServer()]
    P = ProduceResponse.TopicProduceResponse
    partition = P.PartitionProduceResponse(index=0, error_code=0, base_offset=7)
    reply = response(
        ProduceResponse, 9, 11, responses=[P(name="orders", partition_responses=[partition])]
    )
    assert engine.server_data(reply) == [
        ToClient(reply),
        Reply(11, {"api": "Produce", "error_code": 0}),
        Close("client closed; every response delivered"),
    ]


def test_broker_eof_ends_the_connection():
    engine = KafkaEngine(allow_topics("orders"))
    assert engine.server_data(b"") == [ShutdownClient(), Close("broker closed")]


@pytest.mark.parametrize("version", [3, 9, 12])
def test_denied_produce_gets_topic_authorization_failed_at_request_version(version):
    engine = KafkaEngine(allow_topics("orders"))
    request = frame(produce("secrets"), version, 5)
    cmds = engine.client_data(request)
    assert not any(isinstance(c, ToServer) for c in cmds)
    (wire,) = [c.data for c in cmds if isinstance(c, ToClient)]
    decoded = assert_denied(request, wire, 29).message
    assert decoded.responses[0].name == "secrets"
    assert decoded.responses[0].partition_responses[0].index == 0
    assert Reply(5, {"error_code": 29, "api": "Produce"}) in cmds


def test_denial_waits_behind_responses_the_broker_still_owes():
    engine = KafkaEngine(allow_topics("orders"))
    wire = (
        frame(produce("orders"), 9, 1)
        + frame(produce("secrets"), 9, 2)
        + frame(produce("orders"), 9, 3)
    )
    cmds = engine.client_data(wire)
    assert [c.request.correlation_id for c in cmds if isinstance(c, Access)] == [1, 2, 3]
    assert not any(isinstance(c, ToClient) for c in cmds), "denial must not overtake response 1"
    first = engine.server_data(response(ProduceResponse, 9, 1, responses=[]))
    order = [
        ProduceResponse.decode(c.data, version=9, header=True, framed=True).header.correlation_id
        for c in first
        if isinstance(c, ToClient)
    ]
    assert order == [1, 2]
    denial = [c.data for c in first if isinstance(c, ToClient)][1]
    assert_denied(frame(produce("secrets"), 9, 2), denial, 29)
    third = engine.server_data(response(ProduceResponse, 9, 3, responses=[]))
    assert [c.key for c in third if isinstance(c, Reply)] == [3]


def test_acks0_produce_owes_no_response_allowed_or_denied():
    engine = KafkaEngine(allow_topics("orders"))
    cmds = engine.client_data(
        frame(produce("orders", acks=0), 9, 1) + frame(produce("secrets", acks=0), 9, 2)
    )
    assert [type(c).__name__ for c in cmds] == ["Access", "ToServer", "Reply", "Access", "Reply"]
    assert cmds[-1].fields["error_code"] == 29
    # Nothing is owed: a later denial goes straight out.
    later = engine.client_data(frame(produce("secrets"), 9, 3))
    assert any(isinstance(c, ToClient) for c in later)


def test_group_denial_in_offset_commit_is_blamed_on_the_group():
    engine = KafkaEngine(allow_topics("orders", groups={"billing"}))
    T = OffsetCommitRequest.OffsetCommitRequestTopic
    req = OffsetCommitRequest(
        group_id="intruders",
        topics=[
            T(
                name="orders",
                partitions=[T.OffsetCommitRequestPartition(partition_index=0, committed_offset=1)],
            )
        ],
    )
    request = frame(req, 8, 4)
    (wire,) = [c.data for c in engine.client_data(request) if isinstance(c, ToClient)]
    denied = assert_denied(request, wire, 30)
    assert denied.error_codes == [("topics[0].partitions[0].error_code", 30)]


def test_join_group_denied_with_group_authorization_failed_flexible():
    engine = KafkaEngine(allow_topics(groups={"billing"}))
    req = JoinGroupRequest(
        group_id="intruders",
        session_timeout_ms=10000,
        rebalance_timeout_ms=10000,
        member_id="",
        protocol_type="consumer",
        protocols=[],
    )
    request = frame(req, 7, 9)
    (wire,) = [c.data for c in engine.client_data(request) if isinstance(c, ToClient)]
    denied = assert_denied(request, wire, 30)
    assert denied.error_codes == [("error_code", 30)] and denied.header_tags == {}


def test_transactional_init_producer_id_denied_with_53():
    engine = KafkaEngine(lambda r: Decision(not r.transactional_ids))
    request = frame(InitProducerIdRequest(transactional_id="tx", transaction_timeout_ms=1000), 4, 2)
    (wire,) = [c.data for c in engine.client_data(request) if isinstance(c, ToClient)]
    decoded = assert_denied(request, wire, 53).message
    assert (decoded.producer_id, decoded.producer_epoch) == (-1, -1)


def test_offset_fetch_v8_denial_per_group():
    engine = KafkaEngine(allow_topics(groups=set()))
    G = OffsetFetchRequest.OffsetFetchRequestGroup
    req = OffsetFetchRequest(groups=[G(group_id="g", topics=None)], require_stable=False)
    request = frame(req, 8, 3)
    (wire,) = [c.data for c in engine.client_data(request) if isinstance(c, ToClient)]
    denied = assert_denied(request, wire, 30)
    assert denied.message.groups[0].group_id == "g"
    assert denied.error_codes == [("groups[0].error_code", 30)]


def test_metadata_with_some_denied_topics_is_answered_per_topic():
    engine = KafkaEngine(allow_topics("orders"))
    T = MetadataRequest.MetadataRequestTopic
    req = MetadataRequest(
        topics=[T(name="orders"), T(name="secrets")], allow_auto_topic_creation=False
    )
    cmds = engine.client_data(frame(req, 12, 8))
    (sent,) = [c.data for c in cmds if isinstance(c, ToServer)]
    forwarded = MetadataRequest.decode(sent, version=12, header=True, framed=True)
    assert [t.name for t in forwarded.topics] == ["orders"]
    (access,) = [c for c in cmds if isinstance(c, Access)]
    assert access.decision.allowed and "secrets" in access.decision.reason

    RT = MetadataResponse.MetadataResponseTopic
    topic_id = uuid.uuid4()
    broker = response(
        MetadataResponse,
        12,
        8,
        brokers=[],
        cluster_id="c",
        controller_id=1,
        topics=[
            RT(error_code=0, name="orders", topic_id=topic_id, is_internal=False, partitions=[])
        ],
    )
    back = engine.server_data(broker)
    (wire,) = [c.data for c in back if isinstance(c, ToClient)]
    merged = read_answer(frame(req, 12, 8), wire)
    assert merged.correlation_id == 8
    assert [t.name for t in merged.message.topics] == ["orders", "secrets"]
    assert merged.error_codes == [("topics[0].error_code", 0), ("topics[1].error_code", 29)]
    assert engine.topic_names == {topic_id: "orders"}


def test_a_metadata_denial_asks_the_broker_for_the_brokers_it_lists_first():
    # kafka-python drops a Metadata answer that lists no broker and waits for
    # metadata until it times out, instead of failing on the denied topic.
    engine = KafkaEngine(allow_topics("orders"))
    T = MetadataRequest.MetadataRequestTopic
    request = frame(MetadataRequest(topics=[T(name="secrets")]), 12, 4)

    cmds = engine.client_data(request)
    (lookup,) = [c.data for c in cmds if isinstance(c, ToServer)]
    asked = MetadataRequest.decode(lookup, version=12, header=True, framed=True)
    assert asked.topics == [] and asked.header.correlation_id < 0  # the brokers alone
    assert not any(isinstance(c, (ToClient, Access)) for c in cmds)

    cmds = engine.server_data(brokers_answer(cmds))
    (wire,) = [c.data for c in cmds if isinstance(c, ToClient)]
    denied = assert_denied(request, wire, 29)
    assert [(b.node_id, b.host, b.port) for b in denied.message.brokers] == [(1, "b1", 9092)]
    assert [t.name for t in denied.message.topics] == ["secrets"]

    # Known now: the next denial on this connection is answered at once.
    again = frame(MetadataRequest(topics=[T(name="secrets")]), 12, 5)
    cmds = engine.client_data(again)
    assert not any(isinstance(c, ToServer) for c in cmds)
    (wire,) = [c.data for c in cmds if isinstance(c, ToClient)]
    assert [b.host for b in assert_denied(again, wire, 29).message.brokers] == ["b1"]


def test_fetch_by_topic_id_resolved_from_metadata_seen_on_the_connection():
    engine = KafkaEngine(allow_topics("orders"))
    topic_id = uuid.uuid4()
    T = MetadataRequest.MetadataRequestTopic
    engine.client_data(frame(MetadataRequest(topics=[T(name="orders")]), 12, 1))
    RT = MetadataResponse.MetadataResponseTopic
    engine.server_data(
        response(
            MetadataResponse,
            12,
            1,
            brokers=[],
            topics=[RT(name="orders", topic_id=topic_id, partitions=[])],
        )
    )
    F = FetchRequest.FetchTopic
    fetch = FetchRequest(
        max_wait_ms=1,
        min_bytes=1,
        topics=[F(topic_id=topic_id, partitions=[F.FetchPartition(partition=0, fetch_offset=0)])],
    )
    cmds = engine.client_data(frame(fetch, 16, 2))
    assert cmds[0].request.topics == ("orders",) and isinstance(cmds[1], ToServer)


def test_fetch_by_unknown_topic_id_is_held_while_the_engine_asks_the_broker():
    seen = []
    engine = KafkaEngine(lambda r: seen.append(r) or Decision(r.topics == ("orders",)))
    known, unknown = uuid.uuid4(), uuid.uuid4()
    F = FetchRequest.FetchTopic
    fetch = FetchRequest(
        max_wait_ms=1,
        min_bytes=1,
        topics=[F(topic_id=known, partitions=[F.FetchPartition(partition=0, fetch_offset=0)])],
    )
    later = frame(produce("orders"), 9, 3)
    cmds = engine.client_data(frame(fetch, 16, 2) + later)
    assert seen == [] and not any(isinstance(c, Access) for c in cmds)
    (lookup,) = [c.data for c in cmds if isinstance(c, ToServer)]
    asked = MetadataRequest.decode(lookup, version=12, header=True, framed=True)
    assert asked.topics is None and asked.header.correlation_id < 0

    RT = MetadataResponse.MetadataResponseTopic
    answer = response(
        MetadataResponse,
        12,
        asked.header.correlation_id,
        brokers=[],
        topics=[RT(name="orders", topic_id=known, partitions=[])],
    )
    cmds = engine.server_data(answer)
    assert not any(isinstance(c, (ToClient, Reply)) for c in cmds), "our lookup is never forwarded"
    assert [c.request.topics for c in cmds if isinstance(c, Access)] == [("orders",), ("orders",)]
    assert [c.data for c in cmds if isinstance(c, ToServer)] == [frame(fetch, 16, 2), later]

    # An id the broker does not know either: judged as undecodable.
    engine = KafkaEngine(lambda r: Decision(r.undecodable is None))
    gone = FetchRequest(max_wait_ms=1, min_bytes=1, topics=[F(topic_id=unknown, partitions=[])])
    cmds = engine.client_data(frame(gone, 16, 4))
    (lookup,) = [c.data for c in cmds if isinstance(c, ToServer)]
    cid = MetadataRequest.decode(lookup, version=12, header=True, framed=True).header.correlation_id
    cmds = engine.server_data(response(MetadataResponse, 12, cid, brokers=[], topics=[]))
    (access,) = [c for c in cmds if isinstance(c, Access)]
    assert "not seen" in access.request.undecodable and not access.decision.allowed


def test_unknown_api_is_judged_as_undecodable_and_allow_all_passes_it():
    wire = (
        bytes.fromhex("0000000a")
        + bytes.fromhex("03e70000")
        + (42).to_bytes(4, "big")
        + b"\xff\xff"
    )
    seen = []
    engine = KafkaEngine(lambda r: seen.append(r) or Decision(True))
    cmds = engine.client_data(wire)
    assert seen[0].api_key == 999 and "unknown API" in seen[0].undecodable
    assert isinstance(cmds[1], ToServer)


def test_unknown_api_denied_closes_cleanly_since_no_error_response_exists():
    wire = (
        bytes.fromhex("0000000a")
        + bytes.fromhex("03e70000")
        + (42).to_bytes(4, "big")
        + b"\xff\xff"
    )
    cmds = KafkaEngine(lambda r: Decision(False)).client_data(wire)
    assert isinstance(cmds[-1], ParseError) and cmds[-1].error.code == "kafka_denial_unencodable"


def test_garbage_body_is_undecodable_not_a_crash():
    good = frame(produce("orders"), 9, 1)
    bad = good[:4] + good[4:20] + b"\xff" * (len(good) - 20)
    seen = []
    KafkaEngine(lambda r: seen.append(r) or Decision(False)).client_data(bad)
    assert seen[0].undecodable


@pytest.mark.parametrize("size", [-1, 3, 200 * 1024 * 1024])
def test_bad_frame_sizes_are_protocol_errors(size):
    cmds = KafkaEngine(allow_topics(), max_frame=1024 * 1024).client_data(
        size.to_bytes(4, "big", signed=True) + b"\x00" * 20
    )
    assert len(cmds) == 1 and isinstance(cmds[0], ParseError) and cmds[0].close


def test_response_with_wrong_correlation_id_is_a_server_error():
    engine = KafkaEngine(allow_topics("orders"))
    engine.client_data(frame(produce("orders"), 9, 1))
    cmds = engine.server_data(response(ProduceResponse, 9, 99, responses=[]))
    assert isinstance(cmds[0], ParseError) and cmds[0].side == "server"


def test_unsolicited_response_is_a_server_error():
    cmds = KafkaEngine(allow_topics()).server_data(response(ProduceResponse, 9, 1, responses=[]))
    assert isinstance(cmds[0], ParseError) and cmds[0].error.code == "unsolicited"


def test_reading_headers_while_a_frame_is_partial():
    engine = KafkaEngine(allow_topics("orders"))
    wire = frame(produce("orders"), 9, 1)
    engine.client_data(wire[:7])
    assert engine.reading_headers
    engine.client_data(wire[7:])
    assert not engine.reading_headers


def test_api_versions_reply_uses_header_v0_even_when_flexible():
    engine = KafkaEngine(allow_topics())
    engine.client_data(
        frame(ApiVersionsRequest(client_software_name="x", client_software_version="1"), 3, 1)
    )
    from kafka.protocol.metadata import ApiVersionsResponse

    cmds = engine.server_data(response(ApiVersionsResponse, 3, 1, error_code=0, api_keys=[]))
    assert cmds[-1] == Reply(1, {"api": "ApiVersions", "error_code": 0})


# ---------------------------------------------------------------------------
# Topic, group and transactional-id extraction, every API, lowest and highest version.

CT, DR, DC, AC, CP = (
    CreateTopicsRequest.CreatableTopic,
    DeleteRecordsRequest.DeleteRecordsTopic,
    DescribeConfigsRequest.DescribeConfigsResource,
    AlterConfigsRequest.AlterConfigsResource,
    CreatePartitionsRequest.CreatePartitionsTopic,
)
LO = ListOffsetsRequest.ListOffsetsTopic
OC = OffsetCommitRequest.OffsetCommitRequestTopic
OF = OffsetFetchRequest.OffsetFetchRequestTopic
OFG = OffsetFetchRequest.OffsetFetchRequestGroup
OD = OffsetDeleteRequest.OffsetDeleteRequestTopic
OL = OffsetForLeaderEpochRequest.OffsetForLeaderTopic
AP = AddPartitionsToTxnRequest.AddPartitionsToTxnTopic
APX = AddPartitionsToTxnRequest.AddPartitionsToTxnTransaction
TO = TxnOffsetCommitRequest.TxnOffsetCommitRequestTopic
MT = MetadataRequest.MetadataRequestTopic
FT = FetchRequest.FetchTopic
DT = DeleteTopicsRequest.DeleteTopicState

CASES = [
    # (name, request factory(version), versions, topics, groups, txn ids)
    ("Produce<3", lambda v: produce("a"), (0, 2), ("a",), (), ()),
    ("Produce", lambda v: produce("a", transactional_id="tx"), (3, 12), ("a",), (), ("tx",)),
    (
        "Fetch",
        lambda v: FetchRequest(
            max_wait_ms=1,
            min_bytes=1,
            topics=[FT(topic="a", partitions=[FT.FetchPartition(partition=0, fetch_offset=0)])],
            forgotten_topics_data=[],
        ),
        (0, 12),
        ("a",),
        (),
        (),
    ),
    (
        "ListOffsets",
        lambda v: ListOffsetsRequest(
            replica_id=-1,
            topics=[LO(name="a", partitions=[LO.ListOffsetsPartition(partition_index=0)])],
        ),
        (0, 11),
        ("a",),
        (),
        (),
    ),
    (
        "Metadata",
        lambda v: MetadataRequest(topics=[MT(name="a"), MT(name="b")]),
        (0, 13),
        ("a", "b"),
        (),
        (),
    ),
    (
        "OffsetCommit",
        lambda v: OffsetCommitRequest(
            group_id="g",
            topics=[
                OC(
                    name="a",
                    partitions=[
                        OC.OffsetCommitRequestPartition(partition_index=0, committed_offset=1)
                    ],
                )
            ],
        ),
        (0, 9),
        ("a",),
        ("g",),
        (),
    ),
    (
        "OffsetFetch<8",
        lambda v: OffsetFetchRequest(group_id="g", topics=[OF(name="a", partition_indexes=[0])]),
        (0, 7),
        ("a",),
        ("g",),
        (),
    ),
    (
        "OffsetFetch>=8",
        lambda v: OffsetFetchRequest(
            groups=[
                OFG(
                    group_id="g",
                    topics=[
                        OffsetFetchRequest.OffsetFetchRequestGroup.OffsetFetchRequestTopics(
                            name="a", partition_indexes=[0]
                        )
                    ],
                )
            ]
        ),
        (8, 9),
        ("a",),
        ("g",),
        (),
    ),
    (
        "CreateTopics",
        lambda v: CreateTopicsRequest(
            topics=[
                CT(name="a", num_partitions=1, replication_factor=1, assignments=[], configs=[])
            ],
            timeout_ms=1,
        ),
        (0, 7),
        ("a",),
        (),
        (),
    ),
    (
        "DeleteTopics<6",
        lambda v: DeleteTopicsRequest(topic_names=["a"], timeout_ms=1),
        (0, 5),
        ("a",),
        (),
        (),
    ),
    (
        "DeleteTopics6",
        lambda v: DeleteTopicsRequest(topics=[DT(name="a")], timeout_ms=1),
        (6, 6),
        ("a",),
        (),
        (),
    ),
    (
        "DeleteRecords",
        lambda v: DeleteRecordsRequest(
            topics=[
                DR(name="a", partitions=[DR.DeleteRecordsPartition(partition_index=0, offset=1)])
            ],
            timeout_ms=1,
        ),
        (0, 2),
        ("a",),
        (),
        (),
    ),
    (
        "DescribeConfigs",
        lambda v: DescribeConfigsRequest(
            resources=[
                DC(resource_type=2, resource_name="a", configuration_keys=None),
                DC(resource_type=4, resource_name="1", configuration_keys=None),
            ]
        ),
        (0, 4),
        ("a",),
        (),
        (),
    ),
    (
        "AlterConfigs",
        lambda v: AlterConfigsRequest(
            resources=[AC(resource_type=2, resource_name="a", configs=[])], validate_only=False
        ),
        (0, 2),
        ("a",),
        (),
        (),
    ),
    (
        "CreatePartitions",
        lambda v: CreatePartitionsRequest(
            topics=[CP(name="a", count=2, assignments=None)], timeout_ms=1, validate_only=False
        ),
        (0, 3),
        ("a",),
        (),
        (),
    ),
    (
        "OffsetDelete",
        lambda v: OffsetDeleteRequest(
            group_id="g",
            topics=[OD(name="a", partitions=[OD.OffsetDeleteRequestPartition(partition_index=0)])],
        ),
        (0, 0),
        ("a",),
        ("g",),
        (),
    ),
    (
        "OffsetForLeaderEpoch",
        lambda v: OffsetForLeaderEpochRequest(
            replica_id=-1,
            topics=[OL(topic="a", partitions=[OL.OffsetForLeaderPartition(partition=0)])],
        ),
        (0, 4),
        ("a",),
        (),
        (),
    ),
    (
        "AddPartitionsToTxn<4",
        lambda v: AddPartitionsToTxnRequest(
            v3_and_below_transactional_id="tx",
            v3_and_below_producer_id=1,
            v3_and_below_producer_epoch=0,
            v3_and_below_topics=[AP(name="a", partitions=[0])],
        ),
        (0, 3),
        ("a",),
        (),
        ("tx",),
    ),
    (
        "AddPartitionsToTxn>=4",
        lambda v: AddPartitionsToTxnRequest(
            transactions=[
                APX(
                    transactional_id="tx",
                    producer_id=1,
                    producer_epoch=0,
                    verify_only=False,
                    topics=[AP(name="a", partitions=[0])],
                )
            ]
        ),
        (4, 5),
        ("a",),
        (),
        ("tx",),
    ),
    (
        "TxnOffsetCommit",
        lambda v: TxnOffsetCommitRequest(
            transactional_id="tx",
            group_id="g",
            producer_id=1,
            producer_epoch=0,
            topics=[
                TO(
                    name="a",
                    partitions=[
                        TO.TxnOffsetCommitRequestPartition(partition_index=0, committed_offset=1)
                    ],
                )
            ],
        ),
        (0, 5),
        ("a",),
        ("g",),
        ("tx",),
    ),
]


@pytest.mark.parametrize(
    "name,factory,versions,topics,groups,txns", CASES, ids=[c[0] for c in CASES]
)
@pytest.mark.parametrize("end", ["lowest", "highest"])
def test_resources_extracted_at_lowest_and_highest_version(
    name, factory, versions, topics, groups, txns, end
):
    version = versions[0] if end == "lowest" else versions[1]
    seen: list[KafkaRequest] = []
    engine = KafkaEngine(lambda r: seen.append(r) or Decision(True))
    engine.client_data(frame(factory(version), version, 77))
    (request,) = seen
    assert request.undecodable is None, request.undecodable
    assert (request.topics, request.groups, request.transactional_ids) == (topics, groups, txns)
    assert request.correlation_id == 77 and request.api_version == version


@pytest.mark.parametrize(
    "name,factory,versions,topics,groups,txns", CASES, ids=[c[0] for c in CASES]
)
@pytest.mark.parametrize("end", ["lowest", "highest"])
def test_every_topic_api_has_an_encodable_denial(
    name, factory, versions, topics, groups, txns, end
):
    version = versions[0] if end == "lowest" else versions[1]
    engine = KafkaEngine(lambda r: Decision(False))
    request = frame(factory(version), version, 5)
    cmds = engine.client_data(request)
    if name == "Metadata":  # the engine learns the brokers first (the test below)
        cmds = engine.server_data(brokers_answer(cmds))
    (wire,) = [c.data for c in cmds if isinstance(c, ToClient)]
    # Refused everything, the engine blames the most specific resource named.
    expected = 53 if txns else 30 if groups else 29
    assert_denied(request, wire, expected)


# ---------------------------------------------------------------------------
# Bad input never crashes the engine.

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _framed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@settings(max_examples=300, deadline=None)
@given(
    api_key=st.integers(0, 100),
    version=st.integers(0, 20),
    body=st.binary(max_size=200),
    allow=st.booleans(),
)
def test_random_bodies_never_crash(api_key, version, body, allow):
    engine = KafkaEngine(lambda r: Decision(allow), max_frame=4096)
    head = (
        api_key.to_bytes(2, "big")
        + version.to_bytes(2, "big")
        + (1).to_bytes(4, "big")
        + b"\x00\x01c"
    )
    cmds = engine.client_data(_framed(head + body))
    asked_broker = [type(c) for c in cmds] == [Log, ToServer]  # a denied Metadata, first
    assert isinstance(cmds[0], (Access, ParseError)) or asked_broker
    engine.server_data(_framed((1).to_bytes(4, "big") + body))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_on_either_side_never_crash(data):
    engine = KafkaEngine(allow_topics("orders"), max_frame=4096)
    engine.client_data(data)
    engine.server_data(data)
    engine.client_data(b"")
    engine.server_data(b"")


@pytest.mark.parametrize("how", WAYS)
def test_large_fetch_response_is_passed_through_as_it_arrives(how):
    from kafka.protocol.consumer import FetchResponse

    engine = KafkaEngine(allow_topics("orders"))
    F = FetchRequest.FetchTopic
    fetch = FetchRequest(max_wait_ms=1, min_bytes=1, topics=[F(topic="orders", partitions=[])])
    engine.client_data(frame(fetch, 12, 1) + frame(produce("secrets"), 9, 2))
    R = FetchResponse.FetchableTopicResponse
    big = response(
        FetchResponse,
        12,
        1,
        responses=[
            R(
                topic="orders",
                partitions=[
                    R.PartitionData(
                        partition_index=0, error_code=0, high_watermark=1, records=b"r" * 300_000
                    )
                ],
            )
        ],
    )
    first = engine.server_data(big[:100_000])
    assert b"".join(c.data for c in first if isinstance(c, ToClient)) == big[:100_000]
    assert not any(isinstance(c, Reply) for c in first)
    rest = feed(engine.server_data, split(big[100_000:], how, seed=7))
    sent = b"".join(c.data for c in first + rest if isinstance(c, ToClient))
    denial_len = len(sent) - len(big)
    assert sent[: len(big)] == big and denial_len > 0, (
        "the queued denial follows the streamed reply"
    )
    assert_denied(frame(produce("secrets"), 9, 2), sent[len(big) :], 29)
    assert [c.key for c in rest if isinstance(c, Reply)] == [1, 2]


def test_controlled_shutdown_v0_has_header_v0_without_client_id():
    # api key 7, version 0, correlation id 5, then the body (broker id 1): no client id field.
    wire = _framed(bytes.fromhex("0007 0000 00000005 00000001".replace(" ", "")))
    seen = []
    cmds = KafkaEngine(lambda r: seen.append(r) or Decision(True)).client_data(wire)
    assert seen[0].api_key == 7 and seen[0].correlation_id == 5 and seen[0].client_id is None
    assert isinstance(cmds[1], ToServer)


def test_denial_arriving_mid_stream_waits_for_the_streamed_response_to_end():
    from kafka.protocol.consumer import FetchResponse

    engine = KafkaEngine(allow_topics("orders"))
    F = FetchRequest.FetchTopic
    engine.client_data(
        frame(
            FetchRequest(max_wait_ms=1, min_bytes=1, topics=[F(topic="orders", partitions=[])]),
            12,
            1,
        )
    )
    R = FetchResponse.FetchableTopicResponse
    big = response(
        FetchResponse,
        12,
        1,
        responses=[
            R(
                topic="orders",
                partitions=[R.PartitionData(partition_index=0, records=b"r" * 200_000)],
            )
        ],
    )
    head = engine.server_data(big[:70_000])
    denied = engine.client_data(frame(produce("secrets"), 9, 2))
    assert not any(isinstance(c, ToClient) for c in denied), (
        "must not cut into the streamed response"
    )
    tail = engine.server_data(big[70_000:])
    out = b"".join(c.data for c in head + tail if isinstance(c, ToClient))
    assert out[: len(big)] == big
    assert_denied(frame(produce("secrets"), 9, 2), out[len(big) :], 29)


# ---------------------------------------------------------------------------
# Large produce requests: judged from their prefix, passed through as they arrive.


def big_produce(topics=("orders",), acks=1, version=9, transactional_id=None, size=80_000):
    P = ProduceRequest
    data = [
        P.TopicProduceData(
            name=t,
            partition_data=[
                P.TopicProduceData.PartitionProduceData(index=i, records=b"b" * size)
                for i in range(2)
            ],
        )
        for t in topics
    ]
    msg = P(acks=acks, timeout_ms=1000, transactional_id=transactional_id, topic_data=data)
    return msg


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize("version", [3, 9, 12])
def test_large_allowed_produce_is_judged_early_and_streamed(version, how):
    seen = []
    engine = KafkaEngine(lambda r: seen.append(r) or Decision(True))
    wire = frame(
        big_produce(version=version, transactional_id="tx" if version >= 3 else None), version, 7
    )
    wire += frame(produce("orders"), version, 8)  # pipelined behind it
    first = engine.client_data(wire[:1000])
    assert [type(c) for c in first] == [Access, ToServer], "judged before the batches arrive"
    assert first[0].request.topics == ("orders",) and first[0].request.transactional_ids == ("tx",)
    rest = feed(engine.client_data, split(wire[1000:], how, seed=7))
    assert b"".join(c.data for c in first + rest if isinstance(c, ToServer)) == wire
    assert [c.key for c in first + rest if isinstance(c, Access)] == [7, 8]
    replies = engine.server_data(
        response(ProduceResponse, version, 7, responses=[])
        + response(ProduceResponse, version, 8, responses=[])
    )
    assert [c.key for c in replies if isinstance(c, Reply)] == [7, 8]


def test_large_denied_produce_is_dropped_as_it_arrives_and_denied_per_partition():
    engine = KafkaEngine(allow_topics("orders"))
    wire = frame(big_produce(topics=("secrets",)), 9, 3)
    cmds = feed(engine.client_data, chunks_of(wire, 10_000))
    assert not any(isinstance(c, ToServer) for c in cmds)
    (denial,) = [c.data for c in cmds if isinstance(c, ToClient)]
    assert assert_denied(wire, denial, 29).error_codes == [
        ("responses[0].partition_responses[0].error_code", 29),
        ("responses[0].partition_responses[1].error_code", 29),
    ]
    assert len([c for c in cmds if isinstance(c, Access)]) == 1


def test_large_produce_naming_several_topics_waits_for_the_whole_request():
    engine = KafkaEngine(allow_topics("orders", "audit"))
    wire = frame(big_produce(topics=("orders", "audit")), 9, 4)
    early = engine.client_data(wire[:-1])
    assert early == []
    cmds = engine.client_data(wire[-1:])
    assert cmds[0].request.topics == ("orders", "audit") and cmds[1] == ToServer(wire)


def test_large_acks0_produce_streams_and_owes_nothing():
    engine = KafkaEngine(allow_topics("orders"))
    wire = frame(big_produce(acks=0), 9, 5)
    cmds = feed(engine.client_data, chunks_of(wire, 30_000))
    assert [type(c).__name__ for c in cmds][:2] == ["Access", "ToServer"]
    assert type(cmds[-1]).__name__ == "Reply" and cmds[-1].fields["acks"] == 0
    assert b"".join(c.data for c in cmds if isinstance(c, ToServer)) == wire
    later = engine.client_data(frame(produce("secrets"), 9, 6))
    assert any(isinstance(c, ToClient) for c in later), "nothing owed: the denial goes straight out"


def chunks_of(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)]


# ---------------------------------------------------------------------------
# Every API key and version kafka-python knows: decoded, forwarded unchanged,
# and denied with a response kafka-python itself decodes.

from parsers.kafka import apis as kafka_apis  # noqa: E402

EVERY_VERSION = [
    (k, v) for k, cls in sorted(kafka_apis.REQUESTS.items()) for v in range(cls.max_version + 1)
]


@pytest.mark.parametrize(
    "api_key,version",
    EVERY_VERSION,
    ids=[f"{kafka_apis.api_name(k)}-v{v}" for k, v in EVERY_VERSION],
)
def test_every_known_api_version_decodes_forwards_and_denies(api_key, version):
    message = kafka_apis.REQUESTS[api_key][version]()
    if api_key == 0:
        message.acks = 1  # acks=0 (the schema default) owes no response at all
    wire = frame(message, version, 3)
    seen = []
    allowed = KafkaEngine(lambda r: seen.append(r) or Decision(True)).client_data(wire)
    assert seen[0].undecodable is None and allowed[1] == ToServer(wire)

    # Denied, a request naming a resource in every field that can name one gets
    # an error code in every place the response has one.
    named = request_naming_everything(api_key, version)
    if api_key == 0:
        named.acks = 1
    request = frame(named, version, 3)
    engine = KafkaEngine(lambda r: Decision(False))
    denied = engine.client_data(request)
    if api_key == 3:  # the engine learns the brokers its Metadata denial lists first
        denied = engine.server_data(brokers_answer(denied))
    (answer,) = [c.data for c in denied if isinstance(c, ToClient)]
    assert_denied(request, answer, AUTHORIZATION_FAILED)


def test_consumer_group_heartbeat_kip848_group_is_extracted_and_denied_with_30():
    # ConsumerGroupHeartbeat v0 (flexible from v0): header v2, then GroupId as a compact string.
    header = bytes.fromhex("0044 0000 00000009 0001") + b"c" + b"\x00"
    body = b"\x08billing" + b"\x01" + bytes.fromhex("00000000") + b"\x00" * 8
    request = _framed(header + body)
    seen = []
    cmds = KafkaEngine(lambda r: seen.append(r) or Decision(False)).client_data(request)
    assert seen[0].groups == ("billing",) and seen[0].undecodable is None
    (denial,) = [c.data for c in cmds if isinstance(c, ToClient)]
    answer = assert_denied(request, denial, 30)
    assert answer.error_codes == [("error_code", 30)] and answer.header_tags == {}
    assert answer.message["member_epoch"] == -1


# The other APIs kafka-python has no schema for, v0 bodies from Kafka's JSON specs.
EXTRA_DENIALS = [
    # ConsumerGroupDescribe: GroupIds (compact array), IncludeAuthorizedOperations, tags
    (69, b"\x03" + b"\x08billing" + b"\x06audit" + b"\x00" + b"\x00", ("billing", "audit"), 30),
    # GetTelemetrySubscriptions: ClientInstanceId, tags
    (71, bytes(16) + b"\x00", (), 31),
    # PushTelemetry: ClientInstanceId, SubscriptionId, Terminating, CompressionType,
    # Metrics (empty compact bytes), tags
    (72, bytes(16) + bytes(4) + b"\x00" + b"\x00" + b"\x01" + b"\x00", (), 31),
]


@pytest.mark.parametrize(
    "api_key,body,groups,code", EXTRA_DENIALS, ids=[str(e[0]) for e in EXTRA_DENIALS]
)
def test_apis_without_a_kafka_python_schema_are_denied_on_the_wire(api_key, body, groups, code):
    header = api_key.to_bytes(2, "big") + bytes.fromhex("0000 00000004 0001") + b"c" + b"\x00"
    request = _framed(header + body)
    seen = []
    cmds = KafkaEngine(lambda r: seen.append(r) or Decision(False)).client_data(request)
    assert seen[0].groups == groups and seen[0].undecodable is None
    (denial,) = [c.data for c in cmds if isinstance(c, ToClient)]
    answer = assert_denied(request, denial, code)
    if api_key == 69:
        assert [g["group_id"] for g in answer.message["groups"]] == list(groups)
        assert len(answer.error_codes) == len(groups)


def test_trailing_garbage_after_a_good_frame_is_a_clean_protocol_error():
    wire = frame(produce("orders"), 9, 1) + b"\xff\xff\xff\xfe garbage"
    cmds = KafkaEngine(allow_topics("orders")).client_data(wire)
    assert [type(c) for c in cmds] == [Access, ToServer, ParseError]
    assert cmds[1].data == wire[: -len(b"\xff\xff\xff\xfe garbage")]


def produced(correlation_id: int) -> bytes:
    P = ProduceResponse.TopicProduceResponse
    partition = P.PartitionProduceResponse(index=0, error_code=0, base_offset=correlation_id)
    return response(
        ProduceResponse,
        9,
        correlation_id,
        responses=[P(name="orders", partition_responses=[partition])],
    )


def test_pipelining_past_max_pending_holds_the_rest_until_half_are_answered():
    engine = KafkaEngine(allow_topics("orders"), max_pending=4)
    requests = [frame(produce("orders"), 9, i) for i in range(8)]

    cmds = engine.client_data(b"".join(requests))
    assert [c.key for c in cmds if isinstance(c, Access)] == [0, 1, 2, 3]
    assert b"".join(c.data for c in cmds if isinstance(c, ToServer)) == b"".join(requests[:4])
    assert not engine.reading_headers  # held whole, not a slow head: no header deadline
    assert engine.client_data(b"") == []  # EOF waits behind the held requests

    one = engine.server_data(produced(0))
    assert [c for c in one if isinstance(c, Access)] == []  # 3 still owed: more than half

    two = engine.server_data(produced(1))
    assert [c.key for c in two if isinstance(c, Access)] == [4, 5]
    assert b"".join(c.data for c in two if isinstance(c, ToClient)) == produced(1)
    assert b"".join(c.data for c in two if isinstance(c, ToServer)) == b"".join(requests[4:6])

    engine.server_data(produced(2))
    rest = engine.server_data(produced(3))
    assert [c.key for c in rest if isinstance(c, Access)] == [6, 7]
    assert b"".join(c.data for c in rest if isinstance(c, ToServer)) == b"".join(requests[6:])
    assert isinstance(rest[-1], ShutdownServer)  # then the client's EOF, in order

    for i in range(4, 8):
        last = engine.server_data(produced(i))
    assert last[-1] == Close("client closed; every response delivered")
