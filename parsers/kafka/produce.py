"""What a Produce request asks for, read from its first bytes.

A produce request is a few dozen bytes of header and names, then record
batches: up to megabytes. Everything policy needs (transactional id, acks, the
topic) comes before the first batch when the request names one topic, which
is what clients send (librdkafka and kafka-python send one request per
broker, and in practice per topic when a single topic is being produced). So
the engine can judge such a request from its prefix and pass the batches
through as they arrive, as an L4 proxy would, instead of holding the whole
request until its last byte.

Layout from Kafka's ProduceRequest.json (v0 to v13).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from parsers.varint import TruncatedVarint, decode_uvarint


class NeedMore(Exception):
    """The prefix is not all there yet."""


@dataclass(frozen=True, slots=True)
class ProducePrefix:
    transactional_id: str | None
    acks: int
    topic_count: int
    topic: str | None  # the first topic's name (v0-12)
    topic_id: uuid.UUID | None  # or its id (v13+)


def read_prefix(buf: bytes, pos: int, version: int, flexible: bool) -> ProducePrefix:
    """Parse from ``pos`` (the body start) up to the first topic's name or id.

    Raises ``NeedMore`` if ``buf`` ends first, ``ValueError`` if malformed.
    """

    def need(n: int) -> None:
        if pos + n > len(buf):
            raise NeedMore

    def uvarint() -> int:
        nonlocal pos
        try:
            value, pos = decode_uvarint(buf, pos)
        except TruncatedVarint:
            raise NeedMore from None
        return value

    def string() -> str | None:
        nonlocal pos
        if flexible:
            length = uvarint() - 1
        else:
            need(2)
            (length,) = struct.unpack_from(">h", buf, pos)
            pos += 2
        if length < 0:
            return None
        need(length)
        out = bytes(buf[pos : pos + length]).decode()
        pos += length
        return out

    transactional_id = string() if version >= 3 else None
    need(6)
    acks, _timeout = struct.unpack_from(">hi", buf, pos)
    pos += 6
    if flexible:
        count = uvarint() - 1
    else:
        need(4)
        (count,) = struct.unpack_from(">i", buf, pos)
        pos += 4
    if count < 1:
        return ProducePrefix(transactional_id, acks, max(count, 0), None, None)
    if version >= 13:
        need(16)
        topic_id = uuid.UUID(bytes=bytes(buf[pos : pos + 16]))
        return ProducePrefix(transactional_id, acks, count, None, topic_id)
    return ProducePrefix(transactional_id, acks, count, string(), None)
