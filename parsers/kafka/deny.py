"""Kafka denials: the API's own response, with authorization error codes.

A denied Kafka request is answered the way a broker with ACLs would answer
it: the response of that API, at the request's version (flexible encoding
included), with TOPIC/GROUP/CLUSTER/TRANSACTIONAL_ID_AUTHORIZATION_FAILED on
every topic/partition/group the request named. Clients then raise their usual
authorization errors and keep the connection.

``denial(...)`` returns the framed bytes, or ``None`` when no faithful answer
can be encoded for that API (the engine then closes the connection).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from parsers.kafka import apis as kafka_apis
from parsers.kafka.apis import ApiKey, Message, MessageClass
from parsers.varint import encode_uvarint

TOPIC_AUTHORIZATION_FAILED = 29
GROUP_AUTHORIZATION_FAILED = 30
CLUSTER_AUTHORIZATION_FAILED = 31
TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53

ZERO_UUID = uuid.UUID(int=0)


@dataclass(slots=True)
class ClusterView:
    """What the last Metadata response on a connection said about the cluster.

    A synthesized Metadata denial repeats it, so a client that is refused one
    topic still knows where the brokers are.
    """

    brokers: list[tuple[int, str, int, str | None]] = field(default_factory=list)
    cluster_id: str | None = None
    controller_id: int = -1


def _produce(R: MessageClass, req: Message, code: int) -> Message:
    T = R.TopicProduceResponse
    P = T.PartitionProduceResponse
    return R(
        responses=[
            T(
                name=t.name,
                topic_id=t.topic_id,
                partition_responses=[
                    P(index=p.index, error_code=code, base_offset=-1) for p in t.partition_data
                ],
            )
            for t in req.topic_data
        ]
    )


def _fetch(R: MessageClass, req: Message, code: int) -> Message:
    T = R.FetchableTopicResponse
    P = T.PartitionData
    return R(
        error_code=0 if code == TOPIC_AUTHORIZATION_FAILED else code,
        session_id=req.session_id,
        responses=[
            T(
                topic=t.topic,
                topic_id=t.topic_id,
                partitions=[
                    P(
                        partition_index=p.partition,
                        error_code=code,
                        high_watermark=-1,
                        last_stable_offset=-1,
                        log_start_offset=-1,
                        records=b"",  # librdkafka rejects null records
                    )
                    for p in t.partitions
                ],
            )
            for t in req.topics
        ],
    )


def _list_offsets(R: MessageClass, req: Message, code: int) -> Message:
    T = R.ListOffsetsTopicResponse
    P = T.ListOffsetsPartitionResponse
    return R(
        topics=[
            T(
                name=t.name,
                partitions=[
                    P(partition_index=p.partition_index, error_code=code, timestamp=-1, offset=-1)
                    for p in t.partitions
                ],
            )
            for t in req.topics
        ]
    )


def _metadata(R: MessageClass, req: Message, code: int, cluster: ClusterView) -> Message:
    T = R.MetadataResponseTopic
    B = R.MetadataResponseBroker
    topics = [
        T(
            error_code=code,
            name=t.name,
            topic_id=t.topic_id or ZERO_UUID,
            is_internal=False,
            partitions=[],
        )
        for t in req.topics or ()
    ]
    return R(
        brokers=[B(node_id=n, host=h, port=p, rack=r) for n, h, p, r in cluster.brokers],
        cluster_id=cluster.cluster_id,
        controller_id=cluster.controller_id,
        topics=topics,
        error_code=0 if topics else code,
    )


def _offset_commit(R: MessageClass, req: Message, code: int) -> Message:
    T = R.OffsetCommitResponseTopic
    P = T.OffsetCommitResponsePartition
    return R(
        topics=[
            T(
                name=t.name,
                topic_id=t.topic_id,
                partitions=[
                    P(partition_index=p.partition_index, error_code=code) for p in t.partitions
                ],
            )
            for t in req.topics
        ]
    )


def _offset_fetch(R: MessageClass, req: Message, code: int, version: int) -> Message:
    if version < 8:
        T = R.OffsetFetchResponseTopic
        P = T.OffsetFetchResponsePartition
        topics = [
            T(
                name=t.name,
                partitions=[
                    P(partition_index=i, committed_offset=-1, metadata="", error_code=code)
                    for i in t.partition_indexes
                ],
            )
            for t in req.topics or ()
        ]
        return R(topics=topics, error_code=code)
    G = R.OffsetFetchResponseGroup
    T = G.OffsetFetchResponseTopics
    P = T.OffsetFetchResponsePartitions
    return R(
        groups=[
            G(
                group_id=g.group_id,
                error_code=code,
                topics=[
                    T(
                        name=t.name,
                        topic_id=t.topic_id,
                        partitions=[
                            P(partition_index=i, committed_offset=-1, metadata="", error_code=code)
                            for i in t.partition_indexes
                        ],
                    )
                    for t in g.topics or ()
                ],
            )
            for g in req.groups
        ]
    )


def _find_coordinator(R: MessageClass, req: Message, code: int, version: int) -> Message:
    if version < 4:
        return R(error_code=code, node_id=-1, host="", port=-1)
    C = R.Coordinator
    return R(
        coordinators=[
            C(key=k, node_id=-1, host="", port=-1, error_code=code) for k in req.coordinator_keys
        ]
    )


def _create_topics(R: MessageClass, req: Message, code: int) -> Message:
    T = R.CreatableTopicResult
    return R(
        topics=[
            T(
                name=t.name,
                topic_id=ZERO_UUID,
                error_code=code,
                num_partitions=-1,
                replication_factor=-1,
                configs=None,
            )
            for t in req.topics
        ]
    )


def _delete_topics(R: MessageClass, req: Message, code: int, version: int) -> Message:
    T = R.DeletableTopicResult
    if version < 6:
        return R(responses=[T(name=n, error_code=code) for n in req.topic_names])
    return R(
        responses=[
            T(name=t.name, topic_id=t.topic_id or ZERO_UUID, error_code=code) for t in req.topics
        ]
    )


def _delete_records(R: MessageClass, req: Message, code: int) -> Message:
    T = R.DeleteRecordsTopicResult
    P = T.DeleteRecordsPartitionResult
    return R(
        topics=[
            T(
                name=t.name,
                partitions=[
                    P(partition_index=p.partition_index, low_watermark=-1, error_code=code)
                    for p in t.partitions
                ],
            )
            for t in req.topics
        ]
    )


def _offset_for_leader_epoch(R: MessageClass, req: Message, code: int) -> Message:
    T = R.OffsetForLeaderTopicResult
    P = T.EpochEndOffset
    return R(
        topics=[
            T(
                topic=t.topic,
                partitions=[
                    P(error_code=code, partition=p.partition, leader_epoch=-1, end_offset=-1)
                    for p in t.partitions
                ],
            )
            for t in req.topics
        ]
    )


def _add_partitions_to_txn(R: MessageClass, req: Message, code: int, version: int) -> Message:
    T = R.AddPartitionsToTxnTopicResult
    P = T.AddPartitionsToTxnPartitionResult

    def topics(ts: list[Message]) -> list[Message]:
        return [
            T(
                name=t.name,
                results_by_partition=[
                    P(partition_index=i, partition_error_code=code) for i in t.partitions
                ],
            )
            for t in ts
        ]

    if version < 4:
        return R(results_by_topic_v3_and_below=topics(req.v3_and_below_topics))
    X = R.AddPartitionsToTxnResult
    return R(
        error_code=0,
        results_by_transaction=[
            X(transactional_id=x.transactional_id, topic_results=topics(x.topics))
            for x in req.transactions
        ],
    )


def _txn_offset_commit(R: MessageClass, req: Message, code: int) -> Message:
    T = R.TxnOffsetCommitResponseTopic
    P = T.TxnOffsetCommitResponsePartition
    return R(
        topics=[
            T(
                name=t.name,
                partitions=[
                    P(partition_index=p.partition_index, error_code=code) for p in t.partitions
                ],
            )
            for t in req.topics
        ]
    )


def _describe_configs(R: MessageClass, req: Message, code: int) -> Message:
    X = R.DescribeConfigsResult
    return R(
        results=[
            X(
                error_code=code,
                error_message=None,
                resource_type=r.resource_type,
                resource_name=r.resource_name,
                configs=[],
            )
            for r in req.resources
        ]
    )


def _alter_configs(R: MessageClass, req: Message, code: int) -> Message:
    X = R.AlterConfigsResourceResponse
    return R(
        responses=[
            X(
                error_code=code,
                error_message=None,
                resource_type=r.resource_type,
                resource_name=r.resource_name,
            )
            for r in req.resources
        ]
    )


def _create_partitions(R: MessageClass, req: Message, code: int) -> Message:
    X = R.CreatePartitionsTopicResult
    return R(results=[X(name=t.name, error_code=code, error_message=None) for t in req.topics])


def _offset_delete(R: MessageClass, req: Message, code: int) -> Message:
    T = R.OffsetDeleteResponseTopic
    P = T.OffsetDeleteResponsePartition
    return R(
        error_code=0 if code == TOPIC_AUTHORIZATION_FAILED else code,
        topics=[
            T(
                name=t.name,
                partitions=[
                    P(partition_index=p.partition_index, error_code=code) for p in t.partitions
                ],
            )
            for t in req.topics
        ],
    )


def _describe_groups(R: MessageClass, req: Message, code: int) -> Message:
    G = R.DescribedGroup
    return R(
        groups=[
            G(
                error_code=code,
                group_id=g,
                group_state="",
                protocol_type="",
                protocol_data="",
                members=[],
            )
            for g in req.groups
        ]
    )


def _delete_groups(R: MessageClass, req: Message, code: int) -> Message:
    X = R.DeletableGroupResult
    return R(results=[X(group_id=g, error_code=code) for g in req.groups_names])


def _create_acls(R: MessageClass, req: Message, code: int) -> Message:
    X = R.AclCreationResult
    return R(results=[X(error_code=code, error_message=None) for _ in req.creations])


def _delete_acls(R: MessageClass, req: Message, code: int) -> Message:
    X = R.DeleteAclsFilterResult
    return R(
        filter_results=[
            X(error_code=code, error_message=None, matching_acls=[]) for _ in req.filters
        ]
    )


def _describe_log_dirs(R: MessageClass, req: Message, code: int) -> Message:
    X = R.DescribeLogDirsResult
    return R(error_code=code, results=[X(error_code=code, log_dir="", topics=[])])


def _alter_replica_log_dirs(R: MessageClass, req: Message, code: int) -> Message:
    T = R.AlterReplicaLogDirTopicResult
    P = T.AlterReplicaLogDirPartitionResult
    return R(
        results=[
            T(
                topic_name=t.name,
                partitions=[P(partition_index=i, error_code=code) for i in t.partitions],
            )
            for d in req.dirs
            for t in d.topics
        ]
    )


def _write_txn_markers(R: MessageClass, req: Message, code: int) -> Message:
    M = R.WritableTxnMarkerResult
    T = M.WritableTxnMarkerTopicResult
    P = T.WritableTxnMarkerPartitionResult
    return R(
        markers=[
            M(
                producer_id=m.producer_id,
                topics=[
                    T(
                        name=t.name,
                        partitions=[
                            P(partition_index=i, error_code=code) for i in t.partition_indexes
                        ],
                    )
                    for t in m.topics
                ],
            )
            for m in req.markers
        ]
    )


def _elect_leaders(R: MessageClass, req: Message, code: int) -> Message:
    X = R.ReplicaElectionResult
    P = X.PartitionResult
    return R(
        error_code=code,
        replica_election_results=[
            X(
                topic=t.topic,
                partition_result=[
                    P(partition_id=i, error_code=code, error_message=None) for i in t.partitions
                ],
            )
            for t in req.topic_partitions or ()
        ],
    )


def _alter_client_quotas(R: MessageClass, req: Message, code: int) -> Message:
    X = R.EntryData
    E = X.EntityData
    return R(
        entries=[
            X(
                error_code=code,
                error_message=None,
                entity=[E(entity_type=e.entity_type, entity_name=e.entity_name) for e in x.entity],
            )
            for x in req.entries
        ]
    )


def _alter_user_scram_credentials(R: MessageClass, req: Message, code: int) -> Message:
    X = R.AlterUserScramCredentialsResult
    users = [d.name for d in req.deletions] + [u.name for u in req.upsertions]
    return R(results=[X(user=u, error_code=code, error_message=None) for u in users])


def _describe_producers(R: MessageClass, req: Message, code: int) -> Message:
    T = R.TopicResponse
    P = T.PartitionResponse
    return R(
        topics=[
            T(
                name=t.name,
                partitions=[
                    P(partition_index=i, error_code=code, error_message=None, active_producers=[])
                    for i in t.partition_indexes
                ],
            )
            for t in req.topics
        ]
    )


def _describe_transactions(R: MessageClass, req: Message, code: int) -> Message:
    X = R.TransactionState
    return R(
        transaction_states=[
            X(
                error_code=code,
                transactional_id=t,
                transaction_state="",
                transaction_timeout_ms=0,
                transaction_start_time_ms=-1,
                producer_id=-1,
                producer_epoch=-1,
                topics=[],
            )
            for t in req.transactional_ids
        ]
    )


def _describe_topic_partitions(R: MessageClass, req: Message, code: int) -> Message:
    T = R.DescribeTopicPartitionsResponseTopic
    return R(
        topics=[
            T(
                error_code=code,
                name=t.name,
                topic_id=ZERO_UUID,
                is_internal=False,
                partitions=[],
                topic_authorized_operations=-(2**31),
            )
            for t in req.topics
        ],
        next_cursor=None,
    )


# api key -> builder(R, req, code[, version]); all others use a top-level error_code.
_BUILDERS: dict[int, Callable[[MessageClass, Message, int], Message]] = {
    ApiKey.Produce: _produce,
    ApiKey.Fetch: _fetch,
    ApiKey.ListOffsets: _list_offsets,
    ApiKey.OffsetCommit: _offset_commit,
    ApiKey.CreateTopics: _create_topics,
    ApiKey.DeleteRecords: _delete_records,
    ApiKey.OffsetForLeaderEpoch: _offset_for_leader_epoch,
    ApiKey.TxnOffsetCommit: _txn_offset_commit,
    ApiKey.DescribeConfigs: _describe_configs,
    ApiKey.AlterConfigs: _alter_configs,
    ApiKey.CreatePartitions: _create_partitions,
    ApiKey.IncrementalAlterConfigs: _alter_configs,
    ApiKey.OffsetDelete: _offset_delete,
    ApiKey.DescribeGroups: _describe_groups,
    ApiKey.DeleteGroups: _delete_groups,
    ApiKey.WriteTxnMarkers: _write_txn_markers,
    ApiKey.CreateAcls: _create_acls,
    ApiKey.DeleteAcls: _delete_acls,
    ApiKey.AlterReplicaLogDirs: _alter_replica_log_dirs,
    ApiKey.DescribeLogDirs: _describe_log_dirs,
    ApiKey.ElectLeaders: _elect_leaders,
    ApiKey.AlterClientQuotas: _alter_client_quotas,
    ApiKey.AlterUserScramCredentials: _alter_user_scram_credentials,
    ApiKey.DescribeProducers: _describe_producers,
    ApiKey.DescribeTransactions: _describe_transactions,
    ApiKey.DescribeTopicPartitions: _describe_topic_partitions,
}
_VERSIONED_BUILDERS: dict[int, Callable[[MessageClass, Message, int, int], Message]] = {
    ApiKey.OffsetFetch: _offset_fetch,
    ApiKey.FindCoordinator: _find_coordinator,
    ApiKey.DeleteTopics: _delete_topics,
    ApiKey.AddPartitionsToTxn: _add_partitions_to_txn,
}


def _encode(response: Message, correlation_id: int) -> bytes:
    # The response was built from its versioned class; passing version= to
    # encode() again would trip kafka-python on a response header.
    response.with_header(correlation_id=correlation_id)
    return bytes(response.encode(header=True, framed=True))


def denial(
    api_key: int,
    api_version: int,
    correlation_id: int,
    message: Message,
    code: int,
    cluster: ClusterView,
) -> bytes | None:
    """Framed error response for a decoded request ``message``, or None."""
    if api_key in kafka_apis.EXTRA_APIS:
        return _extra_denial(api_key, api_version, correlation_id, message, code)
    R = kafka_apis.response_class(api_key, api_version)
    if R is None or message is None:
        return None
    if api_key == ApiKey.ApiVersions:
        # Clients read a failed ApiVersions reply as v0, whatever they asked for
        # (that is how brokers answer UNSUPPORTED_VERSION too).
        return _encode(R[0](error_code=code, api_keys=[]), correlation_id)
    R = R[api_version]
    if api_key == ApiKey.Metadata:
        response = _metadata(R, message, code, cluster)
    elif api_key in _BUILDERS:
        response = _BUILDERS[api_key](R, message, code)
    elif api_key in _VERSIONED_BUILDERS:
        response = _VERSIONED_BUILDERS[api_key](R, message, code, api_version)
    elif "error_code" in R.fields and R.fields["error_code"].for_version_q(api_version):
        response = R(error_code=code)
        for name in ("producer_id", "producer_epoch", "generation_id", "member_epoch"):
            field = R.fields.get(name)
            if field is not None and field.for_version_q(api_version):
                setattr(response, name, -1)
    else:
        return None
    return _encode(response, correlation_id)


# --------------------------------------------------------------------------
# APIs kafka-python has no schema for: encoded by hand from Kafka's JSON specs.
# All are flexible, so header v1 (correlation id + empty tagged fields).


def _frame(correlation_id: int, body: bytes) -> bytes:
    payload = struct.pack(">iB", correlation_id, 0) + body
    return struct.pack(">i", len(payload)) + payload


def _compact_str(s: str) -> bytes:
    raw = s.encode()
    return encode_uvarint(len(raw) + 1) + raw


def _extra_denial(
    api_key: int, api_version: int, correlation_id: int, groups: list[str], code: int
) -> bytes:
    throttle = struct.pack(">i", 0)
    if api_key == ApiKey.ConsumerGroupHeartbeat:
        # error_code, error_message=null, member_id=null, member_epoch, heartbeat_interval_ms,
        # assignment=null, tagged fields
        body = throttle + struct.pack(">hBBiibB", code, 0, 0, -1, 0, -1, 0)
    elif api_key == ApiKey.ConsumerGroupDescribe:
        body = throttle + encode_uvarint(len(groups) + 1)
        for group in groups:
            body += struct.pack(">hB", code, 0) + _compact_str(group) + _compact_str("")
            body += struct.pack(">ii", -1, -1) + _compact_str("") + encode_uvarint(1)
            body += struct.pack(">iB", -(2**31), 0)
        body += b"\x00"
    elif api_key == ApiKey.GetTelemetrySubscriptions:
        body = throttle + struct.pack(">h", code) + bytes(16) + struct.pack(">i", 0)
        body += encode_uvarint(1) + struct.pack(">ii?", 0, 0, False) + encode_uvarint(1) + b"\x00"
    else:  # 72 PushTelemetry
        body = throttle + struct.pack(">hB", code, 0)
    return _frame(correlation_id, body)
