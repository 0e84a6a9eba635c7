"""HTTP/2 (and gRPC over it) terminated on both sides, judged per stream.

``H2Engine`` holds two h2 connections: a server-side one facing the client
(``down``) and a client-side one facing the upstream server (``up``). Each
client stream is judged when its HEADERS arrive; only an allowed stream gets
an upstream twin, so a denied request's headers and body never leave the
proxy. Everything after the HEADERS is relayed frame by frame.

Flow control is end to end: DATA received from one peer is acknowledged
(WINDOW_UPDATE) only once the other connection has accepted it for sending,
so the proxy never holds more per stream than the window it advertised, and
a reader that stops reading stops the writer.

Errors follow RFC 9113 §5.4: a malformed header section is a stream error
(RST_STREAM PROTOCOL_ERROR, the connection lives on); framing, HPACK and
flow-control violations detected by h2 are connection errors (GOAWAY with
h2's code, then close).

Floods and fairness (``parsers/http2/floods.py``): the client's input is handed
to h2 in turns of a bounded number of frames, each frame header checked against
the connection's flood budgets first (resets, PING, SETTINGS, control frames
owed). A turn that leaves input over ends with ``Yield``; a budget exceeded is
GOAWAY(ENHANCE_YOUR_CALM) and a close.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h2.events as ev
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.exceptions import DenialOfServiceError, StreamClosedError
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes

from parsers.base import (
    Access,
    Close,
    Command,
    Decide,
    Decision,
    Finished,
    LimitExceeded,
    ParseError,
    ProtocolError,
    Reply,
    TimeLimit,
    ToClient,
    ToServer,
    Yield,
)
from parsers.http2.conn import (
    MalformedStream,
    RelayConnection,
    check_announced_length,
    code_name,
    decode_settings_header,
    relay_connection,
    relayed_code,
    settings,
)
from parsers.http2.floods import FloodError, FloodGuard, Turns
from parsers.http2.headers import (
    DENIED_STATUS,
    GRPC_PERMISSION_DENIED,
    Headers,
    apply_edits,
    build_request,
    denial_reason,
    grpc_denial,
    header_list_size,
    headers_value,
    http_denial,
    int_or_none,
    request_problem,
    response_problem,
    trailers_problem,
)
from parsers.http2.streams import DATA, END, RESET, TRAILERS, Stream
from parsers.requests import GrpcCall

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass(frozen=True, slots=True)
class H2Limits:
    """What the proxy advertises and enforces.

    The windows bound memory: a connection never buffers more than
    ``connection_window`` per direction, a stream never more than ``stream_window``.
    """

    max_concurrent_streams: int = 128
    stream_window: int = 256 * 1024
    connection_window: int = 1024 * 1024
    max_frame_size: int = 16384
    # Above the advertised size a request gets 431 (a stream error, HPACK state
    # intact); above the hard cap h2 stops decoding: connection error.
    max_header_list_size: int = 64 * 1024
    hard_header_list_size: int = 256 * 1024
    # A header block still waiting for END_HEADERS may hold no more compressed
    # bytes than the hard cap allows decoded ones (HPACK never shrinks a header
    # list below its encoding by much): past it, GOAWAY(ENHANCE_YOUR_CALM), as
    # nghttp2 does, rather than parking up to 64 CONTINUATION frames (1 MiB).

    # Flood budgets of a client connection (parsers/http2/floods.py). Past one:
    # GOAWAY(ENHANCE_YOUR_CALM) with the last stream processed, and a close.
    # RST_STREAM frames the client caused (its own, ours for a denied, refused or
    # malformed stream) beyond the streams it completed without one.
    max_stream_resets: int = 1000
    # Per round trip: until the client acknowledges a PING the proxy sends once
    # a count reaches half its limit.
    max_ping_frames: int = 100
    max_settings_frames: int = 100
    # PING and SETTINGS acknowledgements and RST_STREAM frames sent toward the
    # client, per round trip: what a client that does not read lets pile up.
    max_outbound_control_frames: int = 1000
    # Fairness: one turn of the event loop hands h2 at most this many client
    # frames, or payload bytes of frames other than DATA (at least one frame).
    frames_per_turn: int = 128
    bytes_per_turn: int = 512


_NO_ERROR = ErrorCodes.NO_ERROR
# finish(): the first GOAWAY's last stream id (RFC 9113 6.8), and our PING's payload
# (the flood guard's round-trip PINGs carry other data).
MAX_STREAM_ID = 2**31 - 1
FINISH_PING = b"l7finish"
_DATA_FRAME = 0x0  # the frame type byte of DATA (RFC 9113 §6.1)
_NOT_SENT = object()


class H2Engine:
    protocol = "http2"
    client_speaks_first = True  # the upstream is connected on the first bytes for it

    def __init__(
        self,
        decide: Decide,
        *,
        limits: H2Limits = H2Limits(),
        upgrade_settings: bytes | None = None,
    ):
        self._decide = decide
        self._limits = limits
        self.down: RelayConnection = relay_connection(client_side=False)
        self.up: RelayConnection = relay_connection(client_side=True)
        self._streams: dict[int, Stream] = {}  # by client stream id
        self._by_sid: dict[int, Stream] = {}  # by upstream stream id
        self._waiting: list[Stream] = []  # allowed, waiting for an upstream slot
        self._out: list[Command] = []
        self._preface_seen = False
        self._refusing = False  # a GOAWAY was seen: no new streams
        self._server_gone = False  # server EOF: finish delivering complete responses only
        self._dead = False
        # finish(): GOAWAY(2^31-1) and PING sent; the final GOAWAY's last stream id
        # once sent (streams above it are refused); Finished said.
        self._finishing = False
        self._goaway_last: int | None = None
        self._finished = False
        # Client input not yet handed to h2 (a turn ended first); starts on a frame boundary.
        self._held: bytes | memoryview = b""
        self._turns = Turns(
            frames_per_turn=limits.frames_per_turn, bytes_per_turn=limits.bytes_per_turn
        )
        self._guard = FloodGuard(
            max_stream_resets=limits.max_stream_resets,
            max_ping_frames=limits.max_ping_frames,
            max_settings_frames=limits.max_settings_frames,
            max_outbound_control_frames=limits.max_outbound_control_frames,
            streams=self._streams,
        )
        self._excused_resets = 0  # RST_STREAM frames to the client that the server caused
        self._setup(upgrade_settings)

    def _setup(self, upgrade_settings: bytes | None) -> None:
        lim = self._limits
        self.down.local_settings = settings(
            False,
            {
                SettingCodes.MAX_CONCURRENT_STREAMS: lim.max_concurrent_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: lim.stream_window,
                SettingCodes.MAX_FRAME_SIZE: lim.max_frame_size,
                SettingCodes.MAX_HEADER_LIST_SIZE: lim.max_header_list_size,
            },
        )
        ours: dict[SettingCodes | int, int] = {
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: lim.stream_window,
            SettingCodes.MAX_FRAME_SIZE: lim.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: lim.max_header_list_size,
        }
        if upgrade_settings is None:
            self.up.local_settings = settings(True, ours)
            self.down.initiate_connection()
            self.up.initiate_connection()
        else:
            # h2c: the server already applied the client's HTTP2-Settings as ours
            # (it came with the upgraded request); our SETTINGS frame follows.
            client_values = decode_settings_header(upgrade_settings)
            self.up.local_settings = settings(True, client_values)
            self.down.initiate_upgrade_connection(upgrade_settings)
            self.up.initiate_upgrade_connection()
            self.up.update_settings(ours)
            stream = Stream(1, None, grpc=False)
            stream.sid = 1
            stream.request_done = True
            stream.replied = True  # the HTTP/1.1 engine judged and logs this one
            self._streams[1] = stream
            self._by_sid[1] = stream
        extra = lim.connection_window - 65535
        if extra > 0:
            self.down.increment_flow_control_window(extra)
            self.up.increment_flow_control_window(extra)
        self.down.decoder.max_header_list_size = lim.hard_header_list_size

    # ------------------------------------------------------------ Engine API

    @property
    def reading_headers(self) -> bool:
        """Until the client's preface and SETTINGS are in, while a request header
        block waits for its CONTINUATION frames, and while any frame but DATA is
        partly received (h2's frame buffer; a frame header not yet whole counts)."""
        if self._dead:
            return False
        incoming = self.down.incoming_buffer
        if not self._preface_seen or incoming._headers_buffer:
            return True
        partial = incoming._data
        return bool(partial) and (len(partial) < 9 or partial[3] != _DATA_FRAME)

    @property
    def reading_body(self) -> bool:
        """While a DATA frame is partly received."""
        if self._dead or not self._preface_seen:
            return False
        partial = self.down.incoming_buffer._data
        return len(partial) >= 9 and partial[3] == _DATA_FRAME

    @property
    def heads_read(self) -> int:
        return self.down.frames_received

    def client_timed_out(self, limit: TimeLimit) -> list[Command]:
        """GOAWAY(NO_ERROR) with the limit's name as debug data, then close: the
        streams in flight are cut (the client cannot even send WINDOW_UPDATE in
        the middle of a header block) and their upstream twins cancelled.

        NO_ERROR, because nothing the client sent was wrong, only slow: the
        GOAWAY's last stream id tells it which streams were never processed (the
        unfinished header block's among them), which it may retry. haproxy ends a
        connection on its timeouts the same way. nginx sends PROTOCOL_ERROR, which
        blames a violation that did not happen; ENHANCE_YOUR_CALM is for floods."""
        if self._dead:
            return []
        if self.down.state_machine.state is not ConnectionState.CLOSED:
            self.down.close_connection(_NO_ERROR, additional_data=limit.encode("ascii"))
        self._abort(
            limit,
            to_server=ErrorCodes.CANCEL if self._streams else _NO_ERROR,
            client_wire=self.down.data_to_send(),
        )
        out = self._out
        self._out = []
        return out

    def finish(self) -> list[Command]:
        """The graceful two-step GOAWAY of RFC 9113 6.8: GOAWAY(NO_ERROR, 2^31-1)
        and a PING now, so the client opens no new stream; once the PING comes
        back (a round trip: every stream it opened before reading the GOAWAY has
        reached us), GOAWAY(NO_ERROR, the highest stream id received). Streams up
        to it are served to their end; later ones are refused (REFUSED_STREAM: never
        processed, safe to retry). Then ``Finished(told=True)``: the client closes
        (its EOF gets ``Close``). A client that never reads the PING (an idle
        pooled connection) is ended by the driver once quiet."""
        if self._dead or self._finishing or self._refusing:
            return []  # already ending
        self._finishing = True
        self.down.send_graceful_goaway(MAX_STREAM_ID)
        self.down.ping(FINISH_PING)
        return self._drain()

    def client_data(self, data: bytes) -> list[Command]:
        if self._dead:
            return []
        if not data:
            return self._finish_on_eof("client")
        # Input while a turn is still due comes only from a driver that read on
        # after a Yield: it queues behind, in order.
        self._held = bytes(self._held) + data if self._held else data
        return self._client_turn()

    def _resume_client(self) -> list[Command]:
        """``Yield.resume``: the next turn of the client's held input."""
        if self._dead or not self._held:
            return []
        return self._client_turn()

    def _client_turn(self) -> list[Command]:
        """Hand h2 one turn of the client's input, its frame headers checked against
        the flood budgets first; then what the engine did is checked too."""
        held = self._held
        take, flood = self._turns.cut(held, self._guard)
        if take == len(held):
            chunk, self._held = held, b""
        else:
            view = held if type(held) is memoryview else memoryview(held)
            chunk, self._held = view[:take], view[take:]
        try:
            events = self.down.receive_data(chunk) if take else []
            check_announced_length(self.down)
            self._check_parked_header_block()
        except H2ProtocolError as exc:
            return self._connection_error("client", exc)
        handlers = CLIENT_HANDLERS
        for event in events:
            handler = handlers.get(type(event))
            if handler is not None:
                handler(self, event)
        if self._dead:
            return self._drain()
        guard = self._guard
        if flood is None:
            sent = self.down.resets_sent
            flood = guard.sync(sent, sent - self._excused_resets)
        if flood is not None:
            return self._connection_error("client", flood)
        if guard.barrier_due():
            self.down.ping(guard.open_barrier())
        out = self._drain()
        if self._held and not self._dead:
            out.append(Yield(self._resume_client))
        return out

    def _check_parked_header_block(self) -> None:
        parked = self.down.incoming_buffer._headers_buffer  # h2 has no public view of it
        if parked:
            size = sum(len(frame.data) for frame in parked)
            if size > self._limits.hard_header_list_size:
                raise FloodError(
                    "hard_header_list_size",
                    f"header block of {size} bytes still without END_HEADERS "
                    f"(limit {self._limits.hard_header_list_size})",
                )

    def server_data(self, data: bytes) -> list[Command]:
        if self._dead:
            return []
        if not data:
            return self._finish_on_eof("server")
        try:
            events = self.up.receive_data(data)
            check_announced_length(self.up)
        except H2ProtocolError as exc:
            return self._connection_error("server", exc)
        handlers = SERVER_HANDLERS
        for event in events:
            handler = handlers.get(type(event))
            if handler is not None:
                handler(self, event)
        return self._drain()

    def _drain(self) -> list[Command]:
        out = self._out
        self._out = []
        down = self.down.data_to_send()
        if down:
            out.append(ToClient(down))
        # Nothing goes upstream for a client that is not speaking HTTP/2, nor
        # to a server that has closed (its window updates would be lost anyway).
        if self._preface_seen:
            up = self.up.data_to_send()
            if up and not self._server_gone:
                out.append(ToServer(up))
        if not self._streams and not self._dead:
            if self._goaway_last is not None:
                # Our own final GOAWAY: the client, told, closes the connection.
                if not self._finished:
                    self._finished = True
                    out.append(Finished(told=True))
            elif self._refusing:
                self._dead = True
                out.append(Close("GOAWAY and no streams left"))
        return out

    # -------------------------------------------------------- client events

    def _on_request(self, event: ev.RequestReceived) -> None:
        cid = event.stream_id
        headers = event.headers
        ended = event.stream_ended is not None
        h2_stream = self.down.streams.get(cid)
        if h2_stream is None or h2_stream.closed:
            return  # reset by the client in the same read: nothing left to judge or answer
        if self._refusing or (self._goaway_last is not None and cid > self._goaway_last):
            self._reset(self.down, cid, ErrorCodes.REFUSED_STREAM)
            return
        problem = request_problem(headers)
        if problem:
            self._stream_error("client", cid, problem)
            return
        size = header_list_size(headers)
        if size > self._limits.max_header_list_size:
            self._answer(cid, ended, *http_denial(431, b"Request header fields too large"))
            self._out.append(
                ParseError(
                    "client",
                    ProtocolError(f"header list of {size} bytes", code="header_list_too_large"),
                    close=False,
                )
            )
            return
        request = build_request(headers)
        grpc = type(request) is GrpcCall
        decision = self._decide(request)
        self._out.append(Access(request, decision, cid))
        if not decision.allowed:
            self._deny(cid, ended, decision, grpc)
            return
        if decision.edits:
            headers = apply_edits(headers, decision.edits)
        upstream_limit = self.up.remote_settings.max_header_list_size
        if decision.edits:
            size = header_list_size(headers)
        if upstream_limit is not None and size > upstream_limit:
            self._answer(cid, ended, *http_denial(431, b"Request header fields too large"))
            self._out.append(Reply(cid, {"status": 431}))
            return
        stream = Stream(cid, cid, grpc)
        stream.headers = headers
        stream.request_ended = ended
        self._streams[cid] = stream
        # Every opened upstream stream stays in _by_sid until h2 has closed it,
        # so its size is h2's open_outbound_streams without h2's O(n) count.
        if self._waiting or len(self._by_sid) >= self.up.remote_settings.max_concurrent_streams:
            self._waiting.append(stream)
        else:
            self._open(stream)

    def _deny(self, cid: int, ended: bool, decision: Decision, grpc: bool) -> None:
        if grpc:
            self.down.send_headers(cid, grpc_denial(denial_reason(decision)), end_stream=True)
            if ended:
                self._guard.stream_completed()
            else:
                self._reset(self.down, cid, _NO_ERROR)
            fields = {
                "status": 200,
                "grpc_status": GRPC_PERMISSION_DENIED,
                "request_messages": 0,
                "response_messages": 0,
            }
        else:
            self._answer(cid, ended, *http_denial())
            fields = {"status": DENIED_STATUS}
        self._out.append(Reply(cid, fields))

    def _answer(self, cid: int, ended: bool, headers: Headers, body: bytes) -> None:
        """A complete response from the proxy itself; the rest of the request is refused."""
        if self.down.local_flow_control_window(cid) >= len(body):
            self.down.send_headers(cid, headers)
            self.down.send_data(cid, body, end_stream=True)
        else:
            self.down.send_headers(cid, headers[:1] + [(b"content-length", b"0")], end_stream=True)
        if ended:
            self._guard.stream_completed()
        else:
            # RFC 9113 §8.1: a complete response may end the request with NO_ERROR.
            self._reset(self.down, cid, _NO_ERROR)

    def _open(self, stream: Stream) -> None:
        assert stream.headers is not None, "a waiting stream keeps its request headers"
        sid = self.up.get_next_available_stream_id()
        self.up.send_headers(sid, stream.headers, end_stream=stream.request_ended)
        stream.headers = None
        stream.sid = sid
        self._by_sid[sid] = stream
        if stream.request_ended:
            stream.request_done = True
        elif stream.to_server.items:
            self._flush(stream, True)

    def _open_waiting(self) -> None:
        limit = self.up.remote_settings.max_concurrent_streams
        while self._waiting and len(self._by_sid) < limit:
            self._open(self._waiting.pop(0))

    def _on_client_data(self, event: ev.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.request_done:
            self.down.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        data = event.data
        if stream.grpc_in is not None:
            stream.grpc_in.feed(data)
        pipe = stream.to_server
        pipe.items.append((DATA, data, event.flow_controlled_length))
        pipe.unacked += event.flow_controlled_length
        if event.stream_ended is not None:
            # END_STREAM on this DATA frame: forward it on the same frame.
            pipe.items.append((END,))
            pipe.end_queued = True
        if stream.sid is not None:
            self._flush(stream, True)

    def _on_client_end(self, event: ev.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if (
            stream is None
            or stream.request_ended
            or stream.request_done
            or stream.to_server.end_queued
        ):
            return
        stream.to_server.items.append((END,))
        if stream.sid is not None:
            self._flush(stream, True)

    def _on_client_trailers(self, event: ev.TrailersReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        problem = trailers_problem(event.headers)
        if problem:
            self._stream_error("client", event.stream_id, problem)
            return
        stream.to_server.items.append((TRAILERS, event.headers))
        if stream.sid is not None:
            self._flush(stream, True)

    def _on_client_reset(self, event: ev.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        if stream.sid is None:
            self._waiting.remove(stream)
        elif not (stream.request_done and stream.response_done):
            self._reset(self.up, stream.sid, relayed_code(event.error_code))
        self._drop(stream, f"client reset {code_name(event.error_code)}")

    def _on_client_malformed(self, event: MalformedStream) -> None:
        self._stream_error("client", event.stream_id, event.reason)

    def _on_client_window(self, event: ev.WindowUpdated) -> None:
        if event.stream_id:
            stream = self._streams.get(event.stream_id)
            if stream is not None and stream.to_client.items:
                self._flush(stream, False)
        else:
            self._flush_all(False)

    def _on_client_settings(self, event: ev.RemoteSettingsChanged) -> None:
        self._preface_seen = True
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._flush_all(False)

    def _on_settings_ack(self, _event: ev.SettingsAcknowledged) -> None:
        # h2 resets the HPACK limit to the advertised size on every ack; keep
        # the hard cap so that sizes in between get a 431 rather than a GOAWAY.
        self.down.decoder.max_header_list_size = self._limits.hard_header_list_size

    def _on_client_ping_ack(self, event: ev.PingAckReceived) -> None:
        if event.ping_data == FINISH_PING and self._finishing and self._goaway_last is None:
            # finish()'s round trip is over: the final GOAWAY. Streams above its id
            # arrived after the client read the first one: refused (_on_request).
            self._goaway_last = self.down.highest_inbound_stream_id
            self.down.send_graceful_goaway(self._goaway_last)
            return
        self._guard.acknowledged(event.ping_data)

    def _on_client_goaway(self, event: ev.ConnectionTerminated) -> None:
        if event.error_code != _NO_ERROR:
            self._abort(f"client GOAWAY {code_name(event.error_code)}", to_server=ErrorCodes.CANCEL)
            return
        self._refusing = True
        self.up.send_graceful_goaway(0)

    # -------------------------------------------------------- server events

    def _on_response(self, event: ev.ResponseReceived) -> None:
        stream = self._by_sid.get(event.stream_id)
        if stream is None:
            return
        headers = event.headers
        problem = response_problem(headers)
        if problem:
            self._stream_error("server", event.stream_id, problem)
            return
        status = int(headers_value(headers, b":status") or 0)
        stream.status = status
        ended = event.stream_ended is not None
        if ended and stream.grpc_in is not None:
            stream.grpc_status = int_or_none(headers_value(headers, b"grpc-status"))
        self.down.send_headers(stream.cid, headers, end_stream=ended)
        if ended:
            self._ended(stream, False)

    def _on_informational(self, event: ev.InformationalResponseReceived) -> None:
        stream = self._by_sid.get(event.stream_id)
        if stream is not None:
            self.down.send_headers(stream.cid, event.headers)

    def _on_server_data(self, event: ev.DataReceived) -> None:
        stream = self._by_sid.get(event.stream_id)
        if stream is None or stream.response_done:
            self.up.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        data = event.data
        if stream.grpc_out is not None:
            stream.grpc_out.feed(data)
        pipe = stream.to_client
        pipe.items.append((DATA, data, event.flow_controlled_length))
        pipe.unacked += event.flow_controlled_length
        if event.stream_ended is not None:
            pipe.items.append((END,))
            pipe.end_queued = True
        self._flush(stream, False)

    def _on_server_end(self, event: ev.StreamEnded) -> None:
        stream = self._by_sid.get(event.stream_id)
        if stream is None or stream.response_done or stream.to_client.end_queued:
            return
        stream.to_client.items.append((END,))
        self._flush(stream, False)

    def _on_server_trailers(self, event: ev.TrailersReceived) -> None:
        stream = self._by_sid.get(event.stream_id)
        if stream is None:
            return
        problem = trailers_problem(event.headers)
        if problem:
            self._stream_error("server", event.stream_id, problem)
            return
        if stream.grpc_in is not None:
            stream.grpc_status = int_or_none(headers_value(event.headers, b"grpc-status"))
        stream.to_client.items.append((TRAILERS, event.headers))
        self._flush(stream, False)

    def _on_server_reset(self, event: ev.StreamReset) -> None:
        stream = self._by_sid.get(event.stream_id)
        if stream is None:
            return
        code = event.error_code
        if code == _NO_ERROR and stream.to_client.items:
            # "stop sending, the response is complete": deliver the response first.
            stream.to_client.items.append((RESET, code))
            self._discard(stream, True)
            stream.request_done = True
            return
        if not (stream.request_done and stream.response_done):
            self._reset_for_server(stream.cid, relayed_code(code))
        self._drop(stream, f"server reset {code_name(code)}")

    def _on_server_malformed(self, event: MalformedStream) -> None:
        self._stream_error("server", event.stream_id, event.reason)

    def _on_server_window(self, event: ev.WindowUpdated) -> None:
        if event.stream_id:
            stream = self._by_sid.get(event.stream_id)
            if stream is not None and stream.to_server.items:
                self._flush(stream, True)
        else:
            self._flush_all(True)

    def _on_server_settings(self, event: ev.RemoteSettingsChanged) -> None:
        changed = event.changed_settings
        if SettingCodes.INITIAL_WINDOW_SIZE in changed:
            self._flush_all(True)
        if SettingCodes.MAX_CONCURRENT_STREAMS in changed:
            self._open_waiting()

    def _on_server_goaway(self, event: ev.ConnectionTerminated) -> None:
        if event.error_code != _NO_ERROR:
            self._abort(
                f"server GOAWAY {code_name(event.error_code)}", to_client=ErrorCodes.INTERNAL_ERROR
            )
            return
        # Streams above last_stream_id were never processed: the client may retry them.
        self._refusing = True
        last = event.last_stream_id
        assert last is not None, "h2 sets it from every GOAWAY frame"
        for stream in list(self._streams.values()):
            if stream.sid is None or stream.sid > last:
                if stream.sid is None:
                    self._waiting.remove(stream)
                self._reset_for_server(stream.cid, ErrorCodes.REFUSED_STREAM)
                self._drop(stream, "refused: server going away")
        self.down.send_graceful_goaway(max(self._streams, default=0))

    # ---------------------------------------------------------- relaying

    def _flush(self, stream: Stream, to_server: bool) -> None:
        """Move queued items to the other connection as far as its windows allow."""
        try:
            self._flush_items(stream, to_server)
        except StreamClosedError:
            # The receiving peer reset this stream in the very read being
            # handled; its StreamReset event comes next and cleans up.
            pass

    def _flush_items(self, stream: Stream, to_server: bool) -> None:
        sid = stream.sid
        assert sid is not None, "only streams opened upstream are flushed"
        if to_server:
            pipe, out, out_id, inbound, in_id = (
                stream.to_server,
                self.up,
                sid,
                self.down,
                stream.cid,
            )
        else:
            pipe, out, out_id, inbound, in_id = (
                stream.to_client,
                self.down,
                stream.cid,
                self.up,
                sid,
            )
        items = pipe.items
        while items:
            item = items[0]
            kind = item[0]
            if kind == DATA:
                data = item[1]
                size = len(data)
                if size:
                    window = out.local_flow_control_window(out_id)
                    if window <= 0:
                        return
                    step = min(size, window, out.max_outbound_frame_size)
                else:
                    step = 0
                if step == size:
                    items.popleft()
                    acked = item[2]
                    end = bool(items) and items[0][0] == END
                    if end:
                        items.popleft()
                    if size or end:
                        out.send_data(out_id, data, end_stream=end)
                else:
                    view = data if type(data) is memoryview else memoryview(data)
                    items[0] = (DATA, view[step:], item[2] - step)
                    out.send_data(out_id, view[:step])
                    acked = step
                    end = False
                pipe.unacked -= acked
                if acked:
                    inbound.acknowledge_received_data(acked, in_id)
                if end:
                    self._ended(stream, to_server)
                    return
            elif kind == TRAILERS:
                items.popleft()
                out.send_headers(out_id, item[1], end_stream=True)
                if items and items[0][0] == END:
                    items.popleft()
                self._ended(stream, to_server)
                return
            elif kind == END:
                items.popleft()
                out.send_data(out_id, b"", end_stream=True)
                self._ended(stream, to_server)
                return
            else:  # RESET queued behind a complete response
                items.popleft()
                if to_server:
                    self._reset(out, out_id, item[1])
                else:
                    self._reset_for_server(out_id, item[1])
                self._drop(stream, "")
                return

    def _flush_all(self, to_server: bool) -> None:
        for stream in list(self._streams.values()):
            if to_server:
                if stream.sid is not None and stream.to_server.items:
                    self._flush(stream, True)
            elif stream.to_client.items:
                self._flush(stream, False)

    def _ended(self, stream: Stream, to_server: bool) -> None:
        if to_server:
            stream.request_done = True
        else:
            stream.response_done = True
            self._reply(stream, None)
        if stream.request_done and stream.response_done:
            self._guard.stream_completed()
            self._forget(stream)

    def _reply(self, stream: Stream, reset: str | None) -> None:
        if stream.replied:
            return
        stream.replied = True
        fields: dict[str, Any] = {"status": stream.status}
        if stream.grpc_in is not None and stream.grpc_out is not None:
            fields["grpc_status"] = stream.grpc_status
            fields["request_messages"] = stream.grpc_in.messages
            fields["response_messages"] = stream.grpc_out.messages
        if reset:
            fields["reset"] = reset
        self._out.append(Reply(stream.key, fields))

    def _forget(self, stream: Stream) -> None:
        self._streams.pop(stream.cid, None)
        if stream.sid is not None:
            self._by_sid.pop(stream.sid, None)
        if self._waiting:
            self._open_waiting()

    def _discard(self, stream: Stream, to_server: bool) -> None:
        """Drop a pipe's queued items, returning their bytes to the sender's connection window."""
        pipe = stream.to_server if to_server else stream.to_client
        if pipe.unacked:
            if to_server:
                self.down.acknowledge_received_data(pipe.unacked, stream.cid)
            elif stream.sid is not None:  # a response came, so the stream was opened
                self.up.acknowledge_received_data(pipe.unacked, stream.sid)
        pipe.unacked = 0
        pipe.items.clear()

    def _drop(self, stream: Stream, reason: str) -> None:
        self._discard(stream, True)
        if stream.sid is not None:
            self._discard(stream, False)
        if not stream.response_done:
            stream.response_done = True
            self._reply(stream, reason or None)
        stream.request_done = True
        self._forget(stream)

    @staticmethod
    def _reset(conn: RelayConnection, stream_id: int, code: ErrorCodes | int) -> None:
        try:
            conn.reset_stream(stream_id, code)
        except H2ProtocolError:
            pass  # already closed on that side: nothing to tell

    def _reset_for_server(self, cid: int, code: ErrorCodes | int) -> None:
        """Reset a client stream because of the server: not the client's doing, so
        not charged to its reset budget (it still counts as a control frame owed)."""
        before = self.down.resets_sent
        self._reset(self.down, cid, code)
        self._excused_resets += self.down.resets_sent - before

    # ----------------------------------------------------------- errors

    def _stream_error(self, side: str, stream_id: int, problem: str) -> None:
        """Malformed header section: RST_STREAM PROTOCOL_ERROR to the sender (RFC 9113 §8.1.1)."""
        if side == "client":
            self._reset(self.down, stream_id, ErrorCodes.PROTOCOL_ERROR)
            stream = self._streams.get(stream_id)
            if stream is not None:
                if stream.sid is None:
                    if stream in self._waiting:
                        self._waiting.remove(stream)
                else:
                    self._reset(self.up, stream.sid, ErrorCodes.CANCEL)
                self._drop(stream, "malformed request")
        else:
            self._reset(self.up, stream_id, ErrorCodes.PROTOCOL_ERROR)
            stream = self._by_sid.get(stream_id)
            if stream is not None:
                self._reset_for_server(stream.cid, ErrorCodes.INTERNAL_ERROR)
                self._drop(stream, "malformed response")
        error = ProtocolError(problem, code="h2_malformed_headers")
        self._out.append(ParseError(side, error, close=False))

    def _connection_error(self, side: str, exc: H2ProtocolError) -> list[Command]:
        """h2 has queued GOAWAY(code) toward the offender; tell the other peer and close."""
        code = getattr(exc, "error_code", None) or ErrorCodes.PROTOCOL_ERROR
        if side == "client":
            if self.down.state_machine.state is not ConnectionState.CLOSED:
                # h2 raises on a bad preface without queuing GOAWAY; RFC 9113 §3.4 allows
                # one. A flood budget is named in the debug data, as a timeout is.
                debug = exc.limit.encode("ascii") if isinstance(exc, FloodError) else None
                self.down.close_connection(code, additional_data=debug)
            wire = self.down.data_to_send()
            self._abort("", to_server=ErrorCodes.CANCEL, client_wire=wire)
        else:
            wire = self.up.data_to_send()
            self._abort("", to_client=ErrorCodes.INTERNAL_ERROR, server_wire=wire)
        out = self._out
        self._out = []
        message, kind = f"{exc} ({code_name(code)})", f"h2_{code_name(code).lower()}"
        error: ProtocolError
        if isinstance(exc, FloodError):
            error = LimitExceeded(message, limit=exc.limit, code=kind, wire_reply=wire)
        elif isinstance(exc, DenialOfServiceError) and side == "client":
            # h2 stopped decoding a header list past the hard cap.
            limit = "hard_header_list_size"
            error = LimitExceeded(message, limit=limit, code=kind, wire_reply=wire)
        else:
            error = ProtocolError(message, code=kind, wire_reply=wire)
        # _abort already queued the wire bytes and Close; the ParseError goes before Close.
        out.insert(len(out) - 1, ParseError(side, error, close=True))
        return out

    def _abort(
        self,
        reason: str,
        *,
        to_client: ErrorCodes | None = None,
        to_server: ErrorCodes | None = None,
        client_wire: bytes | None = None,
        server_wire: bytes | None = None,
    ) -> None:
        """Tear the connection down: reset every stream on the healthy side, GOAWAY, close."""
        for stream in list(self._streams.values()):
            self._reply(stream, "connection closed")
        self._streams.clear()
        self._by_sid.clear()
        self._waiting.clear()
        self._held = b""  # client input not yet processed: never will be
        if client_wire is None:
            if to_client is not None:
                self.down.close_connection(to_client)
            client_wire = self.down.data_to_send()
        if server_wire is None:
            if to_server is not None:
                self.up.close_connection(to_server)
            server_wire = self.up.data_to_send()
        if client_wire:
            self._out.append(ToClient(client_wire))
        if server_wire and self._preface_seen:
            self._out.append(ToServer(server_wire))
        self._dead = True
        self._out.append(Close(reason or "protocol error"))

    def _finish_on_eof(self, side: str) -> list[Command]:
        if side == "client":
            # The client can send nothing more, not even WINDOW_UPDATE: stop.
            self._abort(
                "client closed", to_server=ErrorCodes.CANCEL if self._streams else _NO_ERROR
            )
        elif not self._server_gone:
            self._server_closed()
            return self._drain()
        out = self._out
        self._out = []
        return out

    def _server_closed(self) -> None:
        """Server EOF. Responses it completed may still be waiting for the
        client's window: deliver those, reset the rest, refuse new streams."""
        self._server_gone = True
        self._refusing = True
        waiting, self._waiting = self._waiting, []
        for stream in waiting:
            self._reset_for_server(stream.cid, ErrorCodes.REFUSED_STREAM)  # never reached it
            self._drop(stream, "server closed")
        for stream in list(self._streams.values()):
            items = stream.to_client.items
            complete = stream.response_done or (items and items[-1][0] in (END, TRAILERS, RESET))
            if not complete:
                self._reset_for_server(stream.cid, ErrorCodes.INTERNAL_ERROR)
                self._drop(stream, "server closed")
            elif not stream.request_done:
                self._discard(stream, True)
                stream.request_done = True
                if stream.response_done:
                    self._forget(stream)
        self.down.send_graceful_goaway(max(self._streams, default=0))


# What the engine does with each h2 event, per side. Kept here rather than as
# tables of bound methods on each engine, which would be a reference cycle (freed
# only by the cyclic collector, long after the connection ends).
Handler = Callable[[H2Engine, Any], None]
CLIENT_HANDLERS: dict[type[ev.Event], Handler] = {
    ev.RequestReceived: H2Engine._on_request,
    ev.DataReceived: H2Engine._on_client_data,
    ev.StreamEnded: H2Engine._on_client_end,
    ev.TrailersReceived: H2Engine._on_client_trailers,
    ev.StreamReset: H2Engine._on_client_reset,
    ev.WindowUpdated: H2Engine._on_client_window,
    ev.RemoteSettingsChanged: H2Engine._on_client_settings,
    ev.SettingsAcknowledged: H2Engine._on_settings_ack,
    ev.ConnectionTerminated: H2Engine._on_client_goaway,
    ev.PingAckReceived: H2Engine._on_client_ping_ack,
    MalformedStream: H2Engine._on_client_malformed,
}
SERVER_HANDLERS: dict[type[ev.Event], Handler] = {
    ev.ResponseReceived: H2Engine._on_response,
    ev.InformationalResponseReceived: H2Engine._on_informational,
    ev.DataReceived: H2Engine._on_server_data,
    ev.StreamEnded: H2Engine._on_server_end,
    ev.TrailersReceived: H2Engine._on_server_trailers,
    ev.StreamReset: H2Engine._on_server_reset,
    ev.WindowUpdated: H2Engine._on_server_window,
    ev.RemoteSettingsChanged: H2Engine._on_server_settings,
    ev.ConnectionTerminated: H2Engine._on_server_goaway,
    MalformedStream: H2Engine._on_server_malformed,
}
