"""The frame relay's own decisions, read on the wire.

Each test hands the engine frames built byte by byte (``parsers.http2.frames``
and hpack, as a peer would), or drives it with real h2 peers, and reads back
the frames it wrote to each side: stream ids kept on both hops, the window
credited for a denied stream, HPACK table sizes negotiated per hop, header
blocks in CONTINUATION frames, and the connection errors RFC 9113 asks for.
"""

from __future__ import annotations

import h2.events as ev
from h2.errors import ErrorCodes
from hpack import Decoder, Encoder
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from parsers.base import Access, Close, Decision, ParseError, Reply, ToClient, ToServer
from parsers.http2.engine import PREFACE, H2Engine, H2Limits
from parsers.http2.frames import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    PING,
    SETTINGS,
    frame,
    settings_frame,
    window_update,
)
from parsers.requests import HttpRequest
from tests.support.h2_transcript import Transcript, frames_in, grpc_headers, request_headers

HEADER_TABLE_SIZE = 0x1


def decide(request):
    return Decision(not request.path.startswith("/admin"), policy="p", rule="r")


class Wire:
    """The engine between two hand-written peers: what each side was sent, as frames."""

    def __init__(self, decide=decide) -> None:
        self.engine = H2Engine(decide)
        self.to_client = bytearray()
        self.to_server = bytearray()
        self.commands: list = []
        self._client_mark = self._server_mark = 0

    def client(self, data: bytes) -> Wire:
        self._run(self.engine.client_data(data))
        return self

    def server(self, data: bytes) -> Wire:
        self._run(self.engine.server_data(data))
        return self

    def _run(self, commands) -> None:
        for cmd in commands:
            if type(cmd) is ToClient:
                self.to_client += cmd.data
            elif type(cmd) is ToServer:
                self.to_server += cmd.data
            else:
                self.commands.append(cmd)

    def client_frames(self) -> list:
        return frames_in(self.to_client)

    def step(self) -> None:
        """From here, ``new_to_client`` and ``new_to_server`` read what comes next."""
        self._client_mark, self._server_mark = len(self.to_client), len(self.to_server)

    def new_to_client(self) -> list:
        frames = frames_in(self.to_client[self._client_mark :])
        self._client_mark = len(self.to_client)
        return frames

    def new_to_server(self) -> list:
        frames = frames_in(self.to_server[max(self._server_mark, len(PREFACE)) :])
        self._server_mark = len(self.to_server)
        return frames

    def server_frames(self) -> list:
        return frames_in(self.to_server[len(PREFACE) :])

    def of(self, kind) -> list:
        return [c for c in self.commands if isinstance(c, kind)]


def client_start() -> bytes:
    return PREFACE + settings_frame({}) + frame(SETTINGS, ACK, 0)


def server_start(acknowledge: bool = True) -> bytes:
    return settings_frame({}) + (frame(SETTINGS, ACK, 0) if acknowledge else b"")


def get(encoder: Encoder, path: str) -> bytes:
    return encoder.encode(request_headers(path))


def goaway_code(frames: list) -> int:
    (goaway,) = [f for f in frames if isinstance(f, GoAwayFrame)]
    return goaway.error_code


# ------------------------------------------------------------ stream ids


def test_stream_ids_are_kept_on_both_hops_and_the_ids_of_denied_streams_are_skipped():
    t = Transcript(H2Engine(decide)).start()
    t.client.send_headers(1, request_headers("/admin"), end_stream=True)
    t.client.send_headers(3, request_headers("/a"), end_stream=True)
    t.client.send_headers(5, request_headers("/b"), end_stream=True)
    t.pump()

    upstream = [
        (e.stream_id, dict(e.headers)[b":path"]) for e in t.of(ev.RequestReceived, "server")
    ]
    assert upstream == [(3, b"/a"), (5, b"/b")]
    for stream_id in (3, 5):
        t.server.send_headers(stream_id, [(b":status", b"204")], end_stream=True)
    t.pump()
    answered = {
        e.stream_id: dict(e.headers)[b":status"] for e in t.of(ev.ResponseReceived, "client")
    }
    assert answered == {1: b"403", 3: b"204", 5: b"204"}


# ------------------------------------------------------------ flow control


# What the relay grants a sender beyond its receiver's window, and its hard cap.
BUFFER = H2Limits().stream_window  # 1 MiB per stream
CONNECTION_BUFFER = H2Limits().connection_window  # 1 MiB per connection
CAP = H2Limits().connection_window_cap  # 4 MiB
STREAM_BATCH, CONNECTION_BATCH = BUFFER // 4, CONNECTION_BUFFER // 4
DEFAULT_WINDOW = 65535


def updates(frames: list) -> list[tuple[int, int]]:
    return [(f.stream_id, f.window_increment) for f in frames if isinstance(f, WindowUpdateFrame)]


def data_sent(frames: list) -> list[tuple[int, int]]:
    return [(f.stream_id, len(f.data)) for f in frames if isinstance(f, DataFrame)]


def download(wire: Wire, enc: Encoder, stream_id: int) -> None:
    """A GET the server starts answering (HEADERS: table size 0, :status 200)."""
    wire.client(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, get(enc, "/big")))
    wire.server(frame(HEADERS, END_HEADERS, stream_id, b"\x20\x88"))


def upload_headers(enc: Encoder, stream_id: int) -> bytes:
    return frame(HEADERS, END_HEADERS, stream_id, enc.encode(request_headers("/up", "POST")))


def test_each_sender_is_granted_the_relays_buffer_plus_what_its_receiver_grants():
    # The client's settings come first: the server's stream window folds in its
    # initial window. The server's come later: the client gets the buffer only.
    wire = Wire().client(
        PREFACE + settings_frame({INITIAL_WINDOW_SIZE: 1 << 20}) + frame(SETTINGS, ACK, 0)
    )
    (to_server,) = [
        f for f in wire.server_frames() if isinstance(f, SettingsFrame) and "ACK" not in f.flags
    ]
    assert to_server.settings[INITIAL_WINDOW_SIZE] == BUFFER + (1 << 20)
    (to_client,) = [
        f for f in wire.client_frames() if isinstance(f, SettingsFrame) and "ACK" not in f.flags
    ]
    assert to_client.settings[INITIAL_WINDOW_SIZE] == BUFFER
    # Connection-wide, each is granted the buffer over the other's initial window.
    assert updates(wire.server_frames()) == [(0, CONNECTION_BUFFER)]
    assert updates(wire.client_frames()) == [(0, CONNECTION_BUFFER)]


def test_forwarding_credits_nothing_the_receivers_updates_go_on_in_batches():
    enc = Encoder()
    wire = Wire().client(client_start()).server(server_start())
    download(wire, enc, 1)
    wire.step()
    wire.server(frame(DATA, 0, 1, b"d" * 16384) * 3)
    assert data_sent(wire.new_to_client()) == [(1, 16384)] * 3
    assert updates(wire.new_to_server()) == []  # forwarded, not credited

    half = STREAM_BATCH // 2
    wire.client(window_update(1, half) + window_update(0, half))
    assert updates(wire.new_to_server()) == []  # under a batch (a quarter of the buffer)
    wire.client(window_update(1, half))
    assert updates(wire.new_to_server()) == [(1, STREAM_BATCH)]
    wire.step()
    wire.client(window_update(0, CONNECTION_BATCH - half))
    assert updates(wire.new_to_server()) == [(0, CONNECTION_BATCH)]


def test_bytes_dropped_for_a_denied_stream_are_credited_back_to_the_client_connection():
    # A 304 KiB body behind a denied request: the proxy drops it and gives the
    # window back (no receiver ever saw it), or the connection would stall.
    enc = Encoder()
    wire = Wire().client(client_start()).server(server_start())
    wire.step()
    wire.client(
        frame(HEADERS, END_HEADERS, 1, enc.encode(request_headers("/admin/upload", "POST")))
        + frame(DATA, 0, 1, b"x" * 16384) * 19
    )
    frames = wire.new_to_client()
    assert [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)] == [
        (1, ErrorCodes.NO_ERROR)
    ]
    assert updates(frames) == [(0, CONNECTION_BATCH)]  # 16 of the 19 frames: one batch
    assert not [f for f in wire.new_to_server() if isinstance(f, (HeadersFrame, DataFrame))]


def test_a_denial_body_uses_the_clients_window_and_is_held_back_from_the_next_update():
    enc = Encoder()
    wire = Wire().client(client_start()).server(server_start())
    wire.client(frame(HEADERS, END_HEADERS | END_STREAM, 1, get(enc, "/admin")))
    ((_, body),) = data_sent(wire.client_frames())  # the 403's body, written by the proxy
    assert body > 0
    wire.step()
    wire.client(window_update(0, CONNECTION_BATCH))  # the client gives back what it read
    assert updates(wire.new_to_server()) == []  # less the body: under a batch
    wire.client(window_update(0, body))
    assert updates(wire.new_to_server()) == [(0, CONNECTION_BATCH)]


def test_an_upload_is_granted_the_servers_initial_window_with_its_first_frames():
    enc = Encoder()
    wire = Wire().client(client_start())
    wire.server(settings_frame({INITIAL_WINDOW_SIZE: 1 << 20}) + frame(SETTINGS, ACK, 0))
    wire.step()
    wire.client(upload_headers(enc, 1))
    assert [type(f) for f in wire.new_to_server()] == [HeadersFrame]
    assert updates(wire.new_to_client()) == [(1, 1 << 20)]


def test_an_upload_opened_before_the_servers_settings_gets_its_window_when_they_come():
    enc = Encoder()
    wire = Wire().client(client_start())
    wire.step()
    wire.client(upload_headers(enc, 1) + frame(DATA, 0, 1, b"u" * 16384))
    assert data_sent(wire.new_to_server()) == [(1, 16384)]  # within the default window
    assert updates(wire.new_to_client()) == []  # the default window: under a batch
    wire.server(settings_frame({INITIAL_WINDOW_SIZE: 1 << 20}) + frame(SETTINGS, ACK, 0))
    assert updates(wire.new_to_client()) == [(1, 1 << 20)]


def test_a_server_window_under_a_batch_is_passed_on_with_the_servers_updates():
    enc = Encoder()
    wire = Wire().client(client_start()).server(server_start())
    wire.step()
    wire.client(upload_headers(enc, 1))
    assert updates(wire.new_to_client()) == []  # 64 KiB - 1: under a batch
    wire.server(window_update(1, STREAM_BATCH - DEFAULT_WINDOW))
    assert updates(wire.new_to_client()) == [(1, STREAM_BATCH)]


def test_the_clients_initial_window_shrinking_is_a_debt_and_growing_is_passed_on():
    enc = Encoder()
    wire = Wire().client(client_start()).server(server_start())
    download(wire, enc, 1)
    wire.step()
    debt = 30000
    wire.client(settings_frame({INITIAL_WINDOW_SIZE: DEFAULT_WINDOW - debt}))
    wire.client(window_update(1, STREAM_BATCH))
    assert updates(wire.new_to_server()) == []  # a batch less the debt: under a batch
    wire.client(window_update(1, debt))
    assert updates(wire.new_to_server()) == [(1, STREAM_BATCH)]

    wire.client(settings_frame({INITIAL_WINDOW_SIZE: DEFAULT_WINDOW + STREAM_BATCH}))
    assert updates(wire.new_to_server()) == [(1, STREAM_BATCH + debt)]
    # A stream opened now: the server's SETTINGS said buffer + 64 KiB - 1.
    download(wire, enc, 3)
    assert updates(wire.new_to_server()) == [(3, STREAM_BATCH)]


def test_the_servers_initial_window_shrinking_is_a_debt_on_an_upload():
    enc = Encoder()
    wire = Wire().client(client_start())
    wire.server(settings_frame({INITIAL_WINDOW_SIZE: 1 << 20}) + frame(SETTINGS, ACK, 0))
    wire.client(upload_headers(enc, 1))
    wire.step()
    debt = 50000
    wire.server(settings_frame({INITIAL_WINDOW_SIZE: (1 << 20) - debt}))
    wire.server(window_update(1, STREAM_BATCH))
    assert updates(wire.new_to_client()) == []  # a batch less the debt: under a batch
    wire.server(window_update(1, debt))
    assert updates(wire.new_to_client()) == [(1, STREAM_BATCH)]


def kinds(frames: list) -> list[str]:
    """Each frame as its type, a SETTINGS ACK as "ACK"."""
    return [
        "ACK" if isinstance(f, SettingsFrame) and "ACK" in f.flags else type(f).__name__
        for f in frames
    ]


def client_granting_no_window() -> Wire:
    """A client that opens no stream window (INITIAL_WINDOW_SIZE 0, the server's
    SETTINGS acknowledged), the server started."""
    wire = Wire().client(
        PREFACE + settings_frame({INITIAL_WINDOW_SIZE: 0}) + frame(SETTINGS, ACK, 0)
    )
    wire.server(server_start())
    return wire


def test_data_a_grown_initial_window_lets_go_follows_the_settings_ack():
    # Until our ACK arrives, the client holds DATA to the window it had; grpcio resets
    # a stream with "frame of size N overflows local window of 0" otherwise.
    enc = Encoder()
    wire = client_granting_no_window()
    download(wire, enc, 1)
    wire.server(frame(DATA, 0, 1, b"d" * 300))
    wire.step()
    assert data_sent(wire.new_to_client()) == []  # held: the stream's window is 0
    wire.client(settings_frame({INITIAL_WINDOW_SIZE: 255}))
    frames = wire.new_to_client()
    assert kinds(frames) == ["ACK", "DataFrame"]
    assert data_sent(frames) == [(1, 255)]


def test_data_a_grown_server_window_lets_go_follows_the_settings_ack():
    enc = Encoder()
    wire = Wire().client(client_start())
    wire.server(settings_frame({INITIAL_WINDOW_SIZE: 0}) + frame(SETTINGS, ACK, 0))
    wire.client(upload_headers(enc, 1) + frame(DATA, 0, 1, b"u" * 300))
    wire.step()
    assert data_sent(wire.new_to_server()) == []
    wire.server(settings_frame({INITIAL_WINDOW_SIZE: 100}))
    frames = [f for f in wire.new_to_server() if not isinstance(f, WindowUpdateFrame)]
    assert kinds(frames) == ["ACK", "DataFrame"]
    assert data_sent(frames) == [(1, 100)]


def test_a_client_that_grants_no_window_costs_the_buffer_per_stream_and_no_more():
    enc = Encoder()
    wire = client_granting_no_window()
    download(wire, enc, 1)
    wire.step()
    wire.server(frame(DATA, 0, 1, b"d" * 16384) * (BUFFER // 16384))
    assert data_sent(wire.new_to_client()) == []  # all held
    assert not [f for f in wire.new_to_server() if isinstance(f, RstStreamFrame)]
    wire.server(frame(DATA, 0, 1, b"d"))  # one byte past the buffer
    resets = [f for f in wire.new_to_server() if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in resets] == [(1, ErrorCodes.FLOW_CONTROL_ERROR)]


def test_a_client_that_grants_no_window_costs_the_connection_buffer_and_no_more():
    enc = Encoder()
    wire = client_granting_no_window()
    full = CONNECTION_BUFFER // BUFFER  # streams whose buffers fill the connection's
    streams = list(range(1, 2 * full + 2, 2))
    for sid in streams:
        download(wire, enc, sid)
    # The next stream may take the client's own connection window (64 KiB - 1),
    # that is all.
    for sid in streams[:full]:
        wire.server(frame(DATA, 0, sid, b"d" * 16384) * (BUFFER // 16384))
    last = streams[-1]
    wire.server(frame(DATA, 0, last, b"d" * 16383) * 4 + frame(DATA, 0, last, b"d" * 3))
    assert not wire.of(Close) and not data_sent(wire.client_frames())
    wire.server(frame(DATA, 0, last, b"d"))
    assert goaway_code(wire.server_frames()) == ErrorCodes.FLOW_CONTROL_ERROR


def test_a_connection_window_without_stream_windows_is_passed_on_up_to_the_cap():
    # The client opens its connection window wide and keeps every stream's shut:
    # the server may not fill stream after stream's buffer beyond the cap.
    enc = Encoder()
    wire = Wire().client(
        PREFACE
        + settings_frame({INITIAL_WINDOW_SIZE: 0})
        + frame(SETTINGS, ACK, 0)
        + window_update(0, 2**31 - 1 - DEFAULT_WINDOW)
    )
    wire.server(server_start())
    assert sum(i for _, i in updates(wire.server_frames())) == CAP - DEFAULT_WINDOW
    streams = list(range(1, 2 * (CAP // BUFFER) + 2, 2))
    for sid in streams:
        download(wire, enc, sid)
    for sid in streams[:-1]:
        wire.server(frame(DATA, 0, sid, b"d" * 16384) * (BUFFER // 16384))
    assert not wire.of(Close) and not data_sent(wire.client_frames())
    wire.server(frame(DATA, 0, streams[-1], b"d"))
    assert goaway_code(wire.server_frames()) == ErrorCodes.FLOW_CONTROL_ERROR


def test_a_fast_client_lets_the_server_send_past_its_buffer_credited_as_bytes_go_on():
    # The cap bounds what is held, not the pipe: as bytes go on to a client that
    # keeps its windows open, the server gets connection credit back.
    enc = Encoder()
    wire = Wire().client(
        PREFACE
        + settings_frame({INITIAL_WINDOW_SIZE: 2**31 - 1})
        + frame(SETTINGS, ACK, 0)
        + window_update(0, 2**31 - 1 - DEFAULT_WINDOW)
    )
    wire.server(server_start())
    download(wire, enc, 1)
    total = 0
    for _ in range(2 * CAP // 16384):  # twice the cap, never more than its credit
        wire.server(frame(DATA, 0, 1, b"d" * 16384))
        total += 16384
    assert sum(n for _, n in data_sent(wire.client_frames())) == total
    assert not wire.of(Close)
    # The server's connection window: the cap at first, and every byte forwarded
    # given back (in batches; the last batch is due right after the last frame).
    granted = sum(i for sid, i in updates(wire.server_frames()) if sid == 0)
    assert DEFAULT_WINDOW + granted == CAP + total


def test_a_download_read_in_any_split_reaches_the_client_frame_for_frame():
    # 320 KiB of response DATA in frames of varying size, read the way a socket
    # hands it over: mid-header, mid-payload, several frames at once, and reads
    # large enough that the relay forwards them without joining them first.
    enc = Encoder()
    wire = Wire().client(client_start() + window_update(0, 1 << 24))
    wire.client(settings_frame({0x4: 1 << 24}))
    wire.server(server_start())
    wire.client(frame(HEADERS, END_HEADERS | END_STREAM, 1, enc.encode(request_headers("/big"))))
    server_enc = Encoder()
    server_enc.header_table_size = 0  # it applied our setting
    response = frame(HEADERS, END_HEADERS, 1, server_enc.encode([(b":status", b"200")]))
    sizes = [16384, 1, 9000, 16384, 300, *([16384] * 17), 5000]
    chunks = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    body = b"".join(
        frame(DATA, END_STREAM if i == len(chunks) - 1 else 0, 1, chunk)
        for i, chunk in enumerate(chunks)
    )
    wire.to_client.clear()
    stream = response + body
    cuts = [0, 4, 9, 13, 16400, 16401, 90000, 90003, 300000, len(stream)]
    for start, end in zip(cuts, cuts[1:], strict=False):
        wire.server(stream[start:end])

    data = [f for f in wire.client_frames() if isinstance(f, DataFrame)]
    assert [(f.stream_id, bytes(f.data)) for f in data] == [(1, chunk) for chunk in chunks]
    assert "END_STREAM" in data[-1].flags
    assert wire.to_client.endswith(body[-(9 + 5000) :])  # the frames as the server sent them


def test_an_upload_read_in_any_split_reaches_the_server_frame_for_frame():
    # The client's side of the download above: reads that end mid-header and
    # mid-payload, and reads that complete a cut frame and carry more.
    enc = Encoder()
    wire = Wire().client(client_start())
    wire.server(
        settings_frame({INITIAL_WINDOW_SIZE: 1 << 24})
        + frame(SETTINGS, ACK, 0)
        + window_update(0, 1 << 24)
    )
    sizes = [16384, 1, 9000, 16384, 300, *([16384] * 5), 5000]
    chunks = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    body = b"".join(
        frame(DATA, END_STREAM if i == len(chunks) - 1 else 0, 1, chunk)
        for i, chunk in enumerate(chunks)
    )
    stream = upload_headers(enc, 1) + body
    cuts = [0, 4, 9, 13, 16400, 16401, 40000, 40003, 90000, len(stream)]
    for start, end in zip(cuts, cuts[1:], strict=False):
        wire.client(stream[start:end])

    data = [f for f in wire.server_frames() if isinstance(f, DataFrame)]
    assert [(f.stream_id, bytes(f.data)) for f in data] == [(1, chunk) for chunk in chunks]
    assert "END_STREAM" in data[-1].flags
    assert wire.to_server.endswith(body[-(9 + 5000) :])


def test_data_waits_for_the_server_window_and_is_split_to_fit_it():
    enc = Encoder()
    wire = Wire().client(client_start())
    # The server allows 1000 bytes per stream.
    wire.server(settings_frame({0x4: 1000}) + frame(SETTINGS, ACK, 0))
    wire.client(
        frame(HEADERS, END_HEADERS, 1, enc.encode(request_headers("/up", "POST")))
        + frame(DATA, END_STREAM, 1, b"z" * 2500)
    )
    sent = [f for f in wire.server_frames() if isinstance(f, DataFrame)]
    assert [len(f.data) for f in sent] == [1000]
    wire.server(window_update(1, 1000))
    sent = [f for f in wire.server_frames() if isinstance(f, DataFrame)]
    assert [len(f.data) for f in sent] == [1000, 1000]
    wire.server(window_update(1, 4000))
    sent = [f for f in wire.server_frames() if isinstance(f, DataFrame)]
    assert [len(f.data) for f in sent] == [1000, 1000, 500]
    assert [("END_STREAM" in f.flags) for f in sent] == [False, False, True]


# ------------------------------------------------------------ a read's run of DATA frames
#
# The DATA frames of one stream that a server read carries one after another go
# on as one slice of the read; what the frame-by-frame path would do differently
# with any of them (no room, padding, a content-length broken, another stream)
# ends the run there.


def response_head(server_enc: Encoder, sid: int, length: int | None = None) -> bytes:
    fields = [(b":status", b"200")]
    if length is not None:
        fields.append((b"content-length", str(length).encode()))
    return frame(HEADERS, END_HEADERS, sid, server_enc.encode(fields))


def two_downloads(client_window: int, connection_window: int = 1 << 24) -> tuple[Wire, Encoder]:
    """Streams 1 and 3 answered (HEADERS), the client granting ``client_window``
    per stream and ``connection_window`` connection-wide."""
    enc, server_enc = Encoder(), Encoder()
    server_enc.header_table_size = 0
    wire = Wire().client(
        PREFACE
        + settings_frame({INITIAL_WINDOW_SIZE: client_window})
        + frame(SETTINGS, ACK, 0)
        + (
            window_update(0, connection_window - DEFAULT_WINDOW)
            if connection_window > DEFAULT_WINDOW
            else b""
        )
    )
    wire.server(server_start())
    for sid in (1, 3):
        wire.client(frame(HEADERS, END_HEADERS | END_STREAM, sid, get(enc, "/big")))
        wire.server(response_head(server_enc, sid))
    wire.step()
    return wire, server_enc


def test_a_read_with_data_for_two_streams_and_a_cut_frame_goes_on_byte_for_byte():
    wire, _ = two_downloads(1 << 20)
    frames = [
        frame(DATA, 0, 1, b"a" * 16384),
        frame(DATA, 0, 1, b"b" * 16384),
        frame(DATA, 0, 3, b"c" * 16384),
        frame(DATA, END_STREAM, 3, b"d" * 100),
        frame(DATA, 0, 1, b"e" * 16384),
        frame(DATA, END_STREAM, 1, b"f" * 7),
    ]
    stream = b"".join(frames)
    cut = len(stream) - 9 - 7 - 5000  # the read ends inside the fifth frame
    wire.server(stream[:cut])
    assert bytes(wire.to_client[wire._client_mark :]) == b"".join(frames[:4])
    assert wire.of(Reply) == [Reply(3, {"status": 200})]
    wire.server(stream[cut:])
    assert bytes(wire.to_client[wire._client_mark :]) == stream
    assert wire.of(Reply) == [Reply(3, {"status": 200}), Reply(1, {"status": 200})]
    # Nothing held, nothing queued: every byte the server sent counts once in its
    # connection window, credited back within the cap.
    granted = sum(i for sid, i in updates(wire.server_frames()) if sid == 0)
    assert DEFAULT_WINDOW + granted <= CAP + 3 * 16384 + 100 + 7


def test_a_run_stops_at_the_clients_stream_window_and_the_rest_waits_exactly():
    # The client grants 40,000 bytes per stream: two frames fit whole, the third
    # is cut to the 7,232 bytes left, and the rest goes on as the client grants more.
    wire, _ = two_downloads(40000)
    body = [bytes([65 + i]) * 16384 for i in range(4)]
    wire.server(b"".join(frame(DATA, 0, 1, chunk) for chunk in body))
    assert data_sent(wire.new_to_client()) == [(1, 16384), (1, 16384), (1, 7232)]
    wire.client(window_update(1, (16384 - 7232) + 16384 - 1))
    assert data_sent(wire.new_to_client()) == [(1, 16384 - 7232), (1, 16384 - 1)]
    wire.client(window_update(1, 1))
    sent = [f for f in frames_in(wire.to_client) if isinstance(f, DataFrame)]
    assert b"".join(bytes(f.data) for f in sent if f.stream_id == 1) == b"".join(body)


def test_a_run_stops_at_the_clients_connection_window_across_streams():
    # 65,535 bytes connection-wide: stream 1's three frames take 49,152 of them,
    # stream 3 gets the 16,383 left, and the rest once the client grants more.
    wire, _ = two_downloads(1 << 20, connection_window=DEFAULT_WINDOW)
    first = [frame(DATA, 0, 1, b"a" * 16384)] * 3
    second = [frame(DATA, 0, 3, b"b" * 16384), frame(DATA, END_STREAM, 3, b"c" * 10)]
    wire.server(b"".join(first + second))
    assert data_sent(wire.new_to_client()) == [(1, 16384)] * 3 + [(3, 16383)]
    wire.client(window_update(0, 11))
    assert data_sent(wire.new_to_client()) == [(3, 1), (3, 10)]
    assert wire.of(Reply) == [Reply(3, {"status": 200})]


def test_a_padded_frame_inside_a_run_goes_on_as_the_server_sent_it():
    wire, _ = two_downloads(1 << 20)
    padded = frame(DATA, 0x8, 1, bytes([10]) + b"p" * 500 + b"\x00" * 10)
    frames = [frame(DATA, 0, 1, b"a" * 5000), padded, frame(DATA, END_STREAM, 1, b"z" * 3)]
    wire.server(b"".join(frames))
    assert bytes(wire.to_client[wire._client_mark :]) == b"".join(frames)
    assert wire.of(Reply) == [Reply(1, {"status": 200})]


def test_a_frame_of_a_run_past_the_content_length_is_a_stream_error_after_those_before_it():
    enc, server_enc = Encoder(), Encoder()
    server_enc.header_table_size = 0
    wire = Wire().client(client_start()).server(server_start())
    wire.client(frame(HEADERS, END_HEADERS | END_STREAM, 1, get(enc, "/big")))
    wire.server(response_head(server_enc, 1, length=20000))
    wire.step()
    wire.server(frame(DATA, 0, 1, b"a" * 10000))
    assert data_sent(wire.new_to_client()) == [(1, 10000)]
    # 18,000 bytes are within the 20,000 announced, 26,000 are not.
    wire.server(frame(DATA, 0, 1, b"b" * 8000) + frame(DATA, 0, 1, b"c" * 8000))
    to_client = wire.new_to_client()
    assert data_sent(to_client) == [(1, 8000)]
    (reset,) = [f for f in to_client if isinstance(f, RstStreamFrame)]
    assert (reset.stream_id, reset.error_code) == (1, ErrorCodes.INTERNAL_ERROR)
    (to_server,) = [f for f in wire.new_to_server() if isinstance(f, RstStreamFrame)]
    assert (to_server.stream_id, to_server.error_code) == (1, ErrorCodes.PROTOCOL_ERROR)
    assert [e.side for e in wire.of(ParseError)] == ["server"]


def test_a_body_that_ends_short_of_its_content_length_inside_a_run_is_a_stream_error():
    enc, server_enc = Encoder(), Encoder()
    server_enc.header_table_size = 0
    wire = Wire().client(client_start()).server(server_start())
    wire.client(frame(HEADERS, END_HEADERS | END_STREAM, 1, get(enc, "/big")))
    wire.server(response_head(server_enc, 1, length=30000))
    wire.step()
    wire.server(frame(DATA, 0, 1, b"a" * 16384) + frame(DATA, END_STREAM, 1, b"b" * 5000))
    to_client = wire.new_to_client()
    assert data_sent(to_client) == [(1, 16384)]
    (reset,) = [f for f in to_client if isinstance(f, RstStreamFrame)]
    assert (reset.stream_id, reset.error_code) == (1, ErrorCodes.INTERNAL_ERROR)
    assert [e.side for e in wire.of(ParseError)] == ["server"]


def test_grpc_messages_are_counted_across_a_read_of_frames_cut_anywhere():
    # Four response messages in one byte stream, framed every 16 KiB (a prefix
    # cut between two frames, a frame holding a message's end and whole
    # messages), read in pieces that end mid-frame.
    enc, server_enc = Encoder(), Encoder()
    server_enc.header_table_size = 0
    wire = Wire(decide=lambda call: Decision(True, policy="p", rule="r"))
    wire.client(
        PREFACE
        + settings_frame({INITIAL_WINDOW_SIZE: 1 << 20})
        + frame(SETTINGS, ACK, 0)
        + window_update(0, 1 << 24)
    )
    wire.server(server_start())
    request = enc.encode(grpc_headers("/pkg.Service/Stream"))
    wire.client(
        frame(HEADERS, END_HEADERS, 1, request)
        + frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x01x")
    )
    answer = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    wire.server(frame(HEADERS, END_HEADERS, 1, server_enc.encode(answer)))
    # The second message's prefix starts 2 bytes before the first frame's end;
    # the third frame lies wholly inside that message.
    sizes = [16381, 40000, 3, 20000]
    body = b"".join(b"\x00" + size.to_bytes(4, "big") + b"m" * size for size in sizes)
    data = b"".join(frame(DATA, 0, 1, body[at : at + 16384]) for at in range(0, len(body), 16384))
    trailers = frame(
        HEADERS, END_HEADERS | END_STREAM, 1, server_enc.encode([(b"grpc-status", b"0")])
    )
    stream = data + trailers
    for start in range(0, len(stream), 20000):
        wire.server(stream[start : start + 20000])
    assert wire.of(Reply) == [
        Reply(1, {"status": 200, "grpc_status": 0, "request_messages": 1, "response_messages": 4})
    ]
    sent = [f for f in wire.client_frames() if isinstance(f, DataFrame)]
    assert b"".join(bytes(f.data) for f in sent) == body


# ------------------------------------------------------------ HPACK table sizes


def test_the_server_is_asked_for_a_table_of_size_0_and_the_client_for_nothing():
    wire = Wire().client(client_start())
    (to_client,) = [
        f for f in wire.client_frames() if isinstance(f, SettingsFrame) and "ACK" not in f.flags
    ]
    assert HEADER_TABLE_SIZE not in to_client.settings
    (to_server,) = [
        f for f in wire.server_frames() if isinstance(f, SettingsFrame) and "ACK" not in f.flags
    ]
    assert to_server.settings[HEADER_TABLE_SIZE] == 0
    assert to_server.settings[0x2] == 0  # no push


def test_after_the_server_acknowledges_its_response_blocks_go_to_the_client_byte_for_byte():
    client_enc, server_enc = Encoder(), Encoder()
    wire = Wire().client(client_start()).server(server_start())
    wire.client(frame(HEADERS, END_HEADERS | END_STREAM, 1, get(client_enc, "/a")))
    server_enc.header_table_size = 0  # it applied our setting: its block opens with the update
    block = server_enc.encode([(b":status", b"200"), (b"x-served-by", b"origin-7")])
    assert block[0] == 0x20
    wire.to_client.clear()
    wire.server(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    (headers,) = [f for f in wire.client_frames() if isinstance(f, HeadersFrame)]
    assert headers.data == block
    assert wire.of(Reply) == [Reply(1, {"status": 200})]


def test_response_blocks_sent_before_the_acknowledgement_are_reencoded_for_the_client():
    client_enc, server_enc = Encoder(), Encoder()
    wire = Wire().client(client_start()).server(server_start(acknowledge=False))
    wire.client(
        frame(HEADERS, END_HEADERS, 1, get(client_enc, "/a"))
        + frame(HEADERS, END_HEADERS, 3, get(client_enc, "/b"))
    )
    # Before its acknowledgement the server may index fields in its 4,096-byte table
    # and refer to them in the next block: the client has no such entries.
    fields = [(b":status", b"200"), (b"x-served-by", b"origin-7")]
    first, second = server_enc.encode(fields), server_enc.encode(fields)
    assert len(second) < len(first)  # the second block is two indexed references
    wire.to_client.clear()
    wire.server(
        frame(HEADERS, END_HEADERS | END_STREAM, 1, first)
        + frame(HEADERS, END_HEADERS | END_STREAM, 3, second)
    )
    client_decoder = Decoder()
    blocks = [f.data for f in wire.client_frames() if isinstance(f, HeadersFrame)]
    assert [client_decoder.decode(b, raw=True) for b in blocks] == [fields, fields]


def test_a_server_that_acknowledges_table_size_0_and_keeps_its_table_is_a_connection_error():
    client_enc, server_enc = Encoder(), Encoder()
    wire = Wire().client(client_start()).server(server_start())
    wire.client(frame(HEADERS, END_HEADERS | END_STREAM, 1, get(client_enc, "/a")))
    # No dynamic table size update at the start of its first block after the ACK.
    block = server_enc.encode([(b":status", b"200"), (b"x-served-by", b"origin-7")])
    wire.server(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))

    assert goaway_code(wire.server_frames()) == ErrorCodes.COMPRESSION_ERROR
    assert goaway_code(wire.client_frames()) == ErrorCodes.INTERNAL_ERROR
    (error,) = wire.of(ParseError)
    assert error.side == "server" and "did not shrink its table" in str(error.error)
    assert wire.of(Close)


def test_a_server_that_grows_its_table_again_is_a_connection_error():
    client_enc, server_enc = Encoder(), Encoder()
    wire = Wire().client(client_start()).server(server_start())
    wire.client(
        frame(HEADERS, END_HEADERS | END_STREAM, 1, get(client_enc, "/a"))
        + frame(HEADERS, END_HEADERS | END_STREAM, 3, get(client_enc, "/b"))
    )
    server_enc.header_table_size = 0
    wire.server(
        frame(HEADERS, END_HEADERS | END_STREAM, 1, server_enc.encode([(b":status", b"200")]))
    )
    server_enc.header_table_size = 256  # above the 0 we advertised
    wire.server(
        frame(HEADERS, END_HEADERS | END_STREAM, 3, server_enc.encode([(b":status", b"200")]))
    )
    assert goaway_code(wire.server_frames()) == ErrorCodes.COMPRESSION_ERROR


def test_client_blocks_may_use_the_default_table_and_reach_the_server_reencoded():
    t = Transcript(H2Engine(decide)).start()
    for stream_id in (1, 3, 5):  # h2's encoder indexes: blocks 2 and 3 are references
        t.client.send_headers(
            stream_id, request_headers("/same", extra=[(b"x-token", b"t0p")]), end_stream=True
        )
    t.pump()
    received = [e.headers for e in t.of(ev.RequestReceived, "server")]
    assert len(received) == 3 and all((b"x-token", b"t0p") in h for h in received)


def test_a_client_table_size_update_above_4096_is_a_compression_error():
    update_to_4097 = bytes([0x3F, 0xE2, 0x1F])  # RFC 7541 §5.1 integer, 5-bit prefix
    enc = Encoder()
    block = update_to_4097 + get(enc, "/a")
    wire = Wire().client(client_start() + frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    assert goaway_code(wire.client_frames()) == ErrorCodes.COMPRESSION_ERROR


def test_a_repeated_request_is_judged_every_time():
    calls = []

    def counting(request):
        calls.append(request.path)
        return decide(request)

    t = Transcript(H2Engine(counting)).start()
    for stream_id in (1, 3, 5, 7):
        t.client.send_headers(stream_id, request_headers("/poll"), end_stream=True)
    t.pump()
    assert calls == ["/poll"] * 4
    assert [a.key for a in t.of(Access)] == [1, 3, 5, 7]


# ------------------------------------------------------------ CONTINUATION


def test_a_request_split_over_continuation_frames_is_judged_whole():
    enc = Encoder()
    block = enc.encode(request_headers("/split", extra=[(b"x-long", b"v" * 3000)]))
    a, b, c = block[:10], block[10:1000], block[1000:]
    wire = Wire().client(client_start()).server(server_start())
    wire.client(frame(HEADERS, END_STREAM, 1, a) + frame(CONTINUATION, 0, 1, b))
    assert not wire.of(Access) and wire.engine.reading_headers
    wire.client(frame(CONTINUATION, END_HEADERS, 1, c))
    (access,) = wire.of(Access)
    assert access.request.path == "/split"
    assert ("x-long", "v" * 3000) in access.request.headers
    (sent,) = [f for f in wire.server_frames() if isinstance(f, HeadersFrame)]
    assert "END_STREAM" in sent.flags
    assert (b"x-long", b"v" * 3000) in Decoder().decode(sent.data, raw=True)


def test_a_response_split_over_continuation_frames_reaches_the_client_as_sent():
    t = Transcript(H2Engine(decide)).start()
    t.client.send_headers(1, request_headers("/big-head"), end_stream=True)
    t.pump()
    big = [(b":status", b"200"), (b"x-blob", b"q" * 40000)]  # > 2 frames of 16 KiB
    t.server.send_headers(1, big, end_stream=True)
    t.pump()
    (response,) = t.of(ev.ResponseReceived, "client")
    assert response.headers == big


def test_a_frame_inside_a_header_block_is_a_connection_error():
    enc = Encoder()
    wire = Wire().client(client_start())
    wire.client(frame(HEADERS, 0, 1, get(enc, "/a")) + frame(PING, 0, 0, b"12345678"))
    assert goaway_code(wire.client_frames()) == ErrorCodes.PROTOCOL_ERROR


def test_a_continuation_on_another_stream_is_a_connection_error():
    enc = Encoder()
    block = get(enc, "/a")
    wire = Wire().client(client_start())
    wire.client(frame(HEADERS, 0, 1, block[:5]) + frame(CONTINUATION, END_HEADERS, 3, block[5:]))
    assert goaway_code(wire.client_frames()) == ErrorCodes.PROTOCOL_ERROR


def test_a_continuation_without_a_header_block_is_a_connection_error():
    wire = Wire().client(client_start() + frame(CONTINUATION, END_HEADERS, 1, b"\x82"))
    assert goaway_code(wire.client_frames()) == ErrorCodes.PROTOCOL_ERROR


# ------------------------------------------------------------ stream states


def test_headers_on_a_stream_that_has_ended_is_a_stream_closed_connection_error():
    enc = Encoder()
    wire = Wire().client(client_start()).server(server_start())
    wire.client(frame(HEADERS, END_HEADERS | END_STREAM, 1, get(enc, "/a")))
    wire.server(
        frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x20\x88")
    )  # update to 0, :status 200
    assert wire.of(Reply) == [Reply(1, {"status": 200})]
    wire.client(frame(HEADERS, END_HEADERS | END_STREAM, 1, get(enc, "/again")))
    assert goaway_code(wire.client_frames()) == ErrorCodes.STREAM_CLOSED


def test_a_stream_id_below_one_already_used_is_a_protocol_error():
    enc = Encoder()
    wire = Wire().client(client_start()).server(server_start())
    wire.client(frame(HEADERS, END_HEADERS | END_STREAM, 5, get(enc, "/a")))
    wire.client(frame(HEADERS, END_HEADERS | END_STREAM, 3, get(enc, "/b")))
    assert goaway_code(wire.client_frames()) == ErrorCodes.PROTOCOL_ERROR
    assert [a.request.path for a in wire.of(Access)] == ["/a"]


def test_frames_the_client_had_in_flight_on_a_stream_we_reset_are_ignored():
    enc = Encoder()
    wire = Wire().client(client_start()).server(server_start())
    wire.client(frame(HEADERS, END_HEADERS, 1, enc.encode(request_headers("/admin", "POST"))))
    wire.client(frame(DATA, 0, 1, b"late") + frame(DATA, END_STREAM, 1, b"later"))
    frames = wire.client_frames()
    assert [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)] == [
        (1, ErrorCodes.NO_ERROR)
    ]
    assert not [f for f in frames if isinstance(f, GoAwayFrame)]


def test_request_access_carries_the_typed_request():
    enc = Encoder()
    wire = Wire().client(client_start()).server(server_start())
    wire.client(
        frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            enc.encode(request_headers("/x?y=1", extra=[(b"accept", b"*/*")])),
        )
    )
    (access,) = wire.of(Access)
    assert access.request == HttpRequest(
        "GET", "/x?y=1", "example.test", (("accept", "*/*"),), version="2"
    )
