"""Typed L7 requests: what an engine hands to ``decide``.

They are the whole vocabulary shared between the parsers and the policy
engine, so rules match typed fields, never strings like ``/query/select/t``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One HTTP/1.x or HTTP/2 request head.

    ``headers`` keeps wire order and duplicates; names are lower-cased.
    ``host`` is the Host header (HTTP/1.1) or ``:authority`` (HTTP/2).
    """

    method: str
    path: str
    host: str
    headers: tuple[tuple[str, str], ...]
    version: str = "1.1"

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]


@dataclass(frozen=True, slots=True)
class GrpcCall:
    """A gRPC call: an HTTP/2 request whose content-type is application/grpc*.

    ``http`` is the underlying request, so ``rules.http`` still applies.
    """

    service: str
    method: str
    http: HttpRequest


@dataclass(frozen=True, slots=True)
class KafkaRequest:
    """One Kafka request, with every resource it names."""

    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    topics: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    transactional_ids: tuple[str, ...] = ()
    # Set when the body could not be decoded: rules that need resources must deny.
    undecodable: str | None = None


@dataclass(frozen=True, slots=True)
class CqlRequest:
    """One CQL statement (a BATCH is judged member by member).

    ``action`` is Cilium's query_action vocabulary (select, insert, update,
    delete, batch, truncate, use, create-table, ...); ``table`` is
    ``keyspace.table`` or ``""`` when the statement names none.
    """

    opcode: str
    action: str
    table: str
    statement: str = ""
    stream: int = 0
    version: int = 4
