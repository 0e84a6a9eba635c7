"""Kafka engine: size-prefixed frames, every request judged, denials in order.

    engine = KafkaEngine(decide)
    engine.client_data(frame)   # -> [Access(KafkaRequest(...), decision, key=correlation_id),
                                #     ToServer(frame)]
    engine.server_data(reply)   # -> [ToClient(reply),
                                #     Reply(correlation_id, {"error_code": 0, ...})]

Kafka answers strictly in request order on a connection, so the engine keeps
the list of responses the client is owed. A denied request never reaches the
broker; its synthesized error response waits in that list behind responses
the broker still owes for earlier requests, and goes out as soon as they have
passed. Produce with acks=0 owes no response at all.

Bodies are decoded with kafka-python's generated schemas (``kafka_apis``);
what cannot be decoded still gets judged, as a ``KafkaRequest`` with
``undecodable`` set, so an allow-all port passes it and resource rules deny it.
"""

from __future__ import annotations

import struct
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, TypeAlias

from parsers.base import (
    DEFAULT_MAX_HELD_FRAME,
    DEFAULT_MAX_PENDING,
    MAX_HELD_FRAME,
    Access,
    Close,
    Command,
    Data,
    Decide,
    Decision,
    Finished,
    FrameTooLarge,
    Log,
    ParseError,
    ProtocolError,
    Reply,
    ShutdownClient,
    ShutdownServer,
    TimeLimit,
    ToClient,
    ToServer,
    new_access,
    new_reply,
    new_to_client,
    new_to_server,
)
from parsers.kafka import apis as kafka_apis
from parsers.kafka import deny as kafka_deny
from parsers.kafka import fetch as kafka_fetch
from parsers.kafka import produce as kafka_produce
from parsers.kafka.apis import ApiKey, Message
from parsers.kafka.deny import ClusterView
from parsers.kafka.frames import FrameBuffer
from parsers.requests import KafkaRequest
from parsers.varint import decode_uvarint

# Kafka's own default for socket.request.max.bytes.
DEFAULT_MAX_FRAME = 100 * 1024 * 1024
# api key + api version + correlation id + client id length
_MIN_REQUEST_HEADER = 10

# Plain ints: compared on every frame, where an IntEnum comparison costs more.
_PRODUCE, _FETCH, _METADATA = int(ApiKey.Produce), int(ApiKey.Fetch), int(ApiKey.Metadata)
_CONTROLLED_SHUTDOWN, _CREATE_TOPICS = int(ApiKey.ControlledShutdown), int(ApiKey.CreateTopics)
_DESCRIBE_TOPIC_PARTITIONS = int(ApiKey.DescribeTopicPartitions)

# Metadata version of our own topic-id lookups, unless the client used another
# (v10+) on the connection: v10+ carries topic ids, v12 is what Kafka 3.x and
# Tansu serve, and what clients that send ids use.
_LOOKUP_VERSION = 12

# What handling one request frame leads to.
_OK, _FAIL, _HOLD = "ok", "fail", "hold"

# Frames above this size are passed through as they arrive: responses always,
# Produce requests when their prefix names one topic and is allowed.
_STREAM_OVER = 64 * 1024
# How far into a Produce request its topic must appear to be judged early.
_PREFIX_PEEK = 64 * 1024

# A request header: api key, api version, correlation id, client id.
_Header: TypeAlias = tuple[int, int, int, str | None]

_size = struct.Struct(">i")
_fixed_header = struct.Struct(">hhih")


@dataclass(slots=True)
class _Dropped:
    """A large one-topic Produce denied on its first bytes: its record batches are
    dropped as they arrive, and its denial is owed once its last byte has passed."""

    correlation_id: int
    api_version: int
    topic: str
    error_code: int
    walk: kafka_produce.DroppedPartitions | None  # None with acks=0: nothing to answer


@dataclass(slots=True)
class _Owed:
    """One response the client is owed, in order.

    ``denial`` set: the engine answers it; otherwise the broker does.
    """

    correlation_id: int
    api_key: int
    api_version: int
    denial: bytes | None = None
    error_code: int = 0
    # Metadata answered partly by the broker: topics to add with error 29.
    denied_topics: tuple[str, ...] = ()
    # Our own Metadata lookup: consumed here, never forwarded.
    internal: bool = False


class KafkaEngine:
    protocol = "kafka"
    client_speaks_first = True  # the upstream is connected on the first bytes for it

    def __init__(
        self,
        decide: Decide,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_held_frame: int = DEFAULT_MAX_HELD_FRAME,
    ):
        self._decide = decide
        self._max_frame = max_frame
        # The longest request read whole before it is judged: every request but a
        # Produce judged on its first bytes. A longer one closes the connection.
        self._max_held = max_held_frame
        # Responses owed at once: at this many, later frames wait in the buffer
        # until half are delivered (brokers queue 500 requests by default;
        # clients keep 5 in flight).
        self._max_pending = max_pending
        self._client = FrameBuffer()
        self._server = FrameBuffer()
        # A large response being passed through as it arrives (see server_data).
        self._stream: _Owed | None = None
        self._stream_left = 0
        self._stream_parts: list[bytes] = []
        self._owed: deque[_Owed] = deque()
        self._topic_names: dict[uuid.UUID, str] = {}
        self._cluster = ClusterView()
        self._failed = False
        self._held: Data | None = None  # request waiting for a topic-id lookup
        self._lookups = 0
        self._metadata_version = _LOOKUP_VERSION
        # A large Produce judged from its prefix: the bytes of it still to come, passed
        # through (allowed) or dropped (``_dropping``, denied).
        self._upload_left = 0
        self._upload_done: Reply | None = None
        self._dropping: _Dropped | None = None
        self._whole_frame = False  # the frame at the head must be read whole
        self._frames = 0  # request frames read whole or judged on their first bytes
        # Kafka has no half-close: once the client has sent EOF, the connection
        # ends as soon as every response it is owed has been delivered.
        self._client_closed = False
        self._wants_room = False  # whole requests wait for room (``max_pending``)
        # finish(): asked; Finished said (then nothing more is read from the client).
        self._finishing = False
        self._finished = False

    @property
    def reading_headers(self) -> bool:
        # Kafka has no separate head: a partial frame is a partial request, unless
        # it was judged on its first bytes and the rest streams (a body).
        return (
            len(self._client) > 0
            and self._held is None
            and not self._upload_left
            and not self._failed
            and not self._wants_room
        )

    @property
    def reading_body(self) -> bool:
        """The rest of a large Produce judged on its first bytes."""
        return self._upload_left > 0 and not self._failed

    @property
    def held_bytes(self) -> int:
        """Client bytes held: a partial request, requests waiting for room or behind
        a topic-id lookup, and the request held for that lookup."""
        return len(self._client) + (len(self._held) if self._held is not None else 0)

    @property
    def heads_read(self) -> int:
        return self._frames

    def client_timed_out(self, limit: TimeLimit) -> list[Command]:
        """Kafka has no answer for a request that never arrived: close."""
        if self._failed:
            return []
        self._give_up()
        return [Close(limit)]

    def finish(self) -> list[Command]:
        """Kafka cannot tell a client that a connection ends: end it only right
        behind an answer, when nothing is owed and no request is partly read, so
        that the client has nothing outstanding (``Finished(told=False)``). A
        request it sends after that is never read: it fails with the connection and
        was never processed, which Kafka clients retry. Silent until then: the
        driver ends a quiet connection itself."""
        self._finishing = True
        return []

    def _finish_if_between_requests(self, out: list[Command]) -> None:
        if (
            self._finishing
            and not self._finished
            and not self._failed
            and not self._client_closed
            and not self._owed
            and self._stream is None
            and self._held is None
            and not self._upload_left
            and self._upload_done is None
            and not len(self._client)
        ):
            self._finished = True
            out.append(Finished(told=False))

    def _give_up(self) -> None:
        """The connection ends: nothing more is read, and what was held is let go at
        once (the pipe lingers a while before it is dropped)."""
        self._failed = True
        self._client = FrameBuffer()
        self._held = None
        self._dropping = None

    @property
    def topic_names(self) -> dict[uuid.UUID, str]:
        """Topic ids learnt from responses on this connection (read-only view for tests)."""
        return dict(self._topic_names)

    # ------------------------------------------------------------------
    # client -> server

    def client_data(self, data: bytes) -> list[Command]:
        if self._failed:
            return []
        if self._finished:
            # Sent after our last answer: never read. Its EOF ends the connection.
            if data:
                return []
            self._failed = True
            return [Close("client closed")]
        if not data:
            self._client_closed = True
            ended: list[Command] = []
            if not self._wants_room:  # else it goes after the requests held
                ended.append(ShutdownServer())
                self._close_when_done(ended)
            return ended
        self._client.feed(data)
        out: list[Command] = []
        if self._held is None:
            self._drain_client(out)
        self._finish_if_between_requests(out)  # a denial answered at once
        return out

    def _drain_client(self, out: list[Command]) -> None:
        self._wants_room = False
        buf = self._client
        while True:
            if self._upload_left:
                if not len(buf):
                    return
                for piece in buf.take_upto(self._upload_left):
                    self._upload_left -= len(piece)
                    if self._dropping is None:
                        out.append(new_to_server(piece))
                    elif not self._drop(piece, out):
                        return
                if not self._upload_left and self._upload_done is not None:
                    out.append(self._upload_done)  # acks=0: complete once sent
                    self._upload_done = None
                if not self._upload_left and self._dropping is not None:
                    if not self._dropped(out):
                        return
                continue
            head = buf.peek(4)
            if head is None:
                return
            (size,) = _size.unpack(head)
            if size < _MIN_REQUEST_HEADER or size > self._max_frame:
                out.append(ParseError("client", self._bad_size("client", size)))
                self._give_up()
                return
            if len(self._owed) >= self._max_pending:
                self._wants_room = True  # read on when half the answers owed are delivered
                return
            whole = len(buf) >= 4 + size
            held = 4 + size > self._max_held
            if 4 + size > _STREAM_OVER and not self._whole_frame and (held or not whole):
                if self._judge_prefix(size, out):
                    continue
            if held and self._whole_frame:
                # It must be read whole to be judged, and that is more than we hold
                # for one request: whether its bytes came in one read or many.
                out.append(ParseError("client", self._held_too_long(size)))
                self._give_up()
                return
            if not whole:
                return
            self._whole_frame = False
            self._frames += 1
            status = self._request(buf.take(4 + size), out)
            if status is _FAIL:
                self._give_up()
                return
            if status is _HOLD:
                return  # later frames wait until the held one is judged

    def _judge_prefix(self, size: int, out: list[Command]) -> bool:
        """Judge a large, still incomplete Produce from its first bytes.

        True: it was allowed and its bytes now pass through as they arrive.
        False: wait for more bytes, or (``_whole_frame`` set) for the whole
        frame, which then takes the ordinary path (denials need it whole).
        """
        want = min(4 + size, _PREFIX_PEEK)
        head = self._client.peek_upto(want)
        try:
            api_key, api_version, correlation_id, client_len = _fixed_header.unpack_from(head, 4)
            if api_key != _PRODUCE or kafka_apis.request_class(api_key, api_version) is None:
                self._whole_frame = True
                return False
            pos = 14 + max(client_len, 0)
            if pos > len(head):
                raise kafka_produce.NeedMore
            client_id = head[14:pos].decode("utf-8", "replace") if client_len >= 0 else None
            flexible = kafka_apis.is_flexible(api_key, api_version)
            if flexible:
                pos = _skip_tagged_fields(head, pos)
            prefix = kafka_produce.read_prefix(head, pos, api_version, flexible)
        except (kafka_produce.NeedMore, IndexError, ValueError, struct.error):
            if len(head) >= want:  # malformed, or a prefix longer than any sane one
                self._whole_frame = True
            return False
        if prefix.topic_count != 1 or prefix.topic is None:
            self._whole_frame = True  # several topics, or ids: judge the whole request
            return False
        request = KafkaRequest(
            api_key,
            api_version,
            correlation_id,
            client_id,
            topics=(prefix.topic,),
            transactional_ids=(prefix.transactional_id,) if prefix.transactional_id else (),
        )
        decision = self._decide(request)
        out.append(new_access(request, decision, correlation_id))
        self._frames += 1
        if not decision.allowed:
            # Dropped as it arrives, never held: a denial needs only its partitions.
            code = self._blame(request)
            walk = None
            if prefix.acks == 0:  # the client expects no answer
                out.append(Reply(correlation_id, {"api": "Produce", "acks": 0, "error_code": code}))
            else:
                walk = kafka_produce.DroppedPartitions(flexible)
            self._dropping = _Dropped(correlation_id, api_version, prefix.topic, code, walk)
            self._client.take_upto(prefix.end)
            self._upload_left = 4 + size - prefix.end
            return True
        if prefix.acks == 0:
            self._upload_done = Reply(correlation_id, {"api": "Produce", "acks": 0})
        else:
            self._owed.append(_Owed(correlation_id, api_key, api_version))
        self._upload_left = 4 + size
        return True

    def _drop(self, piece: bytes, out: list[Command]) -> bool:
        """Walk a piece of a denied Produce being dropped; False if it is malformed."""
        dropping = self._dropping
        assert dropping is not None
        if dropping.walk is None:
            return True
        try:
            if dropping.walk.feed(piece) == len(piece):
                return True
            why = "ends before its frame does"
        except ValueError as exc:
            why = str(exc)
        return self._drop_failed(why, out)

    def _dropped(self, out: list[Command]) -> bool:
        """A denied Produce has been dropped to its last byte: its denial is owed."""
        dropping, self._dropping = self._dropping, None
        assert dropping is not None
        walk = dropping.walk
        if walk is None:
            return True
        if not walk.done:
            return self._drop_failed("its frame ends before it does", out)
        partitions = [SimpleNamespace(index=i) for i in walk.indices]
        message = SimpleNamespace(
            topic_data=[
                SimpleNamespace(name=dropping.topic, topic_id=None, partition_data=partitions)
            ]
        )
        wire = kafka_deny.denial(
            _PRODUCE,
            dropping.api_version,
            dropping.correlation_id,
            message,
            dropping.error_code,
            self._cluster,
        )
        assert wire is not None, "every Produce version has a denial"
        self._owed.append(
            _Owed(
                dropping.correlation_id,
                _PRODUCE,
                dropping.api_version,
                denial=wire,
                error_code=dropping.error_code,
            )
        )
        self._flush_denials(out)
        return True

    def _drop_failed(self, why: str, out: list[Command]) -> bool:
        error = ProtocolError(f"denied produce request is malformed: {why}", code="bad_produce")
        out.append(ParseError("client", error))
        self._give_up()
        return False

    def _held_too_long(self, size: int) -> ProtocolError:
        return FrameTooLarge(
            f"kafka request of {size} bytes must be read whole to be judged, over the "
            f"{self._max_held} bytes held for one request",
            limit=MAX_HELD_FRAME,
        )

    def _bad_size(self, side: str, size: int) -> ProtocolError:
        if size > self._max_frame:
            return FrameTooLarge(f"kafka {side} frame of {size} bytes exceeds {self._max_frame}")
        return ProtocolError(f"kafka {side} frame size {size} is invalid", code="bad_frame_size")

    def _request(self, frame: Data, out: list[Command], *, may_look_up: bool = True) -> str:
        """Judge one whole request frame: _OK, _FAIL or _HOLD."""
        api_key, api_version, correlation_id, client_len = _fixed_header.unpack_from(frame, 4)
        pos = 14
        client_id = None
        if api_key == _CONTROLLED_SHUTDOWN and api_version == 0:
            pos, client_len = 12, -1  # the one request with header v0: no client id
        if client_len >= 0:
            if pos + client_len > len(frame):
                out.append(
                    ParseError(
                        "client", ProtocolError("kafka request header truncated", code="bad_header")
                    )
                )
                return _FAIL
            client_id = frame[pos : pos + client_len].decode("utf-8", "replace")
            pos += client_len
        if api_key == _METADATA and api_version >= 10 and _metadata_encodable(api_version):
            self._metadata_version = api_version  # the broker serves what the client negotiated
        name = kafka_apis.api_name(api_key)
        message, request, unresolved = self._decode(
            frame, pos, (api_key, api_version, correlation_id, client_id)
        )
        if unresolved and may_look_up:
            self._look_up(frame, out, topics=None, why="topic ids")
            return _HOLD

        decision = self._decide(request)
        if (
            not decision.allowed
            and api_key == _METADATA
            and message is not None
            and len(request.topics) > 1
        ):
            if self._metadata_subset(request, message, decision, frame, out):
                return _OK
        brokers_unknown = not self._cluster.brokers and message is not None
        if not decision.allowed and api_key == _METADATA and may_look_up and brokers_unknown:
            # A Metadata denial lists the brokers (clients drop one that lists
            # none, and wait for metadata until they time out): learn them first.
            self._look_up(frame, out, topics=[], why="the brokers, for a Metadata denial")
            return _HOLD
        out.append(new_access(request, decision, correlation_id))
        acks0 = api_key == _PRODUCE and message is not None and message.acks == 0
        if decision.allowed:
            out.append(new_to_server(frame))
            if acks0:
                out.append(Reply(correlation_id, {"api": name, "acks": 0}))
            else:
                self._owed.append(_Owed(correlation_id, api_key, api_version))
            return _OK

        code = self._blame(request)
        if acks0:
            # The client expects no answer: dropping the request is the whole denial.
            out.append(Reply(correlation_id, {"api": name, "acks": 0, "error_code": code}))
            return _OK
        try:
            wire = kafka_deny.denial(
                api_key, api_version, correlation_id, message, code, self._cluster
            )
        except Exception as exc:  # an encoder bug must not hang the client
            wire, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = "no error response known for this API"
        if wire is None:
            reason = f"cannot encode a denial for {name} v{api_version} ({why}); closing"
            out.append(Log(reason, level="error"))
            out.append(ParseError("client", ProtocolError(reason, code="kafka_denial_unencodable")))
            return _FAIL
        self._owed.append(_Owed(correlation_id, api_key, api_version, denial=wire, error_code=code))
        self._flush_denials(out)
        return _OK

    def _look_up(
        self, frame: Data, out: list[Command], *, topics: list[Any] | None, why: str
    ) -> None:
        """Ask the broker before judging a request, holding it meanwhile.

        Fetch v13+ (and others) name topics by id; the ids come from Metadata
        responses, which a client may have received on another connection
        (``topics=None``: every topic's name and id). A Metadata denial repeats
        the brokers, which this connection may not have seen yet (``topics=[]``:
        the brokers alone). The request is held (with everything after it, to
        keep the order), and a Metadata request of our own goes to the broker;
        its answer is consumed here, never forwarded, and the held request is
        judged with what it said.
        """
        self._lookups += 1
        correlation_id = -self._lookups  # clients count up from 0; ours stay apart
        version = self._metadata_version
        lookup = kafka_apis.REQUESTS[_METADATA][version](
            topics=topics,
            allow_auto_topic_creation=False,
            include_topic_authorized_operations=False,
        )
        lookup.with_header(correlation_id=correlation_id, client_id="l7proxy")
        out.append(Log(f"looking up {why} with a Metadata v{version} request of our own"))
        out.append(ToServer(bytes(lookup.encode(header=True, framed=True))))
        self._owed.append(_Owed(correlation_id, _METADATA, version, internal=True))
        self._held = frame

    def _resume(self, out: list[Command]) -> None:
        frame, self._held = self._held, None
        assert frame is not None, "resumed with no request held"
        status = self._request(frame, out, may_look_up=False)
        if status is _FAIL:
            self._give_up()
            return
        self._drain_client(out)

    def _metadata_subset(
        self,
        request: KafkaRequest,
        message: Message,
        decision: Decision,
        frame: Data,
        out: list[Command],
    ) -> bool:
        """Forward a Metadata request for its allowed topics only.

        Clients ask for the metadata of every topic they use in one request, so
        refusing it whole would lock a client out of its allowed topics once it
        touched a denied one. A broker with ACLs answers per topic; so do we:
        the broker is asked for the allowed topics and the denied ones are added
        to its answer with TOPIC_AUTHORIZATION_FAILED.
        """
        if any(t.name is None for t in message.topics):
            return False  # topics named by id only: answer the request as a whole
        allowed = [t for t in request.topics if self._decide(replace(request, topics=(t,))).allowed]
        if not allowed:
            return False
        subset = replace(request, topics=tuple(allowed))
        verdict = self._decide(subset)
        if not verdict.allowed:
            return False
        denied = tuple(t for t in request.topics if t not in allowed)
        message.topics = [t for t in message.topics if t.name in allowed]
        message.with_header(correlation_id=request.correlation_id, client_id=request.client_id)
        wire = bytes(message.encode(version=request.api_version, header=True, framed=True))
        reason = f"{verdict.reason}; topics {', '.join(denied)} answered TOPIC_AUTHORIZATION_FAILED"
        out.append(Access(request, replace(verdict, reason=reason), key=request.correlation_id))
        out.append(ToServer(wire))
        owed = _Owed(
            request.correlation_id, request.api_key, request.api_version, denied_topics=denied
        )
        self._owed.append(owed)
        return True

    def _decode(
        self, frame: Data, pos: int, head: _Header
    ) -> tuple[Message | None, KafkaRequest, Sequence[uuid.UUID]]:
        """The decoded body (None if it could not be), the request to judge, and
        the topic ids it names that this connection has not seen named yet."""
        api_key, api_version = head[0], head[1]
        extra = kafka_apis.EXTRA_APIS.get(api_key)
        if extra is not None:
            return self._decode_extra(extra, frame, pos, head)
        cls = kafka_apis.request_class(api_key, api_version)
        if cls is None:
            why = f"unknown API {kafka_apis.api_name(api_key)} v{api_version}"
            return None, KafkaRequest(*head, undecodable=why), ()
        try:
            if cls.flexible_version_q(api_version):
                pos = _skip_tagged_fields(frame, pos)
            message = cls.decode(memoryview(frame)[pos:], version=api_version)
            found = kafka_apis.extract(message, api_version)
        except Exception as exc:  # kafka-python raises a mix of ValueError/struct.error/IndexError
            why = f"undecodable {cls.name} v{api_version} body: {type(exc).__name__}: {exc}"
            return None, KafkaRequest(*head, undecodable=why), ()
        topics = found.topics
        undecodable = None
        unresolved: list[uuid.UUID] = []
        for topic_id in found.topic_ids:
            topic = self._topic_names.get(topic_id)
            if topic is None:
                unresolved.append(topic_id)
                undecodable = (
                    f"topic id {topic_id} not seen in a Metadata response on this connection"
                )
            elif topic not in topics:
                topics.append(topic)
        request = KafkaRequest(
            *head,
            topics=tuple(dict.fromkeys(topics)),
            groups=tuple(dict.fromkeys(found.groups)),
            transactional_ids=tuple(dict.fromkeys(found.transactional_ids)),
            undecodable=undecodable,
        )
        return message, request, unresolved

    def _decode_extra(
        self, extra: kafka_apis.ExtraApi, frame: Data, pos: int, head: _Header
    ) -> tuple[list[str] | None, KafkaRequest, Sequence[uuid.UUID]]:
        try:
            pos = _skip_tagged_fields(frame, pos)
            if head[1] > extra.max_version:
                raise ValueError(f"version above {extra.max_version}")
            groups: list[str] = []
            if extra.first_field == "group":
                group, pos = _compact_string(frame, pos)
                groups.append(group)
            elif extra.first_field == "groups":
                count, pos = decode_uvarint(frame, pos)
                for _ in range(count - 1):
                    group, pos = _compact_string(frame, pos)
                    groups.append(group)
        except (ValueError, IndexError, struct.error) as exc:
            why = f"undecodable {extra.name} v{head[1]} body: {exc}"
            return None, KafkaRequest(*head, undecodable=why), ()
        return groups, KafkaRequest(*head, groups=tuple(groups)), ()

    def _blame(self, request: KafkaRequest) -> int:
        """Which authorization error fits: ask ``decide`` which resource it refused.

        Only requests that name resources of several kinds need the probe
        (OffsetCommit names a group and topics; TxnOffsetCommit all three).
        """
        kinds = [bool(request.topics), bool(request.groups), bool(request.transactional_ids)]
        if sum(kinds) > 1:
            if (
                request.transactional_ids
                and not self._decide(replace(request, topics=(), groups=())).allowed
            ):
                return kafka_deny.TRANSACTIONAL_ID_AUTHORIZATION_FAILED
            if (
                request.groups
                and not self._decide(replace(request, topics=(), transactional_ids=())).allowed
            ):
                return kafka_deny.GROUP_AUTHORIZATION_FAILED
            if request.topics:
                return kafka_deny.TOPIC_AUTHORIZATION_FAILED
        if request.topics or request.api_key == _METADATA:
            return kafka_deny.TOPIC_AUTHORIZATION_FAILED
        if request.groups:
            return kafka_deny.GROUP_AUTHORIZATION_FAILED
        if request.transactional_ids:
            return kafka_deny.TRANSACTIONAL_ID_AUTHORIZATION_FAILED
        return kafka_deny.CLUSTER_AUTHORIZATION_FAILED

    def _flush_denials(self, out: list[Command]) -> None:
        if self._stream is not None:
            return  # a response is half through: denials wait for its last byte
        owed = self._owed
        while owed:
            denial = owed[0].denial
            if denial is None:
                break
            entry = owed.popleft()
            out.append(ToClient(denial))
            fields = {"error_code": entry.error_code, "api": kafka_apis.api_name(entry.api_key)}
            out.append(Reply(entry.correlation_id, fields))

    # ------------------------------------------------------------------
    # server -> client

    def server_data(self, data: bytes) -> list[Command]:
        if self._failed or self._finished:
            return []  # finished: nothing is owed, and the driver ends the connection
        if not data:
            out: list[Command] = []
            if self._owed or self._stream is not None:
                out.append(Log("broker closed with response(s) still owed", level="info"))
            # A broker's EOF ends the connection: nothing sent after it would be read.
            out += [ShutdownClient(), Close("broker closed")]
            return out
        buf = self._server
        buf.feed(data)
        out = []
        while True:
            if self._stream is not None:
                if not len(buf) or not self._pass_through(self._stream, out):
                    break
                continue
            head = buf.peek(4)
            if head is None:
                break
            (size,) = _size.unpack(head)
            if size < 4 or size > self._max_frame:
                out.append(ParseError("server", self._bad_size("server", size)))
                self._give_up()
                break
            head = buf.peek(8)
            if head is None:
                break
            owed = self._expected(_size.unpack_from(head, 4)[0], out)
            if owed is None:
                self._give_up()
                break
            if size + 4 > _STREAM_OVER and not owed.internal and not owed.denied_topics:
                # Large responses (fetches) go through as they arrive rather
                # than after the last byte: store-and-forward would add a whole
                # frame's transfer time to every fetch.
                self._owed.popleft()
                self._stream, self._stream_left = owed, size + 4
                continue
            if len(buf) < size + 4:
                break
            self._owed.popleft()
            self._response(owed, buf.take(size + 4), out)
            if self._failed:
                break
        if self._wants_room and len(self._owed) <= self._max_pending // 2 and not self._failed:
            self._drain_client(out)  # requests held for want of room
            if self._client_closed and not self._wants_room:
                out.append(ShutdownServer())  # the EOF that came behind them
        self._close_when_done(out)
        self._finish_if_between_requests(out)
        return out

    def _close_when_done(self, out: list[Command]) -> None:
        if self._client_closed and not self._owed and self._stream is None and not self._failed:
            out.append(Close("client closed; every response delivered"))

    def _pass_through(self, owed: _Owed, out: list[Command]) -> bool:
        """Forward what has arrived of the streamed response; True when it is complete."""
        pieces = self._server.take_upto(self._stream_left)
        for piece in pieces:
            out.append(new_to_client(piece))
            self._stream_left -= len(piece)
        self._stream_parts += pieces
        if self._stream_left:
            return False
        self._stream = None
        parts, self._stream_parts = self._stream_parts, []
        out.append(new_reply(owed.correlation_id, self._streamed_fields(owed, parts)))
        self._flush_denials(out)
        return True

    def _streamed_fields(self, owed: _Owed, parts: list[bytes]) -> dict[str, Any]:
        if owed.api_key == _FETCH:
            try:
                code = kafka_fetch.first_error(parts, owed.api_version)
            except (ValueError, IndexError, struct.error) as exc:
                return {"api": "Fetch", "decode_error": f"{type(exc).__name__}: {exc}"}
            if code is not None:
                return {"api": "Fetch", "error_code": code}
        return self._response_fields(owed, b"".join(parts))

    def _expected(self, correlation_id: int, out: list[Command]) -> _Owed | None:
        """The response the broker owes next, if ``correlation_id`` is it."""
        if not self._owed:
            error = ProtocolError(
                f"broker sent response {correlation_id} nobody asked for", code="unsolicited"
            )
            out.append(ParseError("server", error))
            return None
        owed = self._owed[0]
        if owed.correlation_id != correlation_id:
            error = ProtocolError(
                f"broker answered correlation id {correlation_id}, expected {owed.correlation_id}",
                code="correlation_mismatch",
            )
            out.append(ParseError("server", error))
            return None
        return owed

    def _response(self, owed: _Owed, frame: Data, out: list[Command]) -> None:
        fields = self._response_fields(owed, frame)
        if owed.internal:
            if "decode_error" in fields:
                out.append(
                    Log(f"Metadata lookup failed: {fields['decode_error']}", level="warning")
                )
            self._flush_denials(out)
            if self._held is not None:
                self._resume(out)
            return
        if owed.denied_topics:
            try:
                frame = self._add_denied_topics(owed, frame, fields)
            except Exception as exc:  # the broker's answer still goes out, unmerged
                out.append(
                    Log(f"could not add denied topics to Metadata reply: {exc}", level="warning")
                )
        out.append(new_to_client(frame))
        out.append(new_reply(owed.correlation_id, fields))
        self._flush_denials(out)

    def _add_denied_topics(self, owed: _Owed, frame: Data, fields: dict[str, Any]) -> bytes:
        versions = kafka_apis.response_class(owed.api_key, owed.api_version)
        if versions is None:
            raise ValueError(f"no response class for {kafka_apis.api_name(owed.api_key)}")
        cls = versions[owed.api_version]
        response = cls.decode(frame, header=True, framed=True)
        topic = cls.MetadataResponseTopic
        for name in owed.denied_topics:
            response.topics.append(
                topic(
                    error_code=kafka_deny.TOPIC_AUTHORIZATION_FAILED,
                    name=name,
                    topic_id=kafka_deny.ZERO_UUID,
                    is_internal=False,
                    partitions=[],
                )
            )
        fields["error_code"] = kafka_deny.TOPIC_AUTHORIZATION_FAILED
        fields["denied_topics"] = list(owed.denied_topics)
        response.with_header(correlation_id=owed.correlation_id)
        return bytes(response.encode(header=True, framed=True))

    def _response_fields(self, owed: _Owed, frame: Data) -> dict[str, Any]:
        fields: dict[str, Any] = {"api": kafka_apis.api_name(owed.api_key)}
        cls = kafka_apis.response_class(owed.api_key, owed.api_version)
        if cls is None:
            return fields
        try:
            pos = 8
            if kafka_apis.response_header_flexible(owed.api_key, owed.api_version):
                pos = _skip_tagged_fields(frame, pos)
            response = cls.decode(memoryview(frame)[pos:], version=owed.api_version)
            fields["error_code"] = _first_error(response)
            if owed.api_key in (_METADATA, _CREATE_TOPICS, _DESCRIBE_TOPIC_PARTITIONS):
                self._learn(owed.api_key, response)
        except Exception as exc:  # reported, never fatal: the bytes go through unchanged
            fields["decode_error"] = f"{type(exc).__name__}: {exc}"
        return fields

    def _learn(self, api_key: int, response: Message) -> None:
        for topic in getattr(response, "topics", None) or ():
            topic_id = getattr(topic, "topic_id", None)
            if topic.name and topic_id is not None and topic_id.int != 0:
                self._topic_names[topic_id] = topic.name
        if api_key == _METADATA:
            self._cluster = ClusterView(
                brokers=[(b.node_id, b.host, b.port, b.rack) for b in response.brokers],
                cluster_id=response.cluster_id,
                controller_id=response.controller_id,
            )


def _metadata_encodable(version: int) -> bool:
    """A Metadata version kafka-python can encode (for our own lookups)."""
    highest: int = kafka_apis.REQUESTS[_METADATA].max_version
    return version <= highest


# --------------------------------------------------------------------------
# Small wire helpers (the header is read by hand: it is tiny and hot).


def _skip_tagged_fields(buf: Data, pos: int) -> int:
    count, pos = decode_uvarint(buf, pos)
    for _ in range(count):
        _tag, pos = decode_uvarint(buf, pos)
        size, pos = decode_uvarint(buf, pos)
        pos += size
    if pos > len(buf):
        raise ValueError("tagged fields run past the frame")
    return pos


def _compact_string(buf: Data, pos: int) -> tuple[str, int]:
    length, pos = decode_uvarint(buf, pos)
    if length == 0:
        raise ValueError("null string")
    end = pos + length - 1
    if end > len(buf):
        raise ValueError("string runs past the frame")
    return bytes(buf[pos:end]).decode(), end


_ERROR_FIELDS = ("error_code", "partition_error_code")


def _first_error(message: Message) -> int:
    """The top-level error code if set, else the first non-zero nested one."""
    top: int = getattr(message, "error_code", 0) or 0
    if top:
        return top
    stack = [message]
    while stack:
        obj = stack.pop()
        for name, f in obj.fields.items():
            if not f.for_version_q(obj.version if obj.version is not None else 0):
                continue
            if name in _ERROR_FIELDS:
                code: int = getattr(obj, name, 0)
                if code:
                    return code
            elif f.is_struct_array():
                stack.extend(reversed(getattr(obj, name, None) or ()))
            elif f.is_struct():
                child = getattr(obj, name, None)
                if child is not None:
                    stack.append(child)
    return 0
