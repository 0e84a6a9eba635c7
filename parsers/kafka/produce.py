"""What a Produce request asks for, read from its first bytes.

A produce request is a few dozen bytes of header and names, then record
batches: up to megabytes. Everything policy needs (transactional id, acks, the
topic) comes before the first batch when the request names one topic, which
is what clients send (librdkafka and kafka-python send one request per
broker, and in practice per topic when a single topic is being produced). So
the engine can judge such a request from its prefix and pass the batches
through as they arrive, as an L4 proxy would, instead of holding the whole
request until its last byte. Denied, its batches are dropped as they arrive
(``DroppedPartitions`` keeps only the partition indices, all a denial lists).

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
    end: int = 0  # where the first topic's name or id ends


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
        return ProducePrefix(transactional_id, acks, count, None, topic_id, pos + 16)
    topic = string()
    return ProducePrefix(transactional_id, acks, count, topic, None, pos)


class DroppedPartitions:
    """The rest of a one-topic Produce after its topic name, walked as it arrives and
    dropped: its partitions' record batches are skipped, never held, and only their
    indices are kept (a denial lists them). Fed piece by piece; ``done`` once the
    request's last field is read, ``ValueError`` if it is malformed.
    """

    __slots__ = ("indices", "_flexible", "_stage", "_count", "_tags", "_skip", "_pending")

    def __init__(self, flexible: bool) -> None:
        self.indices: list[int] = []
        self._flexible = flexible
        # What comes next: the partition count, a partition (index and records), or
        # (flexible versions) the tagged fields after a partition, the topic, the
        # request; then "done".
        self._stage = "count"
        self._count = 0  # partitions still to read
        self._tags: int | None = None  # tagged fields still to read in this section
        self._skip = 0  # bytes to drop before the next field (records, a tag's data)
        self._pending = b""  # the start of a field cut between two pieces

    @property
    def done(self) -> bool:
        return self._stage == "done" and not self._skip

    def feed(self, data: bytes) -> int:
        """Walk ``data``; how many of its bytes belong to the request (all of them
        unless it ended inside ``data``)."""
        pos = 0
        while pos < len(data) and not self.done:
            if self._skip:
                n = min(self._skip, len(data) - pos)
                self._skip -= n
                pos += n
                continue
            had = len(self._pending)
            chunk = self._pending + bytes(data[pos : pos + 16])
            try:
                used = self._field(chunk)
            except NeedMore:
                if pos + 16 < len(data):  # sixteen bytes hold any of its fields
                    raise ValueError("a produce request field runs on") from None
                self._pending = chunk
                pos = len(data)
                continue
            self._pending = b""
            pos += used - had
        return pos

    def _field(self, chunk: bytes) -> int:
        """Read the next field from the start of ``chunk``: the bytes it took."""
        pos = 0

        def uvarint() -> int:
            nonlocal pos
            try:
                value, pos = decode_uvarint(chunk, pos)
            except TruncatedVarint:
                raise NeedMore from None
            return value

        def int32() -> int:
            nonlocal pos
            if pos + 4 > len(chunk):
                raise NeedMore
            value: int = struct.unpack_from(">i", chunk, pos)[0]
            pos += 4
            return value

        flexible = self._flexible
        if self._stage == "count":
            self._count = uvarint() - 1 if flexible else int32()
            self._stage = self._next_partition()
        elif self._stage == "partition":
            index = int32()
            size = uvarint() - 1 if flexible else int32()
            self.indices.append(index)
            self._skip = max(size, 0)
            self._count -= 1
            self._stage = "partition tags" if flexible else self._next_partition()
        else:  # a section of tagged fields: their count, then each one's tag and size
            if self._tags is None:
                self._tags = uvarint()
            else:
                uvarint()
                self._skip = uvarint()
                self._tags -= 1
            if not self._tags:
                self._tags = None
                after = {"topic tags": "request tags", "request tags": "done"}
                self._stage = after.get(self._stage) or self._next_partition()
        return pos

    def _next_partition(self) -> str:
        if self._count > 0:
            return "partition"
        return "topic tags" if self._flexible else "done"
