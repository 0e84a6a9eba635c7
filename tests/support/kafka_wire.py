"""Read a Kafka response off the wire the way a client does, for denial tests.

The engine's ``Reply`` records carry an error code the engine fills in
itself, so a test that checks them cannot tell a right denial from a wrong
one. These helpers start from the bytes sent to the client instead:

- the 4-byte size, which must cover the rest exactly;
- the response header: correlation id, plus tagged fields (header v1) when
  the API version is flexible, ApiVersions excepted (always header v0);
- the body, decoded with kafka-python's response class for that API key and
  version, and re-encoded to prove the decode used every byte;
- every error-code field of the decoded body, found by walking the schema of
  that version, each with its path (``topics[0].partitions[1].error_code``).

The few APIs kafka-python has no schema for (ConsumerGroupHeartbeat,
ConsumerGroupDescribe and the KIP-714 telemetry APIs) are read here with
``struct``, field by field from Kafka's JSON message specs.

The request side (api key, version, correlation id) is read from the request
frame the test sent, so nothing here trusts the engine.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

from parsers.kafka import apis as kafka_apis
from parsers.kafka.apis import ApiKey
from parsers.varint import decode_uvarint

AUTHORIZATION_FAILED = frozenset({29, 30, 31, 53})  # topic, group, cluster, transactional id


@dataclass
class Answer:
    """One response as a client reads it."""

    api_key: int
    api_version: int
    correlation_id: int
    header_tags: dict[int, bytes]
    message: Any  # kafka-python response object, or a dict for the hand-read APIs
    error_codes: list[tuple[str, int]] = field(default_factory=list)


def request_header(request: bytes) -> tuple[int, int, int]:
    """(api key, api version, correlation id) of a framed request."""
    return struct.unpack_from(">hhi", request, 4)


def read_answer(request: bytes, answer: bytes) -> Answer:
    """Decode the framed response ``answer`` to the framed ``request``."""
    api_key, api_version, _ = request_header(request)
    (size,) = struct.unpack_from(">i", answer, 0)
    assert size == len(answer) - 4, f"frame size {size} but {len(answer) - 4} bytes follow"
    reader = _Reader(answer[4:])
    correlation_id = reader.int32()
    extra = api_key in kafka_apis.EXTRA_APIS
    if extra:
        flexible_header = True
    else:
        cls = kafka_apis.RESPONSES[api_key]
        flexible_header = api_key != ApiKey.ApiVersions and cls.flexible_version_q(api_version)
    tags = reader.tagged_fields() if flexible_header else {}
    body = reader.rest()
    if extra:
        message, codes = _read_extra(api_key, body)
    else:
        message, codes = _read_known(api_key, api_version, body)
    return Answer(api_key, api_version, correlation_id, tags, message, codes)


def assert_denied(request: bytes, answer: bytes, code: int | frozenset[int]) -> Answer:
    """``answer`` is a well-formed denial of ``request``: same correlation id,
    at least one error code, and every error code is the denial's.

    ``code`` may be a set when the test does not care which authorization
    error it is; all codes must still agree. A top-level error code may be 0
    when the errors are reported per resource below it (Fetch, Metadata,
    OffsetDelete and AddPartitionsToTxn v4+ answer that way, as brokers do).
    """
    read = read_answer(request, answer)
    assert read.correlation_id == request_header(request)[2]
    codes = read.error_codes
    assert codes, f"no error code in the {kafka_apis.api_name(read.api_key)} denial"
    nested = any("." in path for path, _ in codes)
    significant = [(p, c) for p, c in codes if not (c == 0 and nested and "." not in p)]
    assert significant, f"only zero error codes: {codes}"
    values = {c for _, c in significant}
    wanted = code if isinstance(code, frozenset) else frozenset({code})
    assert len(values) == 1 and values <= wanted, f"error codes {codes}, expected {sorted(wanted)}"
    return read


# ---------------------------------------------------------------------------
# Bodies kafka-python knows


def _read_known(api_key: int, api_version: int, body: bytes) -> tuple[Any, list[tuple[str, int]]]:
    cls = kafka_apis.RESPONSES[api_key]
    if api_key == ApiKey.ApiVersions:
        # A failed ApiVersions is read as v0 whatever was asked (KIP-511):
        # that is how a client can read an UNSUPPORTED_VERSION answer.
        api_version = 0
    message = cls.decode(body, version=api_version)
    again = bytes(message.encode())  # at the decoded version
    assert again == body, "the body has bytes kafka-python did not read"
    return message, list(_error_codes(message, cls._struct, api_version, ""))


def _error_codes(obj: Any, struct_: Any, version: int, prefix: str):
    for f in struct_._fields or ():
        if not f.for_version_q(version):
            continue
        value = getattr(obj, f.name, None)
        path = f"{prefix}{f.name}"
        if f.is_struct_array():
            for i, item in enumerate(value or ()):
                yield from _error_codes(item, f, version, f"{path}[{i}].")
        elif f.is_struct():
            if value is not None:
                yield from _error_codes(value, f, version, f"{path}.")
        elif _is_error_code(f.name) and f.type_str == "int16":
            # A tagged field is only on the wire when it differs from its
            # default; absent, it decodes as 0 and says nothing.
            if f.tagged_field_q(version) and value == 0:
                continue
            yield path, value


def _is_error_code(name: str) -> bool:
    return name == "error_code" or name.endswith("_error_code")


# ---------------------------------------------------------------------------
# Bodies read by hand (Kafka's clients/src/main/resources/common/message/*.json)


def _read_extra(api_key: int, body: bytes) -> tuple[dict, list[tuple[str, int]]]:
    r = _Reader(body)
    out: dict[str, Any] = {"throttle_time_ms": r.int32()}
    codes: list[tuple[str, int]] = []
    # Flexible from v0, unknown to kafka-python.
    if api_key == ApiKey.ConsumerGroupHeartbeat:
        out["error_code"] = r.int16()
        out["error_message"] = r.compact_nullable_string()
        out["member_id"] = r.compact_nullable_string()
        out["member_epoch"] = r.int32()
        out["heartbeat_interval_ms"] = r.int32()
        assignment = r.int8()
        assert assignment == -1, "a denial carries no assignment"
        codes.append(("error_code", out["error_code"]))
    elif api_key == ApiKey.ConsumerGroupDescribe:
        groups = []
        for i in range(r.compact_length()):
            group = {
                "error_code": r.int16(),
                "error_message": r.compact_nullable_string(),
                "group_id": r.compact_nullable_string(),
                "group_state": r.compact_nullable_string(),
                "group_epoch": r.int32(),
                "assignment_epoch": r.int32(),
                "assignor_name": r.compact_nullable_string(),
            }
            assert r.compact_length() == 0, "a denial lists no members"
            group["authorized_operations"] = r.int32()
            r.tagged_fields()
            groups.append(group)
            codes.append((f"groups[{i}].error_code", group["error_code"]))
        out["groups"] = groups
    elif api_key == ApiKey.GetTelemetrySubscriptions:
        out["error_code"] = r.int16()
        out["client_instance_id"] = r.take(16)
        out["subscription_id"] = r.int32()
        out["accepted_compression_types"] = [r.int8() for _ in range(r.compact_length())]
        out["push_interval_ms"] = r.int32()
        out["telemetry_max_bytes"] = r.int32()
        out["delta_temporality"] = r.int8()
        out["requested_metrics"] = [r.compact_nullable_string() for _ in range(r.compact_length())]
        codes.append(("error_code", out["error_code"]))
    elif api_key == ApiKey.PushTelemetry:
        out["error_code"] = r.int16()
        codes.append(("error_code", out["error_code"]))
    else:
        raise AssertionError(f"no reader for api key {api_key}")
    r.tagged_fields()
    assert not r.rest(), "bytes left after the body"
    return out, codes


class _Reader:
    def __init__(self, data: bytes):
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        raw = self._data[self._pos : self._pos + n]
        assert len(raw) == n, "response ends early"
        self._pos += n
        return raw

    def int8(self) -> int:
        return struct.unpack(">b", self.take(1))[0]

    def int16(self) -> int:
        return struct.unpack(">h", self.take(2))[0]

    def int32(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def uvarint(self) -> int:
        # The one varint codec; tests/parsers/kafka/test_varint.py pins it to literal bytes.
        value, self._pos = decode_uvarint(self._data, self._pos)
        return value

    def compact_length(self) -> int:
        n = self.uvarint()
        assert n > 0, "null where a denial sends an empty array"
        return n - 1

    def compact_nullable_string(self) -> str | None:
        n = self.uvarint()
        return None if n == 0 else self.take(n - 1).decode()

    def tagged_fields(self) -> dict[int, bytes]:
        tags = {}
        for _ in range(self.uvarint()):
            tag = self.uvarint()
            tags[tag] = self.take(self.uvarint())
        return tags

    def rest(self) -> bytes:
        raw, self._pos = self._data[self._pos :], len(self._data)
        return raw


# ---------------------------------------------------------------------------
# Requests that name something everywhere they can


def request_naming_everything(api_key: int, api_version: int) -> Any:
    """A request of that API and version whose every array holds one entry and
    every string says "a": each resource field is filled, so its denial has a
    per-resource error code wherever the response has one."""
    cls = kafka_apis.REQUESTS[api_key]
    message = cls[api_version]()
    _fill(message, cls._struct, api_version)
    return message


def _fill(obj: Any, struct_: Any, version: int) -> None:
    for f in struct_._fields or ():
        if not f.for_version_q(version) or f.tagged_field_q(version):
            continue
        if f.is_struct_array():
            item = f.array_of._data_class()
            _fill(item, f.array_of, version)
            setattr(obj, f.name, [item])
        elif f.is_struct():
            item = f._data_class()
            _fill(item, f, version)
            setattr(obj, f.name, item)
        elif f.is_array():
            element = {"string": "a", "uuid": uuid.UUID(int=1)}.get(f.array_of.type_str, 0)
            setattr(obj, f.name, [element])
        elif f.type_str == "string":
            setattr(obj, f.name, "a")


def brokers_answer(commands: list) -> bytes:
    """The broker's answer to the Metadata request the engine sent of its own in
    ``commands`` (to learn the brokers a Metadata denial lists): one broker, b1:9092."""
    from kafka.protocol.metadata import MetadataRequest, MetadataResponse

    from parsers.base import ToServer

    (lookup,) = [c.data for c in commands if isinstance(c, ToServer)]
    version = int.from_bytes(lookup[6:8], "big")
    asked = MetadataRequest.decode(lookup, version=version, header=True, framed=True)
    broker = MetadataResponse.MetadataResponseBroker(node_id=1, host="b1", port=9092, rack=None)
    answer = MetadataResponse[version](brokers=[broker], topics=[])
    answer.with_header(correlation_id=asked.header.correlation_id)
    return bytes(answer.encode(header=True, framed=True))


def produce_frame(correlation_id: int, topic: str, client_id: str = "test-client") -> bytes:
    """A framed Produce v9 request (acks=1) to partition 0 of ``topic``, no records."""
    from kafka.protocol.producer import ProduceRequest as P

    part = P.TopicProduceData.PartitionProduceData(index=0, records=None)
    msg = P(
        acks=1,
        timeout_ms=5000,
        transactional_id=None,
        topic_data=[P.TopicProduceData(name=topic, partition_data=[part])],
    )
    msg.with_header(correlation_id=correlation_id, client_id=client_id)
    return bytes(msg.encode(version=9, header=True, framed=True))


def metadata_frame(correlation_id: int, topic: str, client_id: str = "test-client") -> bytes:
    """A framed Metadata v12 request for ``topic``."""
    from kafka.protocol.metadata import MetadataRequest

    msg = MetadataRequest(
        topics=[MetadataRequest.MetadataRequestTopic(name=topic)], allow_auto_topic_creation=False
    )
    msg.with_header(correlation_id=correlation_id, client_id=client_id)
    return bytes(msg.encode(version=12, header=True, framed=True))
