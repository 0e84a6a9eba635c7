"""HTTP/2 (and gRPC over it) relayed frame by frame, judged per stream.

``H2Engine`` sits between a client and a server and speaks HTTP/2 to each,
but it does not terminate the protocol twice. It reads each frame's 9-byte
header, keeps the state RFC 9113 asks of an endpoint (stream states, the
flow-control windows of both hops, the header block being received), and
forwards most frames as they arrived: DATA, trailers, response HEADERS.

* **Request HEADERS** are decoded (HPACK), validated and judged. An allowed
  request keeps its stream id on the server hop and its header block goes on
  byte for byte, which ``SETTINGS_HEADER_TABLE_SIZE = 0`` toward both peers
  makes possible (``parsers/http2/blocks.py``); a block that used a dynamic
  table (before the peer acknowledged the setting, or a policy edit) is
  re-encoded instead. A denied request's headers and body never leave the proxy.
* **Flow control is end to end, and the window toward a sender follows its
  receiver's.** A sender is granted the relay's own buffer (``stream_window``,
  ``connection_window``) plus what the receiver grants: its initial window and
  every WINDOW_UPDATE it sends, passed on in batches (a quarter of the buffer),
  not per frame. Forwarding a byte credits nothing by itself. So a fast
  receiver gets a pipe as deep as its own window, and one that stops reading
  stops the sender with at most the buffer held (``parsers/http2/streams.py``).
  Connection-wide, credit also stays within ``connection_window_cap``.
* **Errors** follow RFC 9113 §5.4: a malformed request or response is a stream
  error (RST_STREAM PROTOCOL_ERROR, the connection lives on); framing, HPACK
  and flow-control violations are connection errors (GOAWAY, then close).
* **Floods and fairness** (``parsers/http2/floods.py``): each client frame
  header is checked against the connection's flood budgets before the frame
  is processed, and one call processes a bounded number of client frames; a
  turn that leaves input over ends with ``Yield``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any

from h2.errors import ErrorCodes

from parsers.base import (
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
    WireData,
    Yield,
    new_access,
    new_reply,
    new_to_client,
    new_to_server,
)
from parsers.http2.blocks import BlockDecoder, CompressionError, HeaderListTooLarge, encode_block
from parsers.http2.floods import GUARDED_FRAMES, FloodError, FloodGuard
from parsers.http2.frames import (
    ACK,
    CONTINUATION,
    ENABLE_PUSH,
    END_HEADERS,
    END_STREAM,
    FRAME_HEADER_LENGTH,
    GOAWAY,
    HEADER_TABLE_SIZE,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    MAX_WINDOW,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ACK,
    UNLIMITED,
    WINDOW_UPDATE,
    ConnectionError_,
    code_name,
    decode_settings_header,
    goaway,
    headers_frames,
    parse_settings,
    ping,
    relayed_code,
    rst_stream,
    settings_frame,
    window_update,
)
from parsers.http2.frames import DATA as DATA_FRAME
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
from parsers.http2.streams import DATA, RESET, TRAILERS, Flow, Hop, Stream
from parsers.requests import GrpcCall, HttpRequest

__all__ = ["PREFACE", "FINISH_PING", "MAX_STREAM_ID", "H2Engine", "H2Limits"]


@dataclass(frozen=True, slots=True)
class H2Limits:
    """What the proxy advertises and enforces.

    The windows are the relay's buffer, not a cap on the pipe's depth: a sender
    is granted them plus what its receiver grants (see the module's docstring).
    So a receiver that reads nothing costs at most ``stream_window`` per stream,
    and per connection and direction ``connection_window`` plus its initial
    connection window; whatever a receiver grants, never more than
    ``connection_window_cap``.
    """

    max_concurrent_streams: int = 128
    stream_window: int = 1024 * 1024
    connection_window: int = 1024 * 1024
    # What one sender may still send plus what the relay holds of it, per
    # connection, whatever the receiver grants: a receiver that opens its
    # connection window and keeps its stream windows shut would otherwise make
    # the relay hold stream_window on every stream.
    connection_window_cap: int = 4 * 1024 * 1024
    max_frame_size: int = 16384
    # A server DATA frame at least this long is relayed with the DATA frames of
    # its stream behind it in the read, in one step: a download's frames (16 KiB
    # from nghttpd, grpcio, Go). A small response's one DATA frame costs less
    # frame by frame. (The relay's cost, not a limit on the peers.)
    run_frame_size: int = 4096
    # Above the advertised size a request gets 431 (a stream error, HPACK state
    # intact); above the hard cap decoding stops: connection error.
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
    # Fairness: one turn of the event loop processes at most this many client
    # frames, or payload bytes of frames other than DATA (at least one frame).
    frames_per_turn: int = 128
    bytes_per_turn: int = 512

    def __post_init__(self) -> None:
        if self.connection_window_cap < self.connection_window:
            raise ValueError("connection_window_cap is below connection_window")


_NO_ERROR = ErrorCodes.NO_ERROR
_PROTOCOL_ERROR = ErrorCodes.PROTOCOL_ERROR
_STREAM_CLOSED = ErrorCodes.STREAM_CLOSED
_FLOW_CONTROL_ERROR = ErrorCodes.FLOW_CONTROL_ERROR
_FRAME_SIZE_ERROR = ErrorCodes.FRAME_SIZE_ERROR
_CANCEL = ErrorCodes.CANCEL
_REFUSED_STREAM = ErrorCodes.REFUSED_STREAM
_INTERNAL_ERROR = ErrorCodes.INTERNAL_ERROR
# finish(): the first GOAWAY's last stream id (RFC 9113 6.8), and our PING's payload
# (the flood guard's round-trip PINGs carry other data).
MAX_STREAM_ID = 2**31 - 1
FINISH_PING = b"l7finish"
_STREAM_ID_MASK = 0x7FFFFFFF

# How a stream no longer in the map ended, remembered for the last 4,096 to 8,192:
# frames the client had in flight when we reset a stream are ignored (RFC 9113
# §5.1); frames on a stream that ended otherwise are STREAM_CLOSED.
_RESET_BY_US, _CLOSED = 1, 2
_CLOSED_MEMORY = 4096

# What a request header block was judged to be: (why it is malformed or None,
# header list size, content-length, typed request).
_Judged = tuple[str | None, int, int | None, HttpRequest | GrpcCall | None]
# Header blocks remembered per connection and direction, by their bytes, with the
# decoder generation they decode at (see parsers/http2/blocks.py).
_MEMO_ENTRIES = 256
_MEMO_BLOCK_BYTES = 4096


class _Block:
    """A header block being received: HEADERS, then CONTINUATION until END_HEADERS."""

    __slots__ = ("sid", "flags", "fragments", "frames", "size", "self_dependent")

    def __init__(self, sid: int, flags: int, self_dependent: bool) -> None:
        self.sid = sid
        self.flags = flags
        self.fragments: list[Any] = []
        # A response block's frames, forwarded as they came if it is self-contained
        # (a request block is re-encoded: its frames are not kept).
        self.frames: list[Any] = []
        self.size = 0
        self.self_dependent = self_dependent


def _content_length(headers: Headers) -> int | None:
    """content-length, or None; -1 when present but not one non-negative integer."""
    value = None
    for name, field in headers:
        if name == b"content-length":
            if value is not None and field != value:
                return -1
            value = field
    if value is None:
        return None
    return int(value) if value.isdigit() else -1


# What a response header block says, worked out once per distinct block: (headers,
# self-contained, why it is malformed as a response, as trailers, :status,
# content-length, grpc-status).
_ResponseBlock = tuple[Headers, bool, str | None, str | None, int, int | None, int | None]


def _read_response_block(headers: Headers, self_contained: bool) -> _ResponseBlock:
    as_response = response_problem(headers)
    status = 0 if as_response is not None else int(headers[0][1])  # :status comes first
    length = _content_length(headers)
    if length == -1 and as_response is None:
        as_response = "invalid content-length"
    grpc_status = int_or_none(headers_value(headers, b"grpc-status"))
    return (
        headers,
        self_contained,
        as_response,
        trailers_problem(headers),
        status,
        length,
        grpc_status,
    )


def _split_header_payload(flags: int, sid: int, payload: memoryview) -> tuple[memoryview, bool]:
    """(the header block fragment, whether the stream depends on itself) of a HEADERS frame."""
    start, end = 0, len(payload)
    pad = 0
    if flags & PADDED:
        if end < 1:
            raise ConnectionError_(_FRAME_SIZE_ERROR, "PADDED HEADERS without a pad length")
        pad = payload[0]
        start = 1
    self_dependent = False
    if flags & PRIORITY_FLAG:
        if end - start < 5:
            raise ConnectionError_(_FRAME_SIZE_ERROR, "HEADERS too short for its priority")
        dependency = int.from_bytes(payload[start : start + 4], "big") & _STREAM_ID_MASK
        self_dependent = dependency == sid
        start += 5
    if pad > end - start:
        raise ConnectionError_(_PROTOCOL_ERROR, "HEADERS padding longer than the frame")
    return payload[start : end - pad], self_dependent


def _data_payload(flags: int, payload: memoryview) -> memoryview:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise ConnectionError_(_PROTOCOL_ERROR, "DATA padding longer than the frame")
    return payload[1 : len(payload) - payload[0]]


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
        self._streams: dict[int, Stream] = {}
        self._waiting: deque[Stream] = deque()  # allowed, waiting for an upstream slot
        self._upstream_open = 0  # streams opened upstream and not yet closed there
        self._closed: dict[int, int] = {}  # recently ended client streams: how
        self._out: list[Command] = []
        # Each peer's connection as the relay sees it (windows, frame size, output).
        self._client = Hop()
        self._server = Hop()
        self._dead = False
        self._refusing = False  # a GOAWAY was seen: no new streams
        self._server_gone = False  # server EOF: finish delivering complete responses only
        # finish(): GOAWAY(2^31-1) and PING sent; the final GOAWAY's last stream id
        # once sent (streams above it are refused); Finished said.
        self._finishing = False
        self._goaway_last: int | None = None
        self._finished = False
        self._quarter_stream = max(1, limits.stream_window // 4)
        self._quarter_connection = max(1, limits.connection_window // 4)
        self._cap = limits.connection_window_cap

        # ---- the client hop
        self._client_in: bytes | memoryview = b""  # input not yet processed
        self._preface_read = False
        self._client_settings_seen = False  # the client's first SETTINGS: HTTP/2 for sure
        self._client_block: _Block | None = None
        self._client_decoder = BlockDecoder(limits.hard_header_list_size, zero_table=False)
        self._highest = 0  # highest client stream id seen
        self._frames_read = 0
        self._paused = False  # a turn ended with client input left over
        # block -> (generation, headers, judged, the block re-encoded for the server)
        self._requests: dict[bytes, tuple[int, Headers, _Judged, bytes | None]] = {}
        self._resets_sent = 0  # RST_STREAM frames toward the client
        self._excused_resets = 0  # of them, those the server caused
        self._guard = FloodGuard(
            max_stream_resets=limits.max_stream_resets,
            max_ping_frames=limits.max_ping_frames,
            max_settings_frames=limits.max_settings_frames,
            max_outbound_control_frames=limits.max_outbound_control_frames,
            streams=self._streams,
        )

        # ---- the server hop
        self._server_in: bytes | memoryview = b""
        self._server_started = False  # our preface went (goes) out
        self._server_block: _Block | None = None
        self._server_decoder = BlockDecoder(limits.hard_header_list_size, zero_table=True)
        self._server_acked = False
        self._server_max_streams = UNLIMITED
        self._server_max_header_list = UNLIMITED
        self._highest_opened = 0
        # block -> (generation, what it says)
        self._responses: dict[bytes, tuple[int, _ResponseBlock]] = {}

        self._setup(upgrade_settings)

    def _setup(self, upgrade_settings: bytes | None) -> None:
        lim = self._limits
        ours = {
            MAX_CONCURRENT_STREAMS: lim.max_concurrent_streams,
            INITIAL_WINDOW_SIZE: lim.stream_window,
            MAX_FRAME_SIZE: lim.max_frame_size,
            MAX_HEADER_LIST_SIZE: lim.max_header_list_size,
        }
        self._client.out.append(settings_frame(ours))
        self._client.advertised = lim.stream_window
        # Due to the client, connection-wide: the buffer, then the server's grants
        # (its initial connection window is the default, counted in ``owed``'s start).
        self._owe(self._client, lim.connection_window)
        if upgrade_settings is None:
            return
        # h2c: the client's HTTP2-Settings are its settings toward us, and, until
        # our own SETTINGS frame reaches the server, ours toward the server too.
        client_values = dict(decode_settings_header(upgrade_settings))
        self._apply_client_settings(client_values.items())
        self._server.advertised = self._client.initial
        # Stream 1's response: the server starts from the client's window, and
        # the buffer is due to it (it comes with our SETTINGS, _start_server).
        upgraded = self._new_stream(1, grpc=False)
        upgraded.request.open = False
        upgraded.request.done = True
        upgraded.replied = True  # the HTTP/1.1 engine judged and logs this one
        upgraded.opened = True
        self._streams[1] = upgraded
        self._upstream_open = 1
        self._highest = self._highest_opened = 1

    def _start_server(self) -> None:
        """Our preface, SETTINGS and connection window toward the server.

        The client's settings are in by now, so a response stream's window is
        the buffer plus the client's initial window from the start."""
        lim = self._limits
        server = self._server
        advertised = min(lim.stream_window + self._client.initial, MAX_WINDOW)
        ours = {
            HEADER_TABLE_SIZE: 0,
            ENABLE_PUSH: 0,
            INITIAL_WINDOW_SIZE: advertised,
            MAX_FRAME_SIZE: lim.max_frame_size,
            MAX_HEADER_LIST_SIZE: lim.max_header_list_size,
        }
        # Anything queued before (acknowledging the server's early SETTINGS) follows.
        server.out[:0] = [PREFACE, settings_frame(ours)]
        self._server_started = True
        # Our SETTINGS change the window of a stream already open (h2c's stream 1).
        delta = advertised - server.advertised
        server.advertised = advertised
        for stream in self._streams.values():
            stream.response.credit += delta
            stream.response.owed -= delta
        self._owe(server, lim.connection_window)

    # ------------------------------------------------------------ Engine API

    @property
    def reading_headers(self) -> bool:
        """Until the client's preface and SETTINGS are in, while a request header
        block waits for its CONTINUATION frames, and while any frame but DATA is
        partly received (a frame header not yet whole counts)."""
        if self._dead:
            return False
        if not self._client_settings_seen or self._client_block is not None:
            return True
        pending = self._client_in
        if not pending or self._paused:
            return False
        return len(pending) < FRAME_HEADER_LENGTH or pending[3] != DATA_FRAME

    @property
    def reading_body(self) -> bool:
        """While a DATA frame is partly received."""
        if self._dead or not self._client_settings_seen or self._paused:
            return False
        pending = self._client_in
        return len(pending) >= FRAME_HEADER_LENGTH and pending[3] == DATA_FRAME

    @property
    def heads_read(self) -> int:
        return self._frames_read

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
        self._client.out.append(goaway(self._highest, _NO_ERROR, limit.encode("ascii")))
        self._abort(limit, to_server=_CANCEL if self._streams else _NO_ERROR)
        return self._take()

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
        self._client.out.append(goaway(MAX_STREAM_ID, _NO_ERROR))
        self._client.out.append(ping(FINISH_PING))
        return self._drain()

    def client_data(self, data: bytes) -> list[Command]:
        if self._dead:
            return []
        if not data:
            return self._finish_on_eof("client")
        # Input while a turn is still due comes only from a driver that read on
        # after a Yield: it queues behind, in order.
        pending = self._client_in
        if not pending:
            self._client_in = data
            return self._client_turn()
        take = FRAME_HEADER_LENGTH + self._limits.max_frame_size - len(pending)
        if self._paused or not self._preface_read or len(data) <= take:
            self._client_in = b"".join((pending, data))
            return self._client_turn()
        # As server_data: the frame the last read left unfinished is completed
        # with the bytes it lacks, then the rest of the read is read in place.
        self._client_in = b"".join((pending, memoryview(data)[:take]))
        return self._client_turn(data, take)

    def _resume_client(self) -> list[Command]:
        """``Yield.resume``: the next turn of the client's held input."""
        if self._dead or not self._paused:
            return []
        return self._client_turn()

    def _client_turn(self, rest: bytes | None = None, take: int = 0) -> list[Command]:
        """One turn over the client's input; with ``rest``, ``_client_in`` holds a
        cut frame completed with ``rest[:take]``, and the turn goes on into ``rest``."""
        lim = self._limits
        try:
            budget = self._read_client(lim.frames_per_turn, lim.bytes_per_turn)
            if rest is not None and not self._dead:
                # What the first part left over starts inside ``rest[:take]``: the
                # completed frame was whole within it (or the read failed).
                self._client_in = memoryview(rest)[take - len(self._client_in) :]
                if not self._paused:
                    self._read_client(*budget)
        except FloodError as exc:
            _forget_frames(exc)
            return self._client_connection_error(ErrorCodes.ENHANCE_YOUR_CALM, str(exc), exc.limit)
        except ConnectionError_ as exc:
            _forget_frames(exc)
            return self._client_connection_error(exc.code, str(exc))
        if self._dead:
            return self._take()
        guard = self._guard
        flood = guard.sync(self._resets_sent, self._resets_sent - self._excused_resets)
        if flood is not None:
            return self._client_connection_error(
                ErrorCodes.ENHANCE_YOUR_CALM, str(flood), flood.limit
            )
        if guard.barrier_due():
            self._client.out.append(ping(guard.open_barrier()))
        out = self._drain()
        if self._paused and not self._dead:
            out.append(Yield(self._resume_client))
        return out

    def server_data(self, data: bytes) -> list[Command]:
        if self._dead:
            return []
        if not data:
            return self._finish_on_eof("server")
        pending = self._server_in
        try:
            if not pending:
                self._server_in = data
                self._read_server()
            else:
                self._read_server_after_cut(pending, data)
        except ConnectionError_ as exc:
            _forget_frames(exc)
            return self._server_connection_error(exc.code, str(exc))
        if self._dead:
            return self._take()
        return self._drain()

    def _read_server_after_cut(self, pending: bytes | memoryview, data: bytes) -> None:
        """A read after one that ended inside a frame (``pending``, its start).

        Reads end mid-frame as often as not in a download, so nothing here copies
        the read. Most often the unfinished frame is DATA that goes on as it is:
        it leaves in two pieces, the run of frames behind it with it. Otherwise
        it is completed with the few bytes it lacks (a frame is at most
        max_frame_size), then the rest is read in place."""
        view = memoryview(data)
        if (
            len(pending) >= FRAME_HEADER_LENGTH
            and pending[3] == DATA_FRAME
            and self._server_block is None
        ):
            after = self._relay_server_run(view, 0, len(view), memoryview(pending))
            if after >= 0:
                self._server_in = view[after:] if after < len(view) else b""
                if self._server_in:
                    self._read_server()
                return
        take = FRAME_HEADER_LENGTH + self._limits.max_frame_size - len(pending)
        self._server_in = b"".join((pending, view[:take]))
        self._read_server()
        if len(data) > take and not self._dead:
            # The unfinished frame was whole within ``take``: what is left over
            # starts inside this read.
            self._server_in = view[take - len(self._server_in) :]
            self._read_server()

    # ------------------------------------------------------------ output

    def _take(self) -> list[Command]:
        out = self._out
        self._out = []
        return out

    def _drain(self) -> list[Command]:
        out = self._out
        self._out = []
        if self._client.out:
            _gather(self._client.out, new_to_client, out)
        if self._server.out:
            # Nothing goes upstream before the client has shown it speaks HTTP/2,
            # nor to a server that has closed.
            if self._server_gone:
                self._server.out.clear()
            elif self._server_started:
                _gather(self._server.out, new_to_server, out)
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

    # ------------------------------------------------------------ client frames

    def _read_client(self, frames_left: int, bytes_left: int) -> tuple[int, int]:
        """The client's frames in ``_client_in``, within what is left of the turn's
        frames and non-DATA bytes; returns what is left of them."""
        self._paused = False
        buf = self._client_in
        view = buf if type(buf) is memoryview else memoryview(buf)
        end = len(view)
        pos = 0
        if not self._preface_read:
            if end < len(PREFACE):
                if bytes(view) != PREFACE[:end]:
                    raise ConnectionError_(_PROTOCOL_ERROR, "invalid connection preface")
                return frames_left, bytes_left
            if view[: len(PREFACE)] != PREFACE:
                raise ConnectionError_(_PROTOCOL_ERROR, "invalid connection preface")
            self._preface_read = True
            pos = len(PREFACE)
        lim = self._limits
        max_frame = lim.max_frame_size
        guard = self._guard
        handlers = CLIENT_FRAMES
        from_bytes = int.from_bytes
        try:
            while end - pos >= FRAME_HEADER_LENGTH:
                if frames_left <= 0 or bytes_left <= 0:
                    self._paused = True
                    break
                # The 9-byte frame header as one number: one call, not five reads.
                header = from_bytes(view[pos : pos + FRAME_HEADER_LENGTH], "big")
                length = header >> 48
                if length > max_frame:
                    raise ConnectionError_(
                        _FRAME_SIZE_ERROR, f"frame of {length} bytes (limit {max_frame})"
                    )
                if end - pos - FRAME_HEADER_LENGTH < length:
                    self._check_parked_block(length)
                    break
                frame_type = (header >> 40) & 0xFF
                flags = (header >> 32) & 0xFF
                sid = header & _STREAM_ID_MASK
                if frame_type != DATA_FRAME:
                    if frame_type in GUARDED_FRAMES:
                        flood = guard.inbound(frame_type, flags, sid)
                        if flood is not None:
                            raise flood
                    bytes_left -= length
                frames_left -= 1
                start = pos
                pos += FRAME_HEADER_LENGTH + length
                if not self._client_settings_seen and (frame_type != SETTINGS or flags & ACK):
                    raise ConnectionError_(
                        _PROTOCOL_ERROR, "the preface is not followed by SETTINGS"
                    )
                if self._client_block is not None and frame_type != CONTINUATION:
                    raise ConnectionError_(
                        _PROTOCOL_ERROR, "a frame other than CONTINUATION inside a header block"
                    )
                handler = handlers.get(frame_type)
                if handler is not None:
                    handler(
                        self, flags, sid, view[start + FRAME_HEADER_LENGTH : pos], view[start:pos]
                    )
                    if self._dead:
                        break
                else:
                    self._frames_read += 1  # unknown frame types are ignored (RFC 9113 §5.5)
        finally:
            self._client_in = view[pos:] if pos < end else b""
        return frames_left, bytes_left

    def _check_parked_block(self, incoming: int) -> None:
        block = self._client_block
        if block is not None and block.size + incoming > self._limits.hard_header_list_size:
            raise FloodError(
                "hard_header_list_size",
                f"header block of {block.size + incoming} bytes still without END_HEADERS "
                f"(limit {self._limits.hard_header_list_size})",
            )

    def _client_data_frame(
        self, flags: int, sid: int, payload: memoryview, raw: memoryview
    ) -> None:
        self._frames_read += 1
        if sid == 0:
            raise ConnectionError_(_PROTOCOL_ERROR, "DATA on stream 0")
        client = self._client
        client.credit -= len(payload)
        if client.credit < 0:
            raise ConnectionError_(_FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        stream = self._streams.get(sid)
        if stream is None or not stream.request.open:
            self._owe(client, len(payload))
            self._frame_on_closed(sid, stream, "DATA")
            return
        self._data(stream, stream.request, "client", flags, payload, raw)

    def _client_headers_frame(
        self, flags: int, sid: int, payload: memoryview, raw: memoryview
    ) -> None:
        if sid == 0:
            raise ConnectionError_(_PROTOCOL_ERROR, "HEADERS on stream 0")
        if not sid & 1:
            raise ConnectionError_(_PROTOCOL_ERROR, f"client stream id {sid} is even")
        if flags & (PADDED | PRIORITY_FLAG):
            fragment, self_dependent = _split_header_payload(flags, sid, payload)
        else:
            fragment, self_dependent = payload, False
        if flags & END_HEADERS:
            self._frames_read += 1
            self._client_header_block(sid, flags, bytes(fragment), self_dependent)
            return
        block = self._client_block = _Block(sid, flags, self_dependent)
        block.fragments.append(fragment)
        block.size = len(fragment)

    def _client_continuation(
        self, flags: int, sid: int, payload: memoryview, raw: memoryview
    ) -> None:
        block = self._client_block
        if block is None:
            raise ConnectionError_(_PROTOCOL_ERROR, "CONTINUATION without a header block")
        if sid != block.sid:
            raise ConnectionError_(_PROTOCOL_ERROR, "CONTINUATION on another stream")
        block.fragments.append(payload)
        block.size += len(payload)
        if block.size > self._limits.hard_header_list_size:
            self._check_parked_block(0)
        if flags & END_HEADERS:
            self._client_block = None
            self._frames_read += 1
            whole = b"".join(block.fragments)
            self._client_header_block(sid, block.flags, whole, block.self_dependent)

    def _client_header_block(
        self, sid: int, flags: int, block: bytes, self_dependent: bool
    ) -> None:
        end = bool(flags & END_STREAM)
        decoder = self._client_decoder
        generation = decoder.generation
        known = self._requests.get(block)
        judged: _Judged | None = None
        encoded: bytes | None = None
        if known is not None and known[0] == generation:
            _, headers, judged, encoded = known
        else:
            headers = self._decode_client(block)
        stream = self._streams.get(sid)
        if stream is not None:
            self._client_trailers(stream, end, headers)
            return
        if sid <= self._highest:
            how = self._closed.get(sid)
            if how == _RESET_BY_US:
                return  # in flight when we reset it
            if how is not None:
                raise ConnectionError_(_STREAM_CLOSED, f"HEADERS on closed stream {sid}")
            raise ConnectionError_(_PROTOCOL_ERROR, f"stream id {sid} below one already used")
        self._highest = sid
        if self._refusing or (self._goaway_last is not None and sid > self._goaway_last):
            self._reset_client(sid, _REFUSED_STREAM)
            return
        if len(self._streams) >= self._limits.max_concurrent_streams:
            self._reset_client(sid, _REFUSED_STREAM)  # RFC 9113 §5.1.2: a stream error
            return
        if self_dependent:
            self._client_stream_error(sid, _PROTOCOL_ERROR, "stream depends on itself")
            return
        if judged is None:
            judged = self._judge(headers)
            encoded = encode_block(headers) if judged[0] is None else b""
            if decoder.generation == generation and len(block) <= _MEMO_BLOCK_BYTES:
                memo = self._requests
                if len(memo) >= _MEMO_ENTRIES:
                    memo.clear()
                memo[block] = (generation, headers, judged, encoded)
        problem, size, length, request = judged
        if problem is not None or request is None:
            self._malformed("client", sid, problem or "malformed request")
            return
        if size > self._limits.max_header_list_size:
            self._answer(sid, end, *http_denial(431, b"Request header fields too large"))
            self._out.append(
                ParseError(
                    "client",
                    ProtocolError(f"header list of {size} bytes", code="header_list_too_large"),
                    close=False,
                )
            )
            return
        grpc = type(request) is GrpcCall
        decision = self._decide(request)
        self._out.append(new_access(request, decision, sid))
        if not decision.allowed:
            self._deny(sid, end, decision, grpc)
            return
        if decision.edits:
            edited = apply_edits(headers, decision.edits)
            size = header_list_size(edited)
            encoded = encode_block(edited)
        if size > self._server_max_header_list:
            self._answer(sid, end, *http_denial(431, b"Request header fields too large"))
            self._out.append(Reply(sid, {"status": 431}))
            return
        stream = self._new_stream(sid, grpc)
        stream.request.length = length
        stream.request.open = not end
        self._streams[sid] = stream
        assert encoded is not None, "a judged request has its block re-encoded"
        held = headers_frames(sid, encoded, end, self._server.max_frame)
        if self._waiting or self._upstream_open >= self._server_max_streams:
            stream.held = held
            self._waiting.append(stream)
        else:
            self._open(stream, held)

    def _decode_client(self, block: bytes) -> Headers:
        try:
            return self._client_decoder.decode(block)[0]
        except CompressionError as exc:
            raise ConnectionError_(ErrorCodes.COMPRESSION_ERROR, str(exc)) from exc
        except HeaderListTooLarge as exc:
            raise FloodError("hard_header_list_size", str(exc)) from exc

    @staticmethod
    def _judge(headers: Headers) -> _Judged:
        problem = request_problem(headers)
        if problem is not None:
            return problem, 0, None, None
        length = _content_length(headers)
        if length == -1:
            return "invalid content-length", 0, None, None
        return None, header_list_size(headers), length, build_request(headers)

    def _client_trailers(self, stream: Stream, end: bool, headers: Headers) -> None:
        sid = stream.sid
        if not stream.request.open:
            self._client_stream_error(sid, _STREAM_CLOSED, "HEADERS after END_STREAM")
            return
        if not end:
            self._malformed("client", sid, "trailers without END_STREAM")
            return
        problem = trailers_problem(headers)
        if problem is None and stream.request.length is not None:
            if stream.request.seen != stream.request.length:
                problem = "body shorter than its content-length"
        if problem is not None:
            self._malformed("client", sid, problem)
            return
        stream.request.open = False
        framed = headers_frames(sid, encode_block(headers), True, self._server.max_frame)
        if stream.opened and not stream.request.queue:
            self._server.out.append(framed)
            self._flow_done(stream, stream.request)
            return
        queue = stream.request.queue
        if queue is None:
            queue = stream.request.queue = deque()
        queue.append((TRAILERS, framed))

    def _client_priority(self, flags: int, sid: int, payload: memoryview, raw: memoryview) -> None:
        self._frames_read += 1
        if sid == 0:
            raise ConnectionError_(_PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self._client_stream_error(sid, _FRAME_SIZE_ERROR, "PRIORITY frame of the wrong size")
            return
        if int.from_bytes(payload[:4], "big") & _STREAM_ID_MASK == sid:
            self._client_stream_error(sid, _PROTOCOL_ERROR, "stream depends on itself")
        # Otherwise ignored: RFC 9113 deprecates the priority scheme, and the
        # server schedules its own responses.

    def _client_rst_stream(
        self, flags: int, sid: int, payload: memoryview, raw: memoryview
    ) -> None:
        self._frames_read += 1
        if len(payload) != 4:
            raise ConnectionError_(_FRAME_SIZE_ERROR, "RST_STREAM frame of the wrong size")
        if sid == 0:
            raise ConnectionError_(_PROTOCOL_ERROR, "RST_STREAM on stream 0")
        stream = self._streams.get(sid)
        if stream is None:
            if sid > self._highest:
                raise ConnectionError_(_PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return
        code = int.from_bytes(payload, "big")
        if not stream.opened:
            self._unwait(stream)
        elif not (stream.request.done and stream.response.done):
            self._reset_server(sid, relayed_code(code))
        self._drop(stream, f"client reset {code_name(code)}", _CLOSED)

    def _client_settings(self, flags: int, sid: int, payload: memoryview, raw: memoryview) -> None:
        self._frames_read += 1
        if sid != 0:
            raise ConnectionError_(_PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionError_(_FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        grew = self._apply_client_settings(parse_settings(payload))
        # The ACK goes before anything sent under the new settings: until it arrives,
        # the client holds what it receives to the old ones (grpcio resets a stream
        # whose DATA overflows the window it last saw acknowledged).
        self._client.out.append(SETTINGS_ACK)
        if grew:
            self._flush_all(self._client)
        if not self._client_settings_seen:
            self._client_settings_seen = True
            self._start_server()

    def _apply_client_settings(self, pairs: Any) -> bool:
        """True when the streams' windows toward the client grew: what waits for them
        may go on (after the settings' ACK)."""
        before = self._client.initial
        for key, value in pairs:
            if key == INITIAL_WINDOW_SIZE:
                delta = value - self._client.initial
                self._client.initial = value
                if delta:
                    # Passed on to the server as stream credit (a debt when negative);
                    # before our SETTINGS went, they carry it (_start_server).
                    for stream in self._streams.values():
                        response = stream.response
                        response.window += delta
                        if response.window > MAX_WINDOW:
                            raise ConnectionError_(
                                _FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE overflows a window"
                            )
                        if self._server_started:
                            self._owe_stream(stream, response, delta)
                        else:
                            response.owed += delta
            elif key == MAX_FRAME_SIZE:
                self._client.max_frame = value
            # HEADER_TABLE_SIZE needs nothing: what we encode never indexes.
        return self._client.initial > before

    def _client_ping(self, flags: int, sid: int, payload: memoryview, raw: memoryview) -> None:
        self._frames_read += 1
        if sid != 0:
            raise ConnectionError_(_PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ConnectionError_(_FRAME_SIZE_ERROR, "PING frame of the wrong size")
        if not flags & ACK:
            self._client.out.append(ping(bytes(payload), ack=True))
            return
        opaque = bytes(payload)
        if opaque == FINISH_PING and self._finishing and self._goaway_last is None:
            # finish()'s round trip is over: the final GOAWAY. Streams above its id
            # arrived after the client read the first one: refused.
            self._goaway_last = self._highest
            self._client.out.append(goaway(self._goaway_last, _NO_ERROR))
            return
        self._guard.acknowledged(opaque)

    def _client_goaway(self, flags: int, sid: int, payload: memoryview, raw: memoryview) -> None:
        self._frames_read += 1
        if sid != 0:
            raise ConnectionError_(_PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise ConnectionError_(_FRAME_SIZE_ERROR, "GOAWAY frame too short")
        code = int.from_bytes(payload[4:8], "big")
        if code != _NO_ERROR:
            self._abort(f"client GOAWAY {code_name(code)}", to_server=_CANCEL)
            return
        if not self._refusing:
            self._refusing = True
            self._server.out.append(goaway(0, _NO_ERROR))

    def _client_window_update(
        self, flags: int, sid: int, payload: memoryview, raw: memoryview
    ) -> None:
        self._frames_read += 1
        if len(payload) != 4:
            raise ConnectionError_(_FRAME_SIZE_ERROR, "WINDOW_UPDATE frame of the wrong size")
        increment = int.from_bytes(payload, "big") & _STREAM_ID_MASK
        if sid == 0:
            if not increment:
                raise ConnectionError_(_PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._client.window += increment
            if self._client.window > MAX_WINDOW:
                raise ConnectionError_(_FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._owe(self._server, increment)
            self._flush_all(self._client)
            return
        stream = self._streams.get(sid)
        if stream is None:
            if sid > self._highest:
                raise ConnectionError_(_PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        if not increment:
            self._client_stream_error(sid, _PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            return
        stream.response.window += increment
        if stream.response.window > MAX_WINDOW:
            self._client_stream_error(sid, _FLOW_CONTROL_ERROR, "stream window above 2^31-1")
            return
        self._owe_stream(stream, stream.response, increment)
        if stream.response.queue:
            self._flush(stream, stream.response)

    def _client_push_promise(
        self, flags: int, sid: int, payload: memoryview, raw: memoryview
    ) -> None:
        raise ConnectionError_(_PROTOCOL_ERROR, "PUSH_PROMISE from a client")

    def _frame_on_closed(self, sid: int, stream: Stream | None, what: str) -> None:
        """A DATA frame for a stream the client may not send on (RFC 9113 §5.1)."""
        if sid > self._highest:
            raise ConnectionError_(_PROTOCOL_ERROR, f"{what} on an idle stream")
        if stream is None:
            how = self._closed.get(sid)
            if how is None or how == _RESET_BY_US:
                return  # in flight when we reset it, or long gone
        self._client_stream_error(sid, _STREAM_CLOSED, f"{what} on a closed stream")

    # ------------------------------------------------------------ server frames

    def _read_server(self) -> None:
        buf = self._server_in
        view = buf if type(buf) is memoryview else memoryview(buf)
        end = len(view)
        pos = 0
        max_frame = self._limits.max_frame_size
        run_frame = self._limits.run_frame_size
        handlers = SERVER_FRAMES
        from_bytes = int.from_bytes
        try:
            while end - pos >= FRAME_HEADER_LENGTH:
                header = from_bytes(view[pos : pos + FRAME_HEADER_LENGTH], "big")
                length = header >> 48
                if length > max_frame:
                    raise ConnectionError_(
                        _FRAME_SIZE_ERROR, f"frame of {length} bytes (limit {max_frame})"
                    )
                if end - pos - FRAME_HEADER_LENGTH < length:
                    break
                frame_type = (header >> 40) & 0xFF
                if length >= run_frame and frame_type == DATA_FRAME and self._server_block is None:
                    run_end = self._relay_server_run(view, pos, end)
                    if run_end != pos:
                        pos = run_end
                        continue
                flags = (header >> 32) & 0xFF
                sid = header & _STREAM_ID_MASK
                start = pos
                pos += FRAME_HEADER_LENGTH + length
                if self._server_block is not None and frame_type != CONTINUATION:
                    raise ConnectionError_(
                        _PROTOCOL_ERROR, "a frame other than CONTINUATION inside a header block"
                    )
                handler = handlers.get(frame_type)
                if handler is not None:
                    handler(
                        self, flags, sid, view[start + FRAME_HEADER_LENGTH : pos], view[start:pos]
                    )
                    if self._dead:
                        return
        finally:
            self._server_in = view[pos:] if pos < end else b""

    def _relay_server_run(
        self, view: memoryview, pos: int, end: int, cut: memoryview | None = None
    ) -> int:
        """Forward, in one step, the whole DATA frames of one stream that start at
        ``pos`` and that ``_server_data_frame`` would each forward as they are;
        return where they end (``pos``: not even the first, which then takes the
        frame-by-frame path and its every check). With ``cut``, the run starts
        with the frame the last read left unfinished: ``cut`` holds its header
        and its first bytes, ``view`` from ``pos`` the rest; if that frame cannot
        go on so, nothing is done and the answer is -1.

        A download's read is mostly such a run: its frames go on as one slice of
        the read, and the windows, the content-length and the gRPC message count
        are brought up to date once for the run. Each frame is still checked
        (whole, unpadded, the same stream, within every window and the
        content-length); the first that is not ends the run. The connection
        credit due to the server is looked at once per run rather than per
        frame, so its WINDOW_UPDATE may come a few frames later and be larger:
        the same bytes, never beyond the cap."""
        nothing = pos if cut is None else -1
        from_bytes = int.from_bytes
        head = view[pos : pos + FRAME_HEADER_LENGTH] if cut is None else cut[:FRAME_HEADER_LENGTH]
        sid = from_bytes(head[5:], "big")  # the reserved bit too: set, it ends the run
        stream = self._streams.get(sid)
        if stream is None or not stream.opened or stream.status is None:
            return nothing
        flow = stream.response
        if not flow.open or flow.queue:
            return nothing
        server, client = self._server, self._client
        room = min(server.credit, flow.credit, client.window, flow.window)
        # With a content-length, the body's bytes still due: no frame may pass
        # them, and the frame with END_STREAM must bring them to 0.
        due = -1
        if flow.length is not None:
            due = flow.length - flow.seen
            room = min(room, due)
        max_frame = self._limits.max_frame_size
        grpc = flow.grpc
        # A frame header's last 6 bytes (type, flags, stream id) as one number:
        # DATA on this stream, without flags, or with END_STREAM alone.
        going_on = sid
        last = (END_STREAM << 32) | sid
        scan = pos
        total = 0
        ended = False
        if cut is not None:
            header = from_bytes(head, "big")
            length = header >> 48
            scan = pos + FRAME_HEADER_LENGTH + length - len(cut)
            if scan > end or length > max_frame or length > room:
                return -1
            kind = header & 0xFFFFFFFFFFFF
            if kind != going_on:
                if kind != last or (due != -1 and length != due):
                    return -1
                ended = True
            if grpc is not None:
                if grpc.skip >= length:
                    grpc.skip -= length
                else:
                    grpc.feed(cut[FRAME_HEADER_LENGTH:])
                    grpc.feed(view[pos:scan])
            total = length
        while not ended:
            following = scan + FRAME_HEADER_LENGTH
            if following > end:
                break
            header = from_bytes(view[scan:following], "big")
            length = header >> 48
            following += length
            if following > end or length > max_frame or total + length > room:
                break
            kind = header & 0xFFFFFFFFFFFF
            if kind != going_on:
                if kind != last or (due != -1 and total + length != due):
                    break
                ended = True
            if grpc is not None:
                if grpc.skip >= length:
                    grpc.skip -= length
                else:
                    grpc.feed(view[following - length : following])
            total += length
            scan = following
        if scan == pos:
            return nothing
        if due != -1:
            flow.seen += total
        server.credit -= total
        flow.credit -= total
        client.window -= total
        flow.window -= total
        if cut is not None:
            client.out.append(cut)
        client.out.append(view[pos:scan])
        if ended:
            flow.open = False
        if server.owed >= self._quarter_connection:
            self._pass_on(server)  # what went on makes room in the relay's buffer
        if ended:
            self._flow_done(stream, flow)
        return scan

    def _server_data_frame(
        self, flags: int, sid: int, payload: memoryview, raw: memoryview
    ) -> None:
        if sid == 0:
            raise ConnectionError_(_PROTOCOL_ERROR, "DATA on stream 0")
        server = self._server
        server.credit -= len(payload)
        if server.credit < 0:
            raise ConnectionError_(_FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        stream = self._streams.get(sid)
        if stream is None or not stream.opened or not stream.response.open:
            self._owe(server, len(payload))
            if sid > self._highest_opened:
                raise ConnectionError_(_PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream we reset or that ended: frames in flight
        if stream.status is None:
            self._owe(server, len(payload))
            self._malformed("server", sid, "DATA before the response HEADERS")
            return
        self._data(stream, stream.response, "server", flags, payload, raw)

    def _data(
        self,
        stream: Stream,
        flow: Flow,
        side: str,
        flags: int,
        payload: memoryview,
        raw: memoryview,
    ) -> None:
        """A DATA frame on a flow that may carry it: forwarded as it is when the
        receiver's windows have room and nothing waits before it, else queued."""
        if side == "client":
            sender, receiver = self._client, self._server
        else:
            sender, receiver = self._server, self._client
        data = _data_payload(flags, payload) if flags & PADDED else payload
        length = len(payload)  # flow control counts the padding too
        flow.credit -= length
        if flow.credit < 0:
            self._owe(sender, length)
            self._stream_error(side, stream, _FLOW_CONTROL_ERROR, "DATA beyond the stream window")
            return
        end = bool(flags & END_STREAM)
        if flow.length is not None:
            seen = flow.seen = flow.seen + len(data)
            if seen > flow.length or (end and seen != flow.length):
                self._owe(sender, length)
                self._malformed(
                    side, stream.sid, f"body of {seen}+ bytes against its content-length"
                )
                return
        if flow.grpc is not None:
            flow.grpc.feed(data)
        if end:
            flow.open = False
        # A request waits for an upstream slot until its stream is opened there.
        if (
            (stream.opened or flow is not stream.request)
            and not flow.queue
            and length <= receiver.window
            and length <= flow.window
        ):
            receiver.window -= length
            flow.window -= length
            receiver.out.append(raw)
            # What went on makes room in the relay's buffer: credit due is passed
            # on, if the cap leaves a batch's worth (_pass_on's own test, made here
            # first: a receiver that granted much keeps ``owed`` high).
            quarter = self._quarter_connection
            if sender.owed >= quarter and self._cap - sender.credit - sender.held >= quarter:
                self._pass_on(sender)
            if end:
                self._flow_done(stream, flow)
            return
        queue = flow.queue
        if queue is None:
            queue = flow.queue = deque()
        queue.append((DATA, data, length, end))
        sender.held += length
        if stream.opened:
            self._flush(stream, flow)

    def _server_headers_frame(
        self, flags: int, sid: int, payload: memoryview, raw: memoryview
    ) -> None:
        if sid == 0:
            raise ConnectionError_(_PROTOCOL_ERROR, "HEADERS on stream 0")
        fragment = (
            _split_header_payload(flags, sid, payload)[0]
            if flags & (PADDED | PRIORITY_FLAG)
            else payload
        )
        if flags & END_HEADERS:
            self._server_header_block(sid, flags, bytes(fragment), raw)
            return
        block = self._server_block = _Block(sid, flags, False)
        block.fragments.append(fragment)
        block.frames.append(raw)
        block.size = len(fragment)

    def _server_continuation(
        self, flags: int, sid: int, payload: memoryview, raw: memoryview
    ) -> None:
        block = self._server_block
        if block is None or sid != block.sid:
            raise ConnectionError_(_PROTOCOL_ERROR, "CONTINUATION out of a header block")
        block.fragments.append(payload)
        block.frames.append(raw)
        block.size += len(payload)
        if block.size > self._limits.hard_header_list_size:
            raise ConnectionError_(ErrorCodes.ENHANCE_YOUR_CALM, "response header block too large")
        if flags & END_HEADERS:
            self._server_block = None
            self._server_header_block(sid, block.flags, b"".join(block.fragments), block.frames)

    def _server_header_block(self, sid: int, flags: int, block: bytes, frames: Any) -> None:
        """``frames``: the block's HEADERS frame (a memoryview), or the list of its
        HEADERS and CONTINUATION frames."""
        decoder = self._server_decoder
        generation = decoder.generation
        known = self._responses.get(block)
        if known is not None and known[0] == generation:
            reading = known[1]
        else:
            try:
                headers, self_contained = decoder.decode(block)
            except (CompressionError, HeaderListTooLarge) as exc:
                raise ConnectionError_(ErrorCodes.COMPRESSION_ERROR, str(exc)) from exc
            reading = _read_response_block(headers, self_contained)
            if decoder.generation == generation and len(block) <= _MEMO_BLOCK_BYTES:
                memo = self._responses
                if len(memo) >= _MEMO_ENTRIES:
                    memo.clear()
                memo[block] = (generation, reading)
        headers, self_contained, as_response, as_trailers, status, length, grpc_status = reading
        stream = self._streams.get(sid)
        if stream is None or not stream.opened or not stream.response.open:
            if not sid & 1 or sid > self._highest_opened:
                raise ConnectionError_(_PROTOCOL_ERROR, f"HEADERS on stream {sid}, never opened")
            return  # a stream we reset: in flight
        end = bool(flags & END_STREAM)
        if stream.status is not None:  # trailers
            problem = as_trailers
            if not end:
                problem = "trailers without END_STREAM"
            elif problem is None and stream.response.length is not None:
                if stream.response.seen != stream.response.length:
                    problem = "body shorter than its content-length"
            if problem is not None:
                self._malformed("server", sid, problem)
                return
            if stream.request.grpc is not None:
                stream.grpc_status = grpc_status
            framed = self._framed_for_client(sid, headers, self_contained, frames, True)
            stream.response.open = False
            if stream.response.queue:
                stream.response.queue.append((TRAILERS, framed))
                return
            self._client.out.append(framed)
            self._flow_done(stream, stream.response)
            return
        if as_response is not None:
            self._malformed("server", sid, as_response)
            return
        if status < 200:
            if end:
                self._malformed("server", sid, "an informational response with END_STREAM")
                return
            self._client.out.append(
                self._framed_for_client(sid, headers, self_contained, frames, False)
            )
            return
        stream.response.length = length
        stream.status = status
        if end and stream.request.grpc is not None:
            stream.grpc_status = grpc_status
        if self_contained and type(frames) is memoryview:  # one frame, as it came: most responses
            self._client.out.append(frames)
        else:
            self._client.out.append(
                self._framed_for_client(sid, headers, self_contained, frames, end)
            )
        if end:
            stream.response.open = False
            if length:
                self._malformed("server", sid, "body shorter than its content-length")
                return
            self._flow_done(stream, stream.response)

    def _framed_for_client(
        self, sid: int, headers: Headers, self_contained: bool, frames: Any, end: bool
    ) -> Any:
        if self_contained:
            return frames if type(frames) is memoryview else b"".join(frames)
        return headers_frames(sid, encode_block(headers), end, self._client.max_frame)

    def _server_rst_stream(
        self, flags: int, sid: int, payload: memoryview, raw: memoryview
    ) -> None:
        if len(payload) != 4 or sid == 0:
            raise ConnectionError_(_PROTOCOL_ERROR, "malformed RST_STREAM")
        stream = self._streams.get(sid)
        if stream is None or not stream.opened:
            return
        code = int.from_bytes(payload, "big")
        queue = stream.response.queue
        if code == _NO_ERROR and queue:
            # "stop sending, the response is complete": deliver the response first.
            queue.append((RESET, code))
            self._discard_to_server(stream)
            stream.request.done = True
            return
        self._upstream_closed(stream)
        if not (stream.request.done and stream.response.done):
            self._reset_client_for_server(sid, relayed_code(code))
        self._drop(stream, f"server reset {code_name(code)}", _RESET_BY_US)

    def _server_settings(self, flags: int, sid: int, payload: memoryview, raw: memoryview) -> None:
        if sid != 0:
            raise ConnectionError_(_PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if not self._server_acked:
                self._server_acked = True
                self._server_decoder.acknowledged()
            return
        before = self._server.initial
        for key, value in parse_settings(payload):
            if key == INITIAL_WINDOW_SIZE:
                delta = value - self._server.initial
                self._server.initial = value
                if delta:
                    # Passed on to the client as stream credit (a debt when negative).
                    for stream in self._streams.values():
                        stream.request.window += delta
                        self._owe_stream(stream, stream.request, delta)
            elif key == MAX_FRAME_SIZE:
                self._server.max_frame = value
            elif key == MAX_CONCURRENT_STREAMS:
                self._server_max_streams = value
            elif key == MAX_HEADER_LIST_SIZE:
                self._server_max_header_list = value
        self._server.out.append(SETTINGS_ACK)  # first: as toward the client
        if self._server.initial > before:
            self._flush_all(self._server)
        self._open_waiting()

    def _server_ping(self, flags: int, sid: int, payload: memoryview, raw: memoryview) -> None:
        if sid != 0 or len(payload) != 8:
            raise ConnectionError_(_PROTOCOL_ERROR, "malformed PING")
        if not flags & ACK:
            self._server.out.append(ping(bytes(payload), ack=True))

    def _server_goaway(self, flags: int, sid: int, payload: memoryview, raw: memoryview) -> None:
        if sid != 0 or len(payload) < 8:
            raise ConnectionError_(_PROTOCOL_ERROR, "malformed GOAWAY")
        last = int.from_bytes(payload[:4], "big") & _STREAM_ID_MASK
        code = int.from_bytes(payload[4:8], "big")
        if code != _NO_ERROR:
            self._abort(f"server GOAWAY {code_name(code)}", to_client=_INTERNAL_ERROR)
            return
        # Streams above last_stream_id were never processed: the client may retry them.
        self._refusing = True
        for stream in list(self._streams.values()):
            if not stream.opened or stream.sid > last:
                if not stream.opened:
                    self._unwait(stream)
                else:
                    self._upstream_closed(stream)
                self._reset_client_for_server(stream.sid, _REFUSED_STREAM)
                self._drop(stream, "refused: server going away", _RESET_BY_US)
        self._client.out.append(goaway(max(self._streams, default=0), _NO_ERROR))

    def _server_window_update(
        self, flags: int, sid: int, payload: memoryview, raw: memoryview
    ) -> None:
        if len(payload) != 4:
            raise ConnectionError_(_FRAME_SIZE_ERROR, "WINDOW_UPDATE frame of the wrong size")
        increment = int.from_bytes(payload, "big") & _STREAM_ID_MASK
        if sid == 0:
            if not increment:
                raise ConnectionError_(_PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._server.window += increment
            if self._server.window > MAX_WINDOW:
                raise ConnectionError_(_FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._owe(self._client, increment)
            self._flush_all(self._server)
            return
        stream = self._streams.get(sid)
        if stream is None or not stream.opened:
            return
        if not increment:
            self._server_stream_error(stream, _PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            return
        stream.request.window += increment
        self._owe_stream(stream, stream.request, increment)
        if stream.request.queue:
            self._flush(stream, stream.request)

    def _server_push_promise(
        self, flags: int, sid: int, payload: memoryview, raw: memoryview
    ) -> None:
        raise ConnectionError_(_PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")

    # ------------------------------------------------------------ streams

    def _new_stream(self, sid: int, grpc: bool) -> Stream:
        """Each flow: the receiver's window, what the sender may send (our SETTINGS
        toward it), and the rest of buffer + receiver's window, due to the sender.
        That rest is the server's initial window for a request (our SETTINGS to
        the client went before we knew it); for a response, nothing unless the
        client's window changed since our SETTINGS to the server."""
        buffer = self._limits.stream_window
        client, server = self._client, self._server
        return Stream(
            sid,
            Flow(
                server.initial, client.advertised, buffer + server.initial - client.advertised, grpc
            ),
            Flow(
                client.initial, server.advertised, buffer + client.initial - server.advertised, grpc
            ),
        )

    def _open(self, stream: Stream, frames: Any) -> None:
        self._server.out.append(frames)
        stream.opened = True
        # Credit due from the start goes with the stream's first frames once it
        # is a batch; a smaller one joins the receiver's first update.
        batch = self._quarter_stream
        if stream.request.owed >= batch:
            self._owe_stream(stream, stream.request, 0)
        if stream.response.owed >= batch:
            self._owe_stream(stream, stream.response, 0)
        self._upstream_open += 1
        self._highest_opened = stream.sid
        if not stream.request.open and not stream.request.queue:
            stream.request.done = True  # END_STREAM came on the HEADERS
            if stream.response.done:
                self._complete_if_done(stream)
        elif stream.request.queue:
            self._flush(stream, stream.request)

    def _open_waiting(self) -> None:
        waiting = self._waiting
        while waiting and self._upstream_open < self._server_max_streams:
            stream = waiting.popleft()
            held, stream.held = stream.held, None
            self._open(stream, held)

    def _unwait(self, stream: Stream) -> None:
        try:
            self._waiting.remove(stream)
        except ValueError:
            pass

    def _flow_done(self, stream: Stream, flow: Flow) -> None:
        """END_STREAM went to the flow's receiver (the response's: the flow log hears)."""
        flow.done = True
        if flow is stream.response:
            self._reply(stream, None)
        self._complete_if_done(stream)

    def _complete_if_done(self, stream: Stream) -> None:
        if stream.request.done and stream.response.done:
            self._guard.stream_completed()
            if stream.opened:  # _upstream_closed, inline: once per stream
                stream.opened = False
                self._upstream_open -= 1
            self._forget(stream, _CLOSED)

    def _upstream_closed(self, stream: Stream) -> None:
        if stream.opened:
            stream.opened = False
            self._upstream_open -= 1

    def _forget(self, stream: Stream, how: int) -> None:
        sid = stream.sid
        if self._streams.pop(sid, None) is None:
            return
        if self._client.blocked:
            self._client.blocked.pop(sid, None)
        if self._server.blocked:
            self._server.blocked.pop(sid, None)
        self._remember_closed(sid, how)
        if self._waiting:
            self._open_waiting()

    def _reply(self, stream: Stream, reset: str | None) -> None:
        if stream.replied:
            return
        stream.replied = True
        fields: dict[str, Any] = {"status": stream.status}
        if stream.request.grpc is not None and stream.response.grpc is not None:
            fields["grpc_status"] = stream.grpc_status
            fields["request_messages"] = stream.request.grpc.messages
            fields["response_messages"] = stream.response.grpc.messages
        if reset:
            fields["reset"] = reset
        self._out.append(new_reply(stream.sid, fields))

    def _drop(self, stream: Stream, reason: str, how: int) -> None:
        """End a stream early: queued bytes are credited back, the flow log told."""
        self._discard_to_server(stream)
        queue = stream.response.queue
        if queue:
            owed = sum(item[2] for item in queue if item[0] == DATA)
            if owed:
                self._server.held -= owed
                self._owe(self._server, owed)
            queue.clear()
        if not stream.opened:
            self._unwait(stream)
        self._upstream_closed(stream)
        if not stream.response.done:
            stream.response.done = True
            self._reply(stream, reason or None)
        stream.request.done = True
        self._forget(stream, how)

    def _discard_to_server(self, stream: Stream) -> None:
        queue = stream.request.queue
        if queue:
            owed = sum(item[2] for item in queue if item[0] == DATA)
            if owed:
                self._client.held -= owed
                self._owe(self._client, owed)
            queue.clear()
        self._server.blocked.pop(stream.sid, None)

    # ------------------------------------------------------------ flow control

    def _owe(self, sender: Hop, size: int) -> None:
        """``size`` more bytes of connection credit are due to ``sender`` (below 0, a
        debt): its receiver granted them, or the relay dropped bytes it sent."""
        owed = sender.owed + size
        sender.owed = owed
        if owed >= self._quarter_connection:
            self._pass_on(sender)

    def _pass_on(self, sender: Hop) -> None:
        """The connection credit due to ``sender``, once a quarter of the buffer:
        as far as what it may still send plus what the relay holds of it stays
        within ``connection_window_cap`` (its receiver's updates may open a
        connection window whose streams take nothing), and its window within 2^31-1.
        The rest waits for bytes to go on."""
        increment = min(
            sender.owed,
            self._limits.connection_window_cap - sender.credit - sender.held,
            MAX_WINDOW - sender.credit,
        )
        if increment >= self._quarter_connection:
            sender.out.append(window_update(0, increment))
            sender.credit += increment
            sender.owed -= increment

    def _owe_stream(self, stream: Stream, flow: Flow, size: int) -> None:
        """``size`` more bytes of ``flow``'s stream credit are due to its sender (below
        0, a debt), sent as ``_owe`` sends connection credit. Only while the sender
        may still send, and the server knows the stream."""
        owed = flow.owed + size
        if owed >= self._quarter_stream and flow.open and stream.opened:
            increment = min(owed, MAX_WINDOW - flow.credit)
            if increment > 0:
                sender = self._client if flow is stream.request else self._server
                sender.out.append(window_update(stream.sid, increment))
                flow.credit += increment
                owed -= increment
        flow.owed = owed

    def _flush(self, stream: Stream, flow: Flow) -> None:
        """A flow's queue (DATA, trailers, a final reset), as far as its receiver's
        windows allow, DATA cut to fit."""
        if flow is stream.request:
            receiver, sender = self._server, self._client
        else:
            receiver, sender = self._client, self._server
        queue = flow.queue
        sid = stream.sid
        out = receiver.out
        while queue:
            item = queue[0]
            kind = item[0]
            if kind == TRAILERS:
                queue.popleft()
                out.append(item[1])
                self._flow_done(stream, flow)
                continue  # a RESET may follow
            if kind == RESET:  # the server's NO_ERROR reset, behind a complete response
                queue.popleft()
                receiver.blocked.pop(sid, None)
                self._upstream_closed(stream)
                self._reset_client_for_server(sid, item[1])
                self._drop(stream, "", _RESET_BY_US)
                return
            _, data, length, end = item
            size = len(data)
            if size:
                room = min(receiver.window, flow.window, receiver.max_frame)
                if room <= 0:
                    receiver.blocked[sid] = stream
                    break
                if size > room:
                    out.append(_data_header(sid, room, False))
                    out.append(data[:room])
                    receiver.window -= room
                    flow.window -= room
                    sender.held -= room
                    queue[0] = (DATA, data[room:], length - room, end)
                    continue
            queue.popleft()
            out.append(_data_header(sid, size, end))
            out.append(data)
            receiver.window -= size
            flow.window -= size
            sender.held -= length
            if length > size:  # padding, dropped here: it used no receiver window
                sender.owed += length - size
                self._owe_stream(stream, flow, length - size)
            if end:
                self._flow_done(stream, flow)
        else:
            receiver.blocked.pop(sid, None)
        if sender.owed >= self._quarter_connection:
            self._pass_on(sender)  # what went on makes room in the relay's buffer

    def _flush_all(self, receiver: Hop) -> None:
        """Every stream waiting for ``receiver``'s window, while it has some."""
        toward_server = receiver is self._server
        for stream in list(receiver.blocked.values()):
            if receiver.window <= 0:
                return
            self._flush(stream, stream.request if toward_server else stream.response)

    # ------------------------------------------------------------ answers and resets

    def _deny(self, sid: int, ended: bool, decision: Decision, grpc: bool) -> None:
        if grpc:
            block = encode_block(grpc_denial(denial_reason(decision)))
            self._client.out.append(headers_frames(sid, block, True, self._client.max_frame))
            if ended:
                self._guard.stream_completed()
                self._remember_closed(sid, _CLOSED)
            else:
                self._reset_client(sid, _NO_ERROR)
            fields = {
                "status": 200,
                "grpc_status": GRPC_PERMISSION_DENIED,
                "request_messages": 0,
                "response_messages": 0,
            }
        else:
            self._answer(sid, ended, *http_denial())
            fields = {"status": DENIED_STATUS}
        self._out.append(Reply(sid, fields))

    def _answer(self, sid: int, ended: bool, headers: Headers, body: bytes) -> None:
        """A complete response from the proxy itself; the rest of the request is refused."""
        size = len(body)
        max_frame = self._client.max_frame
        if size <= min(self._client.window, self._client.initial, max_frame):
            self._client.out.append(headers_frames(sid, encode_block(headers), False, max_frame))
            self._client.out.append(_data_header(sid, size, True) + body)
            self._client.window -= size
            self._owe(self._server, -size)  # our bytes in the client's window: a debt
        else:
            short = [headers[0], (b"content-length", b"0")]
            self._client.out.append(headers_frames(sid, encode_block(short), True, max_frame))
        if ended:
            self._guard.stream_completed()
            self._remember_closed(sid, _CLOSED)
        else:
            # RFC 9113 §8.1: a complete response may end the request with NO_ERROR.
            self._reset_client(sid, _NO_ERROR)

    def _remember_closed(self, sid: int, how: int) -> None:
        closed = self._closed
        closed[sid] = how
        if len(closed) > 2 * _CLOSED_MEMORY:
            # The older half is forgotten at once. Dropping the oldest entry on
            # each close would walk, every time, over the entries already deleted
            # at the front of the dict (a long-lived connection's every stream).
            self._closed = dict(islice(closed.items(), len(closed) - _CLOSED_MEMORY, None))

    def _reset_client(self, sid: int, code: int) -> None:
        """RST_STREAM toward the client for a stream not (or no longer) in the map."""
        self._client.out.append(rst_stream(sid, code))
        self._resets_sent += 1
        self._remember_closed(sid, _RESET_BY_US)

    def _reset_client_for_server(self, sid: int, code: int) -> None:
        """Reset a client stream because of the server: not the client's doing, so
        not charged to its reset budget (it still counts as a control frame owed)."""
        self._client.out.append(rst_stream(sid, code))
        self._resets_sent += 1
        self._excused_resets += 1
        self._remember_closed(sid, _RESET_BY_US)

    def _reset_server(self, sid: int, code: int) -> None:
        self._server.out.append(rst_stream(sid, code))

    def _client_stream_error(self, sid: int, code: int, reason: str) -> None:
        """RST_STREAM(code) to the client; the upstream twin, if any, is cancelled."""
        stream = self._streams.get(sid)
        self._client.out.append(rst_stream(sid, code))
        self._resets_sent += 1
        if stream is not None:
            if stream.opened and not (stream.request.done and stream.response.done):
                self._reset_server(sid, _CANCEL)
            self._drop(stream, reason, _RESET_BY_US)
        else:
            self._remember_closed(sid, _RESET_BY_US)

    def _stream_error(self, side: str, stream: Stream, code: int, reason: str) -> None:
        if side == "client":
            self._client_stream_error(stream.sid, code, reason)
        else:
            self._server_stream_error(stream, code, reason)

    def _server_stream_error(self, stream: Stream, code: int, reason: str) -> None:
        self._reset_server(stream.sid, code)
        self._upstream_closed(stream)
        self._reset_client_for_server(stream.sid, _INTERNAL_ERROR)
        self._drop(stream, reason, _RESET_BY_US)

    def _malformed(self, side: str, sid: int, problem: str) -> None:
        """A malformed message: RST_STREAM PROTOCOL_ERROR to its sender (RFC 9113 §8.1.1)."""
        if side == "client":
            self._client_stream_error(sid, _PROTOCOL_ERROR, "malformed request")
        else:
            stream = self._streams.get(sid)
            if stream is not None:
                self._server_stream_error(stream, _PROTOCOL_ERROR, "malformed response")
            else:
                self._reset_server(sid, _PROTOCOL_ERROR)
        error = ProtocolError(problem, code="h2_malformed_headers")
        self._out.append(ParseError(side, error, close=False))

    # ------------------------------------------------------------ connection errors

    def _client_connection_error(
        self, code: int, message: str, limit: str | None = None
    ) -> list[Command]:
        """GOAWAY(code) toward the client, the server told, and close."""
        debug = limit.encode("ascii") if limit else b""
        wire = goaway(self._highest, code, debug)
        self._client.out.append(wire)
        self._abort("", to_server=_CANCEL)
        name = code_name(code)
        text, kind = f"{message} ({name})", f"h2_{name.lower()}"
        error: ProtocolError
        if limit is not None:
            error = LimitExceeded(text, limit=limit, code=kind, wire_reply=wire)
        else:
            error = ProtocolError(text, code=kind, wire_reply=wire)
        out = self._take()
        # _abort queued the wire bytes and Close; the ParseError goes before Close.
        out.insert(len(out) - 1, ParseError("client", error, close=True))
        return out

    def _server_connection_error(self, code: int, message: str) -> list[Command]:
        wire = goaway(self._highest_opened, code)
        self._server.out.append(wire)
        self._abort("", to_client=_INTERNAL_ERROR)
        name = code_name(code)
        error = ProtocolError(f"{message} ({name})", code=f"h2_{name.lower()}", wire_reply=wire)
        out = self._take()
        out.insert(len(out) - 1, ParseError("server", error, close=True))
        return out

    def _abort(
        self, reason: str, *, to_client: int | None = None, to_server: int | None = None
    ) -> None:
        """Tear the connection down: every stream replied, GOAWAY to the healthy side, close."""
        for stream in list(self._streams.values()):
            self._reply(stream, "connection closed")
        self._streams.clear()
        self._waiting.clear()
        self._client.blocked.clear()
        self._server.blocked.clear()
        self._client_in = b""  # client input not yet processed: never will be
        self._paused = False
        if to_client is not None:
            self._client.out.append(goaway(self._highest, to_client))
        if to_server is not None and self._server_started:
            self._server.out.append(goaway(0, to_server))
        if self._client.out:
            self._out.append(ToClient(b"".join(self._client.out)))
            self._client.out.clear()
        if self._server.out and self._server_started and not self._server_gone:
            self._out.append(ToServer(b"".join(self._server.out)))
        self._server.out.clear()
        self._dead = True
        self._out.append(Close(reason or "protocol error"))

    def _finish_on_eof(self, side: str) -> list[Command]:
        if side == "client":
            # The client can send nothing more, not even WINDOW_UPDATE: stop.
            self._abort("client closed", to_server=_CANCEL if self._streams else _NO_ERROR)
        elif not self._server_gone:
            self._server_closed()
            return self._drain()
        return self._take()

    def _server_closed(self) -> None:
        """Server EOF. Responses it completed may still be waiting for the
        client's window: deliver those, reset the rest, refuse new streams."""
        self._server_gone = True
        self._refusing = True
        waiting, self._waiting = self._waiting, deque()
        for stream in waiting:
            self._reset_client_for_server(stream.sid, _REFUSED_STREAM)  # never reached it
            self._drop(stream, "server closed", _RESET_BY_US)
        for stream in list(self._streams.values()):
            queue = stream.response.queue
            complete = stream.response.done or (queue and (queue[-1][0] != DATA or queue[-1][3]))
            if not complete:
                self._upstream_closed(stream)
                self._reset_client_for_server(stream.sid, _INTERNAL_ERROR)
                self._drop(stream, "server closed", _RESET_BY_US)
            elif not stream.request.done:
                self._discard_to_server(stream)
                stream.request.done = True
                self._complete_if_done(stream)
        self._client.out.append(goaway(max(self._streams, default=0), _NO_ERROR))


def _forget_frames(exc: BaseException) -> None:
    """Drop an exception's traceback (and its causes'): a frame that holds the
    exception in a local would otherwise keep the engine in a reference cycle."""
    while exc is not None:
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


# A slice of a read at least this long goes to the transport as it is (a
# command of its own), not joined to its neighbours: joining would copy every
# byte of a download once more. Smaller pieces are joined into one write, and
# so is all a turn writes to one side if it is less than _JOINED in all (many
# small responses: one copy in C costs less than sorting the pieces in Python).
_UNJOINED = 4096
_JOINED = 32768


def _gather(
    parts: list[Any], kind: Callable[[WireData], ToClient | ToServer], out: list[Command]
) -> None:
    """``parts`` (bytes and memoryviews of reads, in order) as commands made by ``kind``
    (``new_to_client`` or ``new_to_server``) appended to ``out``, few and without
    copying a read's large slices; ``parts`` is emptied."""
    if len(parts) == 1:
        out.append(kind(parts[0]))
    elif sum(map(len, parts)) < _JOINED:
        out.append(kind(b"".join(parts)))
    else:
        small: list[Any] = []
        for part in parts:
            if type(part) is memoryview and len(part) >= _UNJOINED:
                if small:
                    out.append(kind(b"".join(small)))
                    small = []
                out.append(kind(part))
            else:
                small.append(part)
        if small:
            out.append(kind(b"".join(small)))
    parts.clear()


def _data_header(sid: int, size: int, end: bool) -> bytes:
    return size.to_bytes(3, "big") + (b"\x00\x01" if end else b"\x00\x00") + sid.to_bytes(4, "big")


# What the engine does with each frame type, per side. Kept here rather than as
# tables of bound methods on each engine, which would be a reference cycle (freed
# only by the cyclic collector, long after the connection ends).
FrameHandler = Callable[[H2Engine, int, int, memoryview, memoryview], None]
CLIENT_FRAMES: dict[int, FrameHandler] = {
    DATA_FRAME: H2Engine._client_data_frame,
    HEADERS: H2Engine._client_headers_frame,
    PRIORITY: H2Engine._client_priority,
    RST_STREAM: H2Engine._client_rst_stream,
    SETTINGS: H2Engine._client_settings,
    PUSH_PROMISE: H2Engine._client_push_promise,
    PING: H2Engine._client_ping,
    GOAWAY: H2Engine._client_goaway,
    WINDOW_UPDATE: H2Engine._client_window_update,
    CONTINUATION: H2Engine._client_continuation,
}
SERVER_FRAMES: dict[int, FrameHandler] = {
    DATA_FRAME: H2Engine._server_data_frame,
    HEADERS: H2Engine._server_headers_frame,
    RST_STREAM: H2Engine._server_rst_stream,
    SETTINGS: H2Engine._server_settings,
    PUSH_PROMISE: H2Engine._server_push_promise,
    PING: H2Engine._server_ping,
    GOAWAY: H2Engine._server_goaway,
    WINDOW_UPDATE: H2Engine._server_window_update,
    CONTINUATION: H2Engine._server_continuation,
}
