"""The ``cassandra`` parser family: CQL native protocol v3, v4 and v5.

One ``CqlEngine`` per proxied connection, sans-I/O (see ``parsers/base.py``).

    client bytes -> envelopes (v3/v4 frames, or v5 segments once STARTUP is done)
                 -> QUERY / PREPARE / EXECUTE / BATCH judged statement by statement
                 -> forwarded as received, or answered with ERROR 0x2100 Unauthorized
    server bytes -> forwarded whole frames/segments as received; READY switches
                    framing and compression, RESULT teaches prepared ids and the
                    keyspace, every response completes the request on its stream

Bytes are forwarded exactly as received; only a v5 segment that mixes allowed
and denied envelopes is rebuilt (the allowed ones, re-framed). Denials and
other synthesized answers are written to the client only between whole
server frames/segments, so they never split a forwarded one.

A large request (over 64 KiB) is judged on its first bytes where the protocol
allows: a QUERY once its query string is in (v5: and its keyspace, unless the
statement does not need one), an EXECUTE once its prepared id is, a PREPARE once
its text is. The rest of it then passes to the server as it arrives, or, denied,
is dropped as it arrives and answered once its last byte is in: it is never held.
A BATCH (its statements lie between their values) and a compressed v4 body are
judged whole, so they are held, up to ``max_held_frame`` (16 MiB, Cassandra's
``native_transport_max_frame_size``); a longer one, or a QUERY whose text alone is
longer, is answered ProtocolError on its stream and the connection closed. A
frame held whole is kept in one buffer, judged where it lies and handed to the
server as it is: about its own size in memory, not three copies.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Hashable
from typing import Any

from parsers.base import (
    DEFAULT_MAX_HELD_FRAME,
    DEFAULT_MAX_PENDING,
    MAX_HELD_FRAME,
    Access,
    Close,
    Command,
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
from parsers.cql import wire as w
from parsers.cql.lexer import Statement, classify
from parsers.cql.wire import CqlError
from parsers.requests import CqlRequest

_USE_ALLOWED = Decision(True, reason="USE only selects the keyspace; never judged (as in Cilium)")
_UNPREPARED = Decision(
    False,
    reason="unknown prepared id: answered Unprepared so the client re-prepares through the proxy",
)


# A request longer than this is judged on its first bytes where it can be, and its
# rest streamed (or dropped) as it arrives; a shorter one is simply read whole.
_STREAM_OVER = 64 * 1024
# Requests that cannot be judged before their last byte: a BATCH names its
# statements between their values (and, from v5, its keyspace after them all).
_WHOLE_ONLY = frozenset({w.BATCH})


@dataclasses.dataclass(slots=True)
class _Prepared:
    statement: str
    statements: tuple[Statement, ...]


@dataclasses.dataclass(slots=True)
class _Rest:
    """The rest of a large request judged on its first bytes: passed to the server
    as it arrives (``answer`` None), or dropped and then answered with ``answer``."""

    left: int  # bytes still to come (v5: bytes of the envelope, in its segments' payloads)
    answer: bytes | None = None


@dataclasses.dataclass(slots=True)
class _Envelope:
    """A v5 envelope cut over several segments, held until it is judged."""

    payload: bytearray = dataclasses.field(default_factory=bytearray)
    raws: list[bytes] = dataclasses.field(default_factory=list)  # its segments as received
    raw_len: int = 0


class CqlEngine:
    """Policy enforcement for one CQL connection."""

    protocol = "cassandra"
    client_speaks_first = True  # the upstream is connected on the first bytes for it

    def __init__(
        self,
        decide: Decide,
        *,
        max_frame: int = w.SPEC_MAX_FRAME,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_held_frame: int = DEFAULT_MAX_HELD_FRAME,
    ):
        self._decide = decide
        self._max_frame = max_frame
        # The longest request held whole (or held until judged); longer ones must be
        # judged on their first ``max_held_frame`` bytes, else they are refused.
        self._max_held = max_held_frame
        self._stream_over = min(_STREAM_OVER, max_held_frame)
        # Requests forwarded and not yet answered: at this many, later frames wait
        # in the buffer until half are answered.
        self._max_pending = max_pending
        self._wants_room = False
        self._cbuf = bytearray()
        self._sbuf = bytearray()
        self._version: int | None = None
        self._keyspace = ""
        # (compress, decompress) for v3/v4 bodies
        self._frame_codec: w.FrameCodec | None = None
        self._segments = False  # v5 framing on, both directions
        self._segment_lz4 = False
        self._startups: dict[int, tuple[int, str]] = {}  # stream -> (version, compression)
        self._preparing: dict[int, _Prepared] = {}  # stream of a PREPARE in flight
        self._prepared: dict[bytes, _Prepared] = {}  # prepared id -> statement
        self._inflight: dict[int, list[Hashable]] = {}  # stream -> Access keys awaiting a Reply
        # a v5 envelope cut over several segments, per direction (the client's until judged)
        self._client_big: _Envelope | None = None
        self._server_big: tuple[bytearray, list[bytes]] | None = None
        # The rest of a large request judged on its first bytes, still arriving.
        self._rest: _Rest | None = None
        # Bytes of the large request at the head of the buffer needed before it is
        # worth judging again (its first attempt said how far it must read).
        self._need = 0
        # answers for the client held back while a multi-segment server
        # envelope is being forwarded (a segment must not land inside it)
        self._held: list[Command] = []
        self._frames = 0  # request frames (v5: envelopes' segments) read whole
        self._dead = False
        # CQL has no half-close: once the client has sent EOF, the connection ends
        # as soon as every response it is waiting for has been delivered.
        self._client_closed = False
        # finish(): asked; Finished said (then nothing more is read from the client).
        self._finishing = False
        self._finished = False

    # ------------------------------------------------------------------
    # Engine contract

    @property
    def reading_headers(self) -> bool:
        """A frame (v5: a segment, or an envelope cut over several) is partly
        received and not judged yet: the head runs to its last byte, or, for a large
        request judged on its first bytes, to the bytes its judgement needs."""
        return (
            not self._dead
            and not self._wants_room
            and self._rest is None
            and (bool(self._cbuf) or self._client_big is not None)
        )

    @property
    def reading_body(self) -> bool:
        """The rest of a large request judged on its first bytes is still arriving."""
        return self._rest is not None and not self._dead

    @property
    def held_bytes(self) -> int:
        """Client bytes held: a partial frame (or a large one's head, until it is
        judged), frames waiting for room, a v5 envelope's segments until judged."""
        held = len(self._cbuf)
        big = self._client_big
        if big is not None:
            held += len(big.payload) + big.raw_len
        return held

    @property
    def heads_read(self) -> int:
        return self._frames

    def client_timed_out(self, limit: TimeLimit) -> list[Command]:
        """CQL has no answer for a request that never arrived: close."""
        if self._dead:
            return []
        self._dead = True
        self._drop_client_input()
        return [Close(limit)]

    def finish(self) -> list[Command]:
        """CQL cannot tell a client that a connection ends (a server going down just
        closes): end it only right behind an answer, when no request is waiting for
        its response and none is partly read (``Finished(told=False)``). A request
        sent after that is never read: it fails with the connection and was never
        executed, which drivers retry (on another connection of their pool for an
        idempotent statement). Silent until then: the driver ends a quiet
        connection itself."""
        self._finishing = True
        return []

    def _finish_if_between_requests(self, out: list[Command]) -> None:
        if (
            self._finishing
            and not self._finished
            and not self._dead
            and not self._client_closed
            and not self._wants_room
            and not (self._inflight or self._startups or self._preparing or self._held)
            and self._server_big is None
            and self._client_big is None
            and self._rest is None
            and not self._cbuf
        ):
            self._finished = True
            out.append(Finished(told=False))

    def _drop_client_input(self) -> None:
        # New buffers rather than clear(): a memoryview of the old one may live on
        # in an error's traceback, and a buffer with views cannot be resized.
        self._cbuf = bytearray()
        self._client_big = None
        self._rest = None
        self._need = 0

    @property
    def keyspace(self) -> str:
        return self._keyspace

    def client_data(self, data: bytes) -> list[Command]:
        if self._dead:
            return []
        if self._finished:
            # Sent after our last answer: never read. Its EOF ends the connection.
            if data:
                return []
            self._dead = True
            return [Close("client closed")]
        if not data:
            out: list[Command] = []
            self._client_closed = True
            if self._wants_room:
                return out  # the EOF goes after the requests held
            if self._cbuf or self._rest is not None or self._client_big is not None:
                due = f", {self._rest.left} more due" if self._rest is not None else ""
                dropped = f"{self.held_bytes} bytes dropped{due}"
                out.append(Log(f"client EOF inside a frame ({dropped})", "info"))
                self._drop_client_input()
            out.append(ShutdownServer())
            self._close_when_done(out)
            return out
        out = []
        if self._rest is not None and not self._segments:
            data = self._pass_rest(data, out)
            if not data:
                out = self._client_output(out)
                self._finish_if_between_requests(out)  # its denial, after its last byte
                return out
        self._cbuf += data
        out = self._client_input(out)
        self._finish_if_between_requests(out)  # a denial answered at once
        return out

    def _pass_rest(self, data: bytes, out: list[Command]) -> bytes:
        """The next bytes of a large v3/v4 request judged on its first bytes: passed
        on or dropped as they come, without a copy. What follows it is returned."""
        rest = self._rest
        assert rest is not None
        n = min(len(data), rest.left)
        rest.left -= n
        if rest.answer is None:
            out.append(ToServer(data if n == len(data) else data[:n]))
        if rest.left:
            return b""
        self._rest = None
        if rest.answer is not None:
            out.append(ToClient(self._wire(rest.answer)))
        return data[n:]

    def _client_input(self, out: list[Command] | None = None) -> list[Command]:
        out = [] if out is None else out
        self._wants_room = False
        try:
            if self._segments:
                self._client_segments(out)
            else:
                self._client_frames(out)
        except (CqlError, FrameTooLarge) as e:
            self._fail("client", e, out)
        return self._client_output(out)

    def _client_output(self, out: list[Command]) -> list[Command]:
        if self._server_big is not None and any(isinstance(c, ToClient) for c in out):
            self._held += [c for c in out if isinstance(c, ToClient)]
            out = [c for c in out if not isinstance(c, ToClient)]
        return out

    def server_data(self, data: bytes) -> list[Command]:
        if self._dead or self._finished:
            return []  # finished: nothing is owed, and the driver ends the connection
        if not data:
            out: list[Command] = []
            if self._sbuf:
                out.append(
                    Log(f"server EOF inside a frame ({len(self._sbuf)} bytes dropped)", "info")
                )
            # The server's EOF ends the connection: nothing sent after it would be read.
            return out + [ShutdownClient(), Close("server closed")]
        self._sbuf += data
        out = []
        try:
            self._server_input(out)
        except (CqlError, FrameTooLarge) as e:
            self._fail("server", e, out)
        if self._held and self._server_big is None:
            out += self._held
            self._held = []
        if self._wants_room and len(self._inflight) <= self._max_pending // 2 and not self._dead:
            out += self._client_input()  # requests held for want of room
            if self._client_closed and not self._wants_room:
                out.append(ShutdownServer())  # the EOF that came behind them
        self._close_when_done(out)
        self._finish_if_between_requests(out)
        return out

    def _close_when_done(self, out: list[Command]) -> None:
        waiting = self._inflight or self._startups or self._preparing or self._held
        if self._client_closed and not waiting and self._server_big is None and not self._dead:
            out.append(Close("client closed; every response delivered"))

    def _fail(self, side: str, error: ProtocolError, out: list[Command]) -> None:
        # Framing is lost: nothing after this point can be trusted or forwarded.
        stream = getattr(error, "stream", None)
        if side == "client" and stream is not None and not error.wire_reply:
            error.wire_reply = self._error_reply(
                self._version or 4, stream, w.ERR_PROTOCOL, str(error)
            )
        if error.wire_reply:
            out.append(ToClient(error.wire_reply))
        out.append(ParseError(side, error, close=True))
        self._dead = True
        self._drop_client_input()
        self._sbuf = bytearray()

    # ------------------------------------------------------------------
    # Client -> server

    def _client_frames(self, out: list[Command]) -> None:
        buf = self._cbuf
        pos = fwd = 0
        try:
            while len(buf) - pos >= w.HEADER_LEN:
                if len(self._inflight) >= self._max_pending:
                    self._wants_room = True
                    break
                vbyte, flags, stream, opcode, length = w.parse_header(buf, pos)
                version = vbyte & 0x7F
                if version < 3:
                    # v1/v2 headers are 8 bytes: we cannot even frame them.
                    raise CqlError(
                        f"Invalid or unsupported protocol version ({version}); supported versions "
                        "are (3/v3, 4/v4, 5/v5)",
                        stream=stream,
                    )
                self._check_length(length, stream)
                size = w.HEADER_LEN + length
                end = pos + size
                if size > self._stream_over:
                    # A large frame: the frames before it go first, then it is judged
                    # at the start of the buffer (on its first bytes where it can be).
                    if fwd < pos:
                        out.append(ToServer(bytes(buf[fwd:pos])))
                    del buf[:pos]
                    pos = fwd = 0
                    if not self._large_frame(size, out):
                        break  # held until its head (or all of it) is in
                    buf = self._cbuf
                    continue
                if len(buf) < end:
                    break
                self._frames += 1
                env = w.Envelope(
                    version, flags, stream, opcode, bytes(buf[pos + w.HEADER_LEN : end])
                )
                answer = self._request(env, vbyte, out)
                if answer is not None:
                    if fwd < pos:
                        out.append(ToServer(bytes(buf[fwd:pos])))
                    out.append(ToClient(self._wire(answer)))
                    fwd = end
                pos = end
        finally:
            # frames judged before an error still go out
            if fwd < pos:
                out.append(new_to_server(bytes(buf[fwd:pos])))
            del buf[:pos]

    def _large_frame(self, size: int, out: list[Command]) -> bool:
        """The large v3/v4 frame at the start of the buffer, ``size`` bytes: judge it
        if its head is in. False: it waits (held) for more bytes.

        Judged, it leaves the buffer without a copy: forwarded, the buffer itself
        goes to the server and the rest follows as it arrives; denied, it is dropped
        and so is the rest, and the answer goes out after its last byte.
        """
        buf = self._cbuf
        if len(buf) > size:  # all of it is here, and bytes after it: split them off
            head = buf
            self._cbuf = head[size:]
            del head[size:]
        else:
            head = buf
        rest = self._judge_head(head, out)
        if rest is None:
            return False
        if head is buf and self._cbuf is buf:
            self._cbuf = bytearray()
        if rest.answer is None:
            out.append(ToServer(head))
        if rest.left:
            self._rest = rest
        elif rest.answer is not None:
            out.append(ToClient(self._wire(rest.answer)))
        return True

    def _judge_head(self, head: bytearray, out: list[Command]) -> _Rest | None:
        """Judge a large request envelope from ``head``: its header and as much of it
        as has arrived (all of it, if it is whole). Returns what remains of it, or
        None if more must arrive first.

        Its judgement may read at most ``max_held_frame`` bytes: a frame that needs
        more held at once (a BATCH or compressed body longer than that, a query string
        longer than that) is refused with ``CqlFrameTooLarge``, whether its bytes came
        in one read or in many.
        """
        vbyte, flags, stream, opcode, length = w.parse_header(head)
        size = w.HEADER_LEN + length
        limit = min(size, self._max_held)
        if opcode in _WHOLE_ONLY or (flags & w.FLAG_COMPRESSED and vbyte & 0x7F < 5):
            self._need = size  # judged whole
        have = min(len(head), limit)
        if have >= self._need or have == size:
            view = memoryview(head)
            env = w.Envelope(vbyte & 0x7F, flags, stream, opcode, view[w.HEADER_LEN : have])
            try:
                answer = self._request(env, vbyte, out, partial=have < size)
            except w.Truncated as e:
                self._need = w.HEADER_LEN + e.needed
            else:
                self._need = 0
                self._frames += 1
                return _Rest(size - len(head), answer)
            finally:
                del env, view  # no view of ``head`` outlives this: it may grow
        if size > self._max_held and self._need > self._max_held:
            raise w.CqlFrameTooLarge(
                f"{w.OPCODE_NAMES.get(opcode, hex(opcode))} of {size} bytes cannot be judged "
                f"before its first {self._max_held} bytes: the most held for one request",
                stream=stream,
                limit=MAX_HELD_FRAME,
            )
        return None

    def _client_segments(self, out: list[Command]) -> None:
        buf = self._cbuf
        pos = fwd = 0
        try:
            while True:
                if (
                    len(self._inflight) >= self._max_pending
                    and self._client_big is None
                    and self._rest is None
                ):
                    self._wants_room = True
                    break
                seg = w.read_segment(buf, pos, self._segment_lz4)
                if seg is None:
                    break
                end = pos + seg.raw_len
                if seg.self_contained:
                    self._frames += 1
                    if self._client_big is not None or self._rest is not None:
                        raise CqlError("self-contained segment inside a multi-segment envelope")
                    kept, answers = self._requests_in(seg.payload, out)
                    if answers:
                        if fwd < pos:
                            out.append(ToServer(bytes(buf[fwd:pos])))
                        if kept:
                            out.append(
                                ToServer(w.encode_segments(b"".join(kept), self._segment_lz4))
                            )
                        out.append(
                            ToClient(w.encode_segments(b"".join(answers), self._segment_lz4))
                        )
                        fwd = end
                elif self._rest is not None:
                    # The rest of a large envelope judged on its first segments.
                    if not self._rest_segment(len(seg.payload), out):
                        if fwd < pos:
                            out.append(ToServer(bytes(buf[fwd:pos])))
                        fwd = end  # dropped
                else:
                    # Part of one large envelope: held until it can be judged.
                    if fwd < pos:
                        out.append(ToServer(bytes(buf[fwd:pos])))
                    fwd = end
                    self._envelope_segment(seg, bytes(buf[pos:end]), out)
                pos = end
        finally:
            if fwd < pos:
                out.append(ToServer(bytes(buf[fwd:pos])))
            del buf[:pos]

    def _rest_segment(self, payload_len: int, out: list[Command]) -> bool:
        """Count a segment of a large envelope judged on its first segments: True
        if it passes to the server, False if it is dropped (the envelope was denied)."""
        rest = self._rest
        assert rest is not None
        if payload_len > rest.left:
            raise CqlError("multi-segment payload longer than its envelope")
        rest.left -= payload_len
        if not rest.left:
            self._rest = None
            if rest.answer is not None:
                out.append(ToClient(self._wire(rest.answer)))
        return rest.answer is None

    def _envelope_segment(self, seg: w.Segment, raw: bytes, out: list[Command]) -> None:
        """One more segment of a large envelope not judged yet: judge it whole, or on
        its first segments once they hold what its judgement reads."""
        big = self._client_big
        if big is None:
            big = self._client_big = _Envelope()
        big.payload += seg.payload
        big.raws.append(raw)
        big.raw_len += len(raw)
        payload = big.payload
        if len(payload) < w.HEADER_LEN:
            return
        whole = self._whole_envelope(payload)
        rest = self._judge_head(payload, out)
        if rest is None:
            return
        self._client_big = None
        if rest.answer is None:
            out.extend(ToServer(r) for r in big.raws)
        if whole is None:
            self._rest = rest
        elif rest.answer is not None:
            out.append(ToClient(self._wire(rest.answer)))

    def _whole_envelope(self, payload: bytearray) -> bool | None:
        if len(payload) < w.HEADER_LEN:
            return None
        *_, stream, _op, length = w.parse_header(payload)
        self._check_length(length, stream)
        need = w.HEADER_LEN + length
        if len(payload) < need:
            return None
        if len(payload) > need:
            raise CqlError("multi-segment payload longer than its envelope", stream=stream)
        return True

    def _requests_in(
        self, payload: bytes | bytearray, out: list[Command]
    ) -> tuple[list[bytes], list[bytes]]:
        """Judge every envelope in a segment payload: (kept envelopes, answers)."""
        kept: list[bytes] = []
        answers: list[bytes] = []
        pos = 0
        while pos < len(payload):
            if len(payload) - pos < w.HEADER_LEN:
                raise CqlError("segment payload ends inside an envelope header")
            vbyte, flags, stream, opcode, length = w.parse_header(payload, pos)
            self._check_length(length, stream)
            end = pos + w.HEADER_LEN + length
            if end > len(payload):
                raise CqlError("segment payload ends inside an envelope", stream=stream)
            env = w.Envelope(
                vbyte & 0x7F, flags, stream, opcode, bytes(payload[pos + w.HEADER_LEN : end])
            )
            answer = self._request(env, vbyte, out)
            if answer is None:
                kept.append(bytes(payload[pos:end]))
            else:
                answers.append(answer)
            pos = end
        return kept, answers

    def _check_length(self, length: int, stream: int) -> None:
        if length > self._max_frame:
            raise w.CqlFrameTooLarge(
                f"frame body of {length} bytes exceeds the maximum of {self._max_frame}",
                stream=stream,
            )

    # ------------------------------------------------------------------
    # One request envelope: returns None to forward it, or the answer envelope.
    # ``partial``: ``env.body`` is only the start of the body; a field that runs
    # past it raises ``Truncated`` (more is needed) before anything is judged.

    def _request(
        self, env: w.Envelope, vbyte: int, out: list[Command], *, partial: bool = False
    ) -> bytes | None:
        version, stream = env.version, env.stream
        if vbyte & w.RESPONSE_BIT:
            return self._refuse(env, "a response envelope was sent by the client", out)
        if version not in w.SUPPORTED_VERSIONS:
            answer_version = min(version, 5)
            out.append(
                Log(f"client asked for CQL protocol v{version}; answering ProtocolError", "info")
            )
            return self._error_envelope(
                answer_version,
                stream,
                w.ERR_PROTOCOL,
                f"Invalid or unsupported protocol version ({version}); supported versions are "
                "(3/v3, 4/v4, 5/v5)",
            )
        if self._version is None:
            self._version = version
        elif version != self._version:
            return self._refuse(env, f"protocol v{version} on a v{self._version} connection", out)
        if env.opcode not in w.REQUEST_OPCODES:
            return self._refuse(env, f"opcode {env.opcode_name} is not a request", out)
        try:
            reader = self._body(env)
            if env.opcode == w.STARTUP:
                options = {k.upper(): v for k, v in reader.string_map().items()}
                self._startups[stream] = (version, options.get("COMPRESSION", "").lower())
                return None
            if env.opcode in (w.OPTIONS, w.REGISTER, w.AUTH_RESPONSE):
                return None  # connection plumbing: not judged, as in Cilium
            if env.opcode == w.QUERY:
                text = reader.long_string()
                try:
                    keyspace = self._query_keyspace(reader, version)
                except w.Truncated:
                    # v5: the keyspace comes after the bound values. A statement that
                    # names no unqualified table does not need it: judge it now.
                    if not partial or classify(text, "\0a") != classify(text, "\0b"):
                        raise
                    keyspace = ""
                return self._judge(
                    env, "query", [(text, classify(text, keyspace or self._keyspace))], out
                )
            if env.opcode == w.PREPARE:
                text = reader.long_string()
                keyspace = ""
                if version >= 5 and reader.int() & 0x01:
                    keyspace = reader.string()
                statements = classify(text, keyspace or self._keyspace)
                answer = self._judge(env, "prepare", [(text, statements)], out)
                if answer is None:
                    self._preparing[stream] = _Prepared(text, statements)
                return answer
            if env.opcode == w.EXECUTE:
                prepared_id = reader.short_bytes()
                known = self._prepared.get(prepared_id)
                if known is None:
                    return self._unprepared(env, prepared_id, out)
                return self._judge(env, "execute", [(known.statement, known.statements)], out)
            return self._batch(env, reader, out)
        except CqlError as e:
            if partial and isinstance(e, w.Truncated):
                raise
            return self._refuse(env, str(e), out)

    def _body(self, env: w.Envelope) -> w.BodyReader:
        body = env.body
        if env.flags & w.FLAG_COMPRESSED and env.version < 5 and body:
            if self._frame_codec is None:
                raise CqlError(
                    "compressed frame but no compression was negotiated", stream=env.stream
                )
            body = self._frame_codec[1](bytes(body), self._max_frame)
        reader = w.BodyReader(body, env.stream)
        if env.flags & w.FLAG_CUSTOM_PAYLOAD:
            reader.bytes_map()
        return reader

    @staticmethod
    def _query_keyspace(reader: w.BodyReader, version: int) -> str:
        """The v5 per-query keyspace from <query_parameters>, or ''."""
        if version < 5:
            return ""
        reader.short()  # consistency
        flags = reader.int()
        if not flags & w.QF_KEYSPACE:
            return ""
        _skip_values(reader, flags)
        if flags & w.QF_PAGE_SIZE:
            reader.int()
        if flags & w.QF_PAGING_STATE:
            reader.bytes_()
        if flags & w.QF_SERIAL_CONSISTENCY:
            reader.short()
        if flags & w.QF_TIMESTAMP:
            reader.skip(8)
        return reader.string()

    def _batch(self, env: w.Envelope, reader: w.BodyReader, out: list[Command]) -> bytes | None:
        reader.byte()  # LOGGED / UNLOGGED / COUNTER
        members: list[tuple[str, bytes | None]] = []
        for _ in range(reader.short()):
            kind = reader.byte()
            if kind == 0:
                members.append((reader.long_string(), None))
            elif kind == 1:
                members.append(("", reader.short_bytes()))
            else:
                raise CqlError(f"unknown BATCH member kind {kind}", stream=env.stream)
            for _ in range(reader.short()):
                reader.value()
        keyspace = ""
        if env.version >= 5:
            reader.short()  # consistency
            flags = reader.int()
            if flags & w.QF_SERIAL_CONSISTENCY:
                reader.short()
            if flags & w.QF_TIMESTAMP:
                reader.skip(8)
            if flags & w.QF_KEYSPACE:
                keyspace = reader.string()
        judged: list[tuple[str, tuple[Statement, ...]]] = []
        for text, prepared_id in members:
            if prepared_id is not None:
                known = self._prepared.get(prepared_id)
                if known is None:
                    return self._unprepared(env, prepared_id, out)
                judged.append((known.statement, known.statements))
            else:
                judged.append((text, classify(text, keyspace or self._keyspace)))
        return self._judge(env, "batch", judged, out)

    # ------------------------------------------------------------------
    # Judging

    def _judge(
        self,
        env: w.Envelope,
        opcode: str,
        members: list[tuple[str, tuple[Statement, ...]]],
        out: list[Command],
    ) -> bytes | None:
        stream = env.stream
        requests = [
            CqlRequest(
                opcode=opcode,
                action=st.action,
                table=st.table,
                statement=text,
                stream=stream,
                version=env.version,
            )
            for text, statements in members
            for st in statements
        ]
        decisions = [_USE_ALLOWED if r.action == "use" else self._decide(r) for r in requests]
        single = len(requests) == 1 and opcode != "batch"
        keys: list[Hashable] = [stream] if single else [(stream, i) for i in range(len(requests))]
        refused = next((d for d in decisions if not d.allowed), None)
        if refused is None:
            for request, decision, key in zip(requests, decisions, keys, strict=True):
                out.append(new_access(request, decision, key))
            self._inflight[stream] = keys
            return None
        culprit = requests[decisions.index(refused)]
        for request, decision, key in zip(requests, decisions, keys, strict=True):
            if decision.allowed:
                # Its batch is refused as a whole: say so in its own record.
                decision = Decision(
                    False,
                    refused.policy,
                    refused.rule,
                    f"batch refused: {culprit.action} {culprit.table or '-'} is denied",
                    decision.audit,
                )
            out.append(Access(request, decision, key))
            out.append(Reply(key, {"opcode": "ERROR", "error_code": w.ERR_UNAUTHORIZED}))
        return self._error_envelope(
            env.version, stream, w.ERR_UNAUTHORIZED, _denial_message(culprit, refused)
        )

    def _unprepared(self, env: w.Envelope, prepared_id: bytes, out: list[Command]) -> bytes:
        request = CqlRequest(
            opcode=w.OPCODE_NAMES[env.opcode].lower(),
            action="unknown",
            table="",
            stream=env.stream,
            version=env.version,
        )
        out.append(Access(request, _UNPREPARED, env.stream))
        out.append(Reply(env.stream, {"opcode": "ERROR", "error_code": w.ERR_UNPREPARED}))
        extra = struct.pack(">H", len(prepared_id)) + prepared_id
        return self._error_envelope(
            env.version,
            env.stream,
            w.ERR_UNPREPARED,
            "Prepared statement unknown to the proxy; prepare it again",
            extra,
        )

    def _refuse(self, env: w.Envelope, why: str, out: list[Command]) -> bytes:
        # A bad message inside intact framing: answer it, keep the connection.
        out.append(ParseError("client", CqlError(why, stream=env.stream), close=False))
        version = env.version if env.version in w.SUPPORTED_VERSIONS else (self._version or 4)
        return self._error_envelope(version, env.stream, w.ERR_PROTOCOL, why)

    # ------------------------------------------------------------------
    # Answers the proxy writes itself

    def _error_envelope(
        self, version: int, stream: int, code: int, message: str, extra: bytes = b""
    ) -> bytes:
        body = w.error_body(code, message, extra)
        flags = 0
        if self._frame_codec is not None and version < 5:
            body = self._frame_codec[0](body)
            flags = w.FLAG_COMPRESSED
        return w.encode_envelope(version | w.RESPONSE_BIT, flags, stream, w.ERROR, body)

    def _error_reply(self, version: int, stream: int, code: int, message: str) -> bytes:
        return self._wire(self._error_envelope(version, stream, code, message))

    def _wire(self, envelope: bytes) -> bytes:
        return w.encode_segments(envelope, self._segment_lz4) if self._segments else envelope

    # ------------------------------------------------------------------
    # Server -> client: forward whole frames/segments, learn from them

    def _server_input(self, out: list[Command]) -> None:
        buf = self._sbuf
        pos = fwd = 0
        try:
            while True:
                if self._segments:
                    seg = w.read_segment(buf, pos, self._segment_lz4)
                    if seg is None:
                        break
                    self._server_segment(seg, buf, pos, out)
                    pos += seg.raw_len
                    continue
                if len(buf) - pos < w.HEADER_LEN:
                    break
                vbyte, flags, stream, opcode, length = w.parse_header(buf, pos)
                if not vbyte & w.RESPONSE_BIT:
                    raise CqlError("server sent an envelope without the response bit")
                self._check_length(length, stream)
                end = pos + w.HEADER_LEN + length
                if len(buf) < end:
                    break
                self._frames += 1
                env = w.Envelope(
                    vbyte & 0x7F, flags, stream, opcode, bytes(buf[pos + w.HEADER_LEN : end])
                )
                pos = end
                self._response(env, out)
        finally:
            if fwd < pos:
                out.append(new_to_client(bytes(buf[fwd:pos])))
            del buf[:pos]

    def _server_segment(self, seg: w.Segment, buf: bytearray, pos: int, out: list[Command]) -> None:
        if seg.self_contained:
            if self._server_big is not None:
                raise CqlError("self-contained segment inside a multi-segment envelope")
            self._responses_in(seg.payload, out)
            return
        if self._server_big is None:
            self._server_big = (bytearray(), [])
        payload, _ = self._server_big
        payload += seg.payload
        if self._whole_envelope(payload):
            self._server_big = None
            self._responses_in(payload, out)

    def _responses_in(self, payload: bytes | bytearray, out: list[Command]) -> None:
        pos = 0
        while pos < len(payload):
            if len(payload) - pos < w.HEADER_LEN:
                raise CqlError("segment payload ends inside an envelope header")
            vbyte, flags, stream, opcode, length = w.parse_header(payload, pos)
            end = pos + w.HEADER_LEN + length
            if end > len(payload):
                raise CqlError("segment payload ends inside an envelope")
            self._response(
                w.Envelope(vbyte & 0x7F, flags, stream, opcode, bytes(payload[pos + 9 : end])), out
            )
            pos = end

    def _response(self, env: w.Envelope, out: list[Command]) -> None:
        stream, opcode = env.stream, env.opcode
        startup = (
            self._startups.pop(stream, None)
            if opcode in (w.READY, w.AUTHENTICATE, w.ERROR)
            else None
        )
        if startup is not None and opcode != w.ERROR:
            version, compression = startup
            if version >= 5:
                self._segments = True
                self._segment_lz4 = compression == "lz4"
            elif compression:
                self._frame_codec = w.FRAME_CODECS.get(compression)
            out.append(
                Log(
                    f"CQL v{version} ready, compression={compression or 'none'}"
                    f"{', v5 segments' if version >= 5 else ''}"
                )
            )
        keys = self._inflight.pop(stream, None) if stream >= 0 else None
        preparing = self._preparing.pop(stream, None) if stream >= 0 else None
        if keys is None and preparing is None and opcode != w.RESULT:
            return
        fields: dict[str, Any] = {"opcode": env.opcode_name}
        if opcode in (w.RESULT, w.ERROR):
            reader = self._response_body(env)
            if opcode == w.ERROR:
                fields["error_code"] = reader.int()
            else:
                kind = reader.int()
                fields["result"] = w.RESULT_KIND_NAMES.get(kind, str(kind))
                if kind == w.RESULT_SET_KEYSPACE:
                    self._keyspace = reader.string()
                elif kind == w.RESULT_PREPARED and preparing is not None:
                    self._prepared[reader.short_bytes()] = preparing
        for key in keys or ():
            out.append(new_reply(key, fields))

    def _response_body(self, env: w.Envelope) -> w.BodyReader:
        body = env.body
        if env.flags & w.FLAG_COMPRESSED and env.version < 5 and body:
            if self._frame_codec is None:
                raise CqlError("server sent a compressed frame but no compression was negotiated")
            body = self._frame_codec[1](bytes(body), self._max_frame)
        reader = w.BodyReader(body, env.stream)
        if env.flags & w.FLAG_TRACING:
            reader.skip(16)
        if env.flags & w.FLAG_WARNING:
            reader.string_list()
        if env.flags & w.FLAG_CUSTOM_PAYLOAD:
            reader.bytes_map()
        return reader


def _skip_values(reader: w.BodyReader, flags: int) -> None:
    if flags & w.QF_VALUES:
        for _ in range(reader.short()):
            if flags & w.QF_NAMES_FOR_VALUES:
                reader.string()
            reader.value()


def _denial_message(request: CqlRequest, decision: Decision) -> str:
    what = f"{request.action} on {request.table}" if request.table else request.action
    who = f"policy {decision.policy}" if decision.policy else "policy (no rule allows it)"
    if decision.rule:
        who += f" rule {decision.rule}"
    reason = f": {decision.reason}" if decision.reason else ""
    return f"Request Unauthorized by l7proxy: {what} denied by {who}{reason}"
