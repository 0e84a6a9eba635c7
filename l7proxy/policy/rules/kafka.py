"""``rules.kafka``: Cilium's Kafka rules, plus group, transactional id and topic prefix.

    rules:
      kafka:
        - role: produce              # or apiKey: produce | 0 | ListOffsets | offsets ...
          topic: orders              # or topicPrefix: "orders."
          clientID: billing          # optional, exact
          apiVersion: 9              # optional, exact
          group: billing-consumers   # optional, exact (new)
          transactionalID: billing-tx  # optional, exact (new)

Semantics follow Cilium: every topic a request names must be allowed; a
request that names no topic (ApiVersions, FindCoordinator, Metadata for all
topics) matches on API, version and client id alone. ``group`` and
``transactionalID`` work the same way for the groups and transactional ids a
request names. A request whose body could not be decoded matches only rules
that restrict no resource.

Across several rules, "every topic must be allowed" means each topic may be
allowed by a different rule (Cilium's MatchesRule). ``matches`` judges one
rule against the whole request; ``covers`` says which of the request's topics
one rule allows; ``allowed(rules, request)`` combines them the Cilium way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from l7proxy.policy.errors import YamlPath
from l7proxy.policy.rules import Edits, L7Kind, register
from parsers.kafka.apis import API_KEY_BY_POLICY_NAME, ApiKey, policy_name
from parsers.requests import KafkaRequest

_FIELDS = (
    "role",
    "apiKey",
    "apiVersion",
    "clientID",
    "topic",
    "topicPrefix",
    "group",
    "transactionalID",
)

# KIP-714: librdkafka asks on every connection
_TELEMETRY = {ApiKey.GetTelemetrySubscriptions, ApiKey.PushTelemetry}
ROLES: dict[str, frozenset[int]] = {
    # Cilium's produce role (Produce, Metadata, ApiVersions) plus what a modern
    # idempotent or transactional producer sends.
    "produce": frozenset(
        {
            ApiKey.Produce,
            ApiKey.Metadata,
            ApiKey.ApiVersions,
            ApiKey.InitProducerId,
            ApiKey.FindCoordinator,
            ApiKey.AddPartitionsToTxn,
            ApiKey.AddOffsetsToTxn,
            ApiKey.EndTxn,
            ApiKey.TxnOffsetCommit,
            *_TELEMETRY,
        }
    ),
    # Cilium's consume role plus leader-epoch validation and KIP-848 groups.
    "consume": frozenset(
        {
            ApiKey.Fetch,
            ApiKey.ListOffsets,
            ApiKey.Metadata,
            ApiKey.OffsetCommit,
            ApiKey.OffsetFetch,
            ApiKey.FindCoordinator,
            ApiKey.JoinGroup,
            ApiKey.Heartbeat,
            ApiKey.LeaveGroup,
            ApiKey.SyncGroup,
            ApiKey.ApiVersions,
            ApiKey.OffsetForLeaderEpoch,
            ApiKey.ConsumerGroupHeartbeat,
            *_TELEMETRY,
        }
    ),
}

# Kafka's legal topic names (and so group/prefix strings we compare against).
_TOPIC_RE = re.compile(r"[a-zA-Z0-9._-]{1,249}")


@dataclass(frozen=True, slots=True)
class KafkaRule:
    api_keys: frozenset[int] | None  # None: any API
    api_version: int | None
    client_id: str | None
    topic: str | None
    topic_prefix: str | None
    group: str | None
    transactional_id: str | None
    text: str  # describe()

    # -- the pieces --------------------------------------------------------

    def _topic_ok(self, topic: str) -> bool:
        if self.topic is not None:
            return topic == self.topic
        if self.topic_prefix is not None:
            return topic.startswith(self.topic_prefix)
        return True

    def _restricts_resources(self) -> bool:
        return any(
            x is not None
            for x in (self.topic, self.topic_prefix, self.group, self.transactional_id)
        )

    def _head_mismatch(self, request: KafkaRequest) -> str | None:
        """Why everything but the topics fails to match, or None if it matches."""
        if self.api_keys is not None and request.api_key not in self.api_keys:
            return f"api {policy_name(request.api_key)} not in rule"
        if self.api_version is not None and request.api_version != self.api_version:
            return f"apiVersion {request.api_version} != {self.api_version}"
        if self.client_id is not None and request.client_id != self.client_id:
            return f"clientID {request.client_id!r} != {self.client_id!r}"
        if request.undecodable and self._restricts_resources():
            return f"undecodable request ({request.undecodable}) and the rule restricts resources"
        if self.group is not None:
            bad = [g for g in request.groups if g != self.group]
            if bad:
                return f"group {bad[0]!r} != {self.group!r}"
        if self.transactional_id is not None:
            bad = [t for t in request.transactional_ids if t != self.transactional_id]
            if bad:
                return f"transactionalID {bad[0]!r} != {self.transactional_id!r}"
        return None

    # -- CompiledRule -------------------------------------------------------

    def matches(self, request: KafkaRequest) -> bool:
        if self._head_mismatch(request) is not None:
            return False
        return all(self._topic_ok(t) for t in request.topics)

    # Its ``edits`` are always none: a request it allows is never asked for them.
    may_edit: ClassVar[bool] = False

    def edits(self, request: KafkaRequest) -> Edits:
        return ()

    def covers(self, request: KafkaRequest) -> frozenset[str]:
        """The request's topics this rule allows (empty if the rule does not apply)."""
        if self._head_mismatch(request) is not None:
            return frozenset()
        return frozenset(t for t in request.topics if self._topic_ok(t))

    def explain(self, request: KafkaRequest) -> str:
        why = self._head_mismatch(request)
        if why is not None:
            return why
        bad = [t for t in request.topics if not self._topic_ok(t)]
        if bad:
            want = self.topic if self.topic is not None else f"{self.topic_prefix}*"
            return f"topic {bad[0]!r} not allowed (rule allows {want})"
        return "matches"

    def describe(self) -> str:
        return self.text


def allowed(rules: Sequence[KafkaRule], request: KafkaRequest) -> bool:
    """Cilium's MatchesRule: some rule matches whole, or the rules together
    allow every topic of the request (each topic by a rule that applies)."""
    if any(r.matches(request) for r in rules):
        return True
    if not request.topics:
        return False
    needed = set(request.topics)
    for rule in rules:
        needed -= rule.covers(request)
        if not needed:
            return True
    return False


# --------------------------------------------------------------------------
# Compilation (all validation happens here, at policy load).


def _string(node: Any, path: YamlPath, *, topic_like: bool = False) -> str:
    if not isinstance(node, str) or not node:
        raise path.error(f"expected a non-empty string, got {node!r}")
    if topic_like and not _TOPIC_RE.fullmatch(node):
        raise path.error(f"{node!r} is not a legal Kafka name (1-249 of [a-zA-Z0-9._-])")
    return node


def _api_key(node: Any, path: YamlPath) -> int:
    if isinstance(node, bool):
        raise path.error(f"expected an API name or number, got {node!r}")
    if isinstance(node, str) and node.strip().isdigit():
        node = int(node)
    if isinstance(node, int):
        if not 0 <= node <= 32767:
            raise path.error(f"API key {node} out of range")
        return node
    if isinstance(node, str) and node.lower() in API_KEY_BY_POLICY_NAME:
        return API_KEY_BY_POLICY_NAME[node.lower()]
    raise path.error(f"unknown Kafka apiKey {node!r}")


def _api_version(node: Any, path: YamlPath) -> int:
    # Cilium writes apiVersion as a string ("1"); accept both spellings.
    if isinstance(node, str) and node.strip().isdigit():
        node = int(node)
    if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node <= 32767:
        raise path.error(f"apiVersion must be an integer 0..32767, got {node!r}")
    return node


def compile_rule(node: Any, path: YamlPath) -> KafkaRule:
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise path.error(f"expected a mapping, got {type(node).__name__}")
    for key in node:
        if key not in _FIELDS:
            raise path.key(str(key)).error(f"unknown field {key!r} (known: {', '.join(_FIELDS)})")
    if "role" in node and "apiKey" in node:
        raise path.error("role and apiKey are mutually exclusive")
    if "topic" in node and "topicPrefix" in node:
        raise path.error("topic and topicPrefix are mutually exclusive")

    api_keys: frozenset[int] | None = None
    if "role" in node:
        role = node["role"]
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise path.key("role").error(f"role must be produce or consume, got {role!r}")
        api_keys = ROLES[role.lower()]
    elif "apiKey" in node:
        api_keys = frozenset({_api_key(node["apiKey"], path.key("apiKey"))})

    def opt(name: str, *, topic_like: bool = False) -> str | None:
        if name not in node:
            return None
        return _string(node[name], path.key(name), topic_like=topic_like)

    api_version = None
    if "apiVersion" in node:
        api_version = _api_version(node["apiVersion"], path.key("apiVersion"))
    return KafkaRule(
        api_keys=api_keys,
        api_version=api_version,
        client_id=opt("clientID"),
        topic=opt("topic", topic_like=True),
        topic_prefix=opt("topicPrefix", topic_like=True),
        group=opt("group"),
        transactional_id=opt("transactionalID"),
        text=" ".join(f"{k}={node[k]}" for k in _FIELDS if k in node) or "any",
    )


# ``combine``: the policy engine calls it when no single rule matches, to allow a
# request whose topics several rules cover together.
KIND = register(
    L7Kind[KafkaRequest, KafkaRule](
        key="kafka",
        parser="kafka",
        request_types=(KafkaRequest,),
        compile=compile_rule,
        combine=allowed,
    )
)
