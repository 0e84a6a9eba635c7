"""Kafka API table and resource extraction, built on kafka-python's schemas.

kafka-python 3 generates its request/response classes from Kafka's own JSON
message specs, and keeps the spec annotations: every field that names a topic,
a consumer group or a transactional id carries ``entityType``. So resource
extraction is one schema walk shared by every API key and version, instead of
a hand-written accessor per API.

A few APIs that modern clients send are missing from kafka-python
(ConsumerGroupHeartbeat, ConsumerGroupDescribe, the KIP-714 telemetry APIs).
They are flexible from v0 and their resources are the first body field, so
``EXTRA_APIS`` decodes just that.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, TypeAlias

# kafka-python ships no type information (pyproject.toml tells mypy so): this
# module is the typed boundary, and the rest of the code imports ApiKey from
# here. These imports also register the message classes.
import kafka.protocol.admin  # noqa: F401
import kafka.protocol.consumer  # noqa: F401
import kafka.protocol.metadata  # noqa: F401
import kafka.protocol.producer  # noqa: F401
import kafka.protocol.sasl  # noqa: F401
from kafka.protocol.api_key import ApiKey as ApiKey  # re-exported
from kafka.protocol.api_message import ApiMessage

# kafka-python's generated classes (one per API, indexed by version) and their
# instances: untyped, so named here for what they are.
MessageClass: TypeAlias = Any
Message: TypeAlias = Any

TOPIC, GROUP, TXN = "topicName", "groupId", "transactionalId"

# ConfigResource.Type values (DescribeConfigs, AlterConfigs, IncrementalAlterConfigs).
CONFIG_RESOURCE_TOPIC = 2
CONFIG_RESOURCE_GROUP = 32
# FindCoordinator key types.
COORDINATOR_GROUP, COORDINATOR_TXN = 0, 1

# Topics a client stops fetching are not read by the request: leave them out.
_IGNORED_FIELDS = frozenset({"forgotten_topics_data"})


def _all_subclasses(cls: type) -> list[type]:
    out: list[type] = []
    sub: type
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def _message_classes() -> tuple[dict[int, MessageClass], dict[int, MessageClass]]:
    requests: dict[int, MessageClass] = {}
    responses: dict[int, MessageClass] = {}
    cls: MessageClass
    for cls in _all_subclasses(ApiMessage):
        if getattr(cls, "_class_version", None) is not None or cls.__dict__.get("_json") is None:
            continue
        table = requests if cls.type == "request" else responses
        table[cls.API_KEY] = cls
    return requests, responses


REQUESTS, RESPONSES = _message_classes()


@dataclass(frozen=True, slots=True)
class ExtraApi:
    """An API kafka-python has no schema for: flexible from v0, resources up front."""

    name: str
    max_version: int
    first_field: str | None  # "group" (compact string), "groups" (compact array) or None


EXTRA_APIS: dict[int, ExtraApi] = {
    int(key): ExtraApi(key.name, max_version, first_field)
    for key, max_version, first_field in (
        (ApiKey.ConsumerGroupHeartbeat, 1, "group"),
        (ApiKey.ConsumerGroupDescribe, 1, "groups"),
        (ApiKey.GetTelemetrySubscriptions, 0, None),
        (ApiKey.PushTelemetry, 0, None),
    )
}

# Every API added since KIP-482 (Kafka 2.4) is flexible from v0.
_FIRST_ALWAYS_FLEXIBLE_KEY = 56


# The one table of API names is kafka-python's ApiKey: every key Kafka defines,
# including those kafka-python has no schema for (EXTRA_APIS).


def api_name(api_key: int) -> str:
    """Kafka's name for an API ("ListOffsets"), or the number if unknown."""
    try:
        return str(ApiKey(api_key).name)
    except ValueError:
        return str(api_key)


# Names as a policy spells them: Cilium's lower case ("produce"), plus its
# "offsets" for ListOffsets. Policy and trace both read this table.
API_KEY_BY_POLICY_NAME: dict[str, int] = {k.name.lower(): int(k) for k in ApiKey}
API_KEY_BY_POLICY_NAME["offsets"] = int(ApiKey.ListOffsets)


def policy_name(api_key: int) -> str:
    """An API's name in the policy's spelling ("listoffsets"), for messages."""
    return api_name(api_key).lower()


def request_class(api_key: int, api_version: int) -> MessageClass | None:
    cls = REQUESTS.get(api_key)
    if cls is None or not 0 <= api_version <= cls.max_version:
        return None
    return cls


def response_class(api_key: int, api_version: int) -> MessageClass | None:
    cls = RESPONSES.get(api_key)
    if cls is None or not 0 <= api_version <= cls.max_version:
        return None
    return cls


def is_flexible(api_key: int, api_version: int) -> bool:
    """Whether this request/response uses tagged fields (header v2 / v1)."""
    cls = REQUESTS.get(api_key)
    if cls is not None:
        return bool(cls.flexible_version_q(api_version))
    return api_key >= _FIRST_ALWAYS_FLEXIBLE_KEY


def response_header_flexible(api_key: int, api_version: int) -> bool:
    # ApiVersions answers with header v0 whatever the version, so that a client
    # can read the reply to a version the broker does not support.
    return api_key != ApiKey.ApiVersions and is_flexible(api_key, api_version)


# --------------------------------------------------------------------------
# Resource extraction


@dataclass(slots=True)
class Resources:
    topics: list[str]
    groups: list[str]
    transactional_ids: list[str]
    topic_ids: list[uuid.UUID]


# Which fields hold resources: (field name, "array" | "struct" | "value", then
# a sub-plan for structs, or what the field names: TOPIC, GROUP, TXN, "topicId"
# or "typed").
_PlanStep: TypeAlias = "tuple[str, str, _Plan | str]"
_Plan: TypeAlias = "tuple[_PlanStep, ...]"

# Memo of _plan (schema fields define __eq__ without __hash__, hence id()).
_PLANS: dict[tuple[int, int], _Plan] = {}


def _plan(struct: Any, version: int) -> _Plan:
    """Which fields of ``struct`` at ``version`` hold resources, as a nested plan.

    A pure function of the schema, memoized: the walk per request then touches
    only the fields that matter.
    """
    memo = _PLANS.get((id(struct), version))
    if memo is not None:
        return memo
    plan: list[_PlanStep] = []
    for field in struct._fields or ():
        if not field.for_version_q(version) or field.name in _IGNORED_FIELDS:
            continue
        if field.is_struct() or field.is_struct_array():
            sub = _plan(field, version)
            if sub:
                plan.append((field.name, "array" if field.is_struct_array() else "struct", sub))
        elif field._entity_type in (TOPIC, GROUP, TXN):
            plan.append((field.name, "array" if field.is_array() else "value", field._entity_type))
        elif field.type_str == "uuid" and field.name == "topic_id":
            plan.append((field.name, "value", "topicId"))
        elif field.name in ("resource_name", "key", "coordinator_keys"):
            # Named by a sibling type field (configs, FindCoordinator): see _typed_name.
            plan.append((field.name, "array" if field.is_array() else "value", "typed"))
    _PLANS[(id(struct), version)] = memo = tuple(plan)
    return memo


def _typed_name(obj: Message, field_name: str) -> str | None:
    if field_name == "resource_name":
        kind: int | None = getattr(obj, "resource_type", None)
        if kind is None:
            return None
        return {CONFIG_RESOURCE_TOPIC: TOPIC, CONFIG_RESOURCE_GROUP: GROUP}.get(kind)
    kind = getattr(obj, "key_type", COORDINATOR_GROUP)
    return {COORDINATOR_GROUP: GROUP, COORDINATOR_TXN: TXN}.get(kind)


def _walk(obj: Message, plan: _Plan, out: Resources) -> None:
    for name, shape, what in plan:
        value = getattr(obj, name, None)
        if value is None:
            continue
        if isinstance(what, tuple):
            for item in value if shape == "array" else (value,):
                if item is not None:
                    _walk(item, what, out)
            continue
        kind = _typed_name(obj, name) if what == "typed" else what
        if kind is None:
            continue
        values = value if shape == "array" else (value,)
        for v in values:
            if kind == "topicId":
                if v is not None and v.int != 0:
                    out.topic_ids.append(v)
            elif v:  # empty/absent names (e.g. a v13 produce names topics by id only)
                {TOPIC: out.topics, GROUP: out.groups, TXN: out.transactional_ids}[kind].append(v)


def extract(message: Message, api_version: int) -> Resources:
    out = Resources([], [], [], [])
    _walk(message, _plan(type(message)._struct, api_version), out)
    return out


def metadata_wants_all_topics(message: Message) -> bool:
    """A Metadata request with null topics asks for every topic (v1+)."""
    return getattr(message, "topics", ()) is None
