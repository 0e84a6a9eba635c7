"""Drive an Engine with real h2 connection objects on both ends, no sockets.

A ``Transcript`` owns an h2 client and an h2 server (python-hyper/h2, the
same library a real peer would use) and pumps bytes between them through the
engine until nothing moves. Bytes can be handed to the engine whole, byte by
byte, or split at random points (``split``). Events each peer saw and the
engine's non-byte commands are recorded for assertions.

A ``Yield`` (the engine bounded its work for one turn of the event loop) is
resumed at once, as the driver would on its next turn; ``yields`` counts them.
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    ResponseReceived,
    TrailersReceived,
)
from h2.settings import Settings
from hyperframe.frame import Frame, GoAwayFrame

from parsers.base import ToClient, ToServer, Yield
from tests.support.feeding import WAYS, Splitter, splitter

Split = Splitter


class GracefulPeer(H2Connection):
    """An h2 peer that, like real clients and servers, lets the streams in flight
    finish after a graceful GOAWAY (NO_ERROR); plain h2 treats any GOAWAY as the
    end, and any frame after it as a protocol error."""

    def _receive_goaway_frame(self, frame: GoAwayFrame):
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        event = ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


# One splitter per way, shared by the module that uses them (see tests/support/feeding.py).
SPLITS: dict[str, Split] = {way: splitter(way) for way in WAYS}


def _config(client_side: bool, strict: bool = True) -> H2Configuration:
    return H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_outbound_headers=strict,
        normalize_outbound_headers=strict,
    )


class Transcript:
    def __init__(
        self,
        engine,
        split: Split = SPLITS["whole"],
        *,
        strict_client: bool = True,
        graceful_client: bool = False,
        graceful_server: bool = False,
        client_listens: bool = True,
    ):
        self.engine = engine
        self.split = split
        # Plain h2 treats any GOAWAY as the end; real clients finish their streams.
        client_class = GracefulPeer if graceful_client else H2Connection
        self.client = client_class(config=_config(True, strict_client))
        self.server = (GracefulPeer if graceful_server else H2Connection)(config=_config(False))
        self.client_events: list = []
        self.server_events: list = []
        self.commands: list = []  # everything the engine emitted except bytes
        self.to_server_bytes = 0
        self.server_reads = True  # False: the server application stops consuming DATA
        self.client_reads = True
        self.server_unacked: list[tuple[int, int]] = []
        self.yields = 0
        # False: the client never reads; what the engine writes to it stays in ``unread``.
        self.client_listens = client_listens
        self.unread = bytearray()

    def start(
        self, server_settings: dict | None = None, client_settings: dict | None = None
    ) -> Transcript:
        if client_settings:
            self.client.update_settings(client_settings)
        self.client.initiate_connection()
        if server_settings:
            self.server.local_settings = Settings(client=False, initial_values=server_settings)
        self.server.initiate_connection()
        self.pump()
        return self

    # ---------------------------------------------------------------- pumping

    def pump(self, rounds: int = 10_000) -> None:
        for _ in range(rounds):
            moved = False
            data = self.client.data_to_send()
            if data:
                moved = True
                for chunk in self.split(data):
                    self._run(self.engine.client_data(chunk))
            data = self.server.data_to_send()
            if data:
                moved = True
                for chunk in self.split(data):
                    self._run(self.engine.server_data(chunk))
            if not moved:
                return
        raise AssertionError("transcript did not settle")

    def client_raw(self, data: bytes) -> None:
        """Bytes from the client that h2's client object did not produce (violations)."""
        for chunk in self.split(data):
            self._run(self.engine.client_data(chunk))
        self.pump()

    def server_raw(self, data: bytes) -> None:
        for chunk in self.split(data):
            self._run(self.engine.server_data(chunk))
        self.pump()

    def _run(self, commands) -> None:
        for cmd in commands:
            if type(cmd) is ToServer:
                self.to_server_bytes += len(cmd.data)
                events = self.server.receive_data(cmd.data)
                self.server_events += events
                self._consume(self.server, events, self.server_reads)
            elif type(cmd) is ToClient and not self.client_listens:
                self.unread += cmd.data
            elif type(cmd) is ToClient:
                events = self.client.receive_data(cmd.data)
                self.client_events += events
                self._consume(self.client, events, self.client_reads)
            elif type(cmd) is Yield:
                self.yields += 1
                self._run(cmd.resume())
            else:
                self.commands.append(cmd)

    def _consume(self, conn: H2Connection, events, reads: bool) -> None:
        for event in events:
            if type(event) is DataReceived and event.flow_controlled_length:
                if reads:
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif conn is self.server:
                    self.server_unacked.append((event.flow_controlled_length, event.stream_id))

    def server_resumes_reading(self) -> None:
        self.server_reads = True
        for size, stream_id in self.server_unacked:
            self.server.acknowledge_received_data(size, stream_id)
        self.server_unacked.clear()
        self.pump()

    def send_body(
        self, conn: H2Connection, stream_id: int, body: bytes, end_stream: bool = False
    ) -> None:
        """Send as a real peer would: frame-sized pieces, waiting (pumping) for window."""
        pos = 0
        for _ in range(10_000):
            if pos >= len(body):
                break
            step = min(
                conn.local_flow_control_window(stream_id),
                conn.max_outbound_frame_size,
                len(body) - pos,
            )
            if step == 0:
                self.pump()
                continue
            conn.send_data(stream_id, body[pos : pos + step])
            pos += step
        else:
            raise AssertionError("peer never got window to send its body")
        if end_stream:
            conn.end_stream(stream_id)
        self.pump()

    # ---------------------------------------------------------------- queries

    def of(self, kind, side: str = "commands") -> list:
        source = {
            "commands": self.commands,
            "client": self.client_events,
            "server": self.server_events,
        }[side]
        return [x for x in source if isinstance(x, kind)]

    def body(self, side: str, stream_id: int) -> bytes:
        events = self.client_events if side == "client" else self.server_events
        return b"".join(
            e.data for e in events if type(e) is DataReceived and e.stream_id == stream_id
        )


def frames_in(data: bytes | bytearray) -> list[Frame]:
    """The frames in a byte stream that starts on a frame boundary, decoded by hyperframe."""
    frames = []
    view = memoryview(bytes(data))
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    assert not view, "the stream ends inside a frame"
    return frames


def request_headers(
    path: str = "/", method: str = "GET", authority: str = "example.test", extra=()
) -> list:
    return [
        (b":method", method.encode()),
        (b":scheme", b"http"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
        *extra,
    ]


def grpc_headers(path: str, extra=()) -> list:
    return request_headers(
        path,
        "POST",
        extra=[(b"content-type", b"application/grpc"), (b"te", b"trailers"), *extra],
    )


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def assert_grpc_trailers_only(t: Transcript, stream_id: int, grpc_status: int) -> dict:
    """What the h2 client read on ``stream_id`` is a gRPC trailers-only response:
    one HEADERS frame with END_STREAM (:status 200, content-type
    application/grpc, ``grpc_status``) and no DATA. Returns its headers."""
    on_stream = [e for e in t.client_events if getattr(e, "stream_id", None) == stream_id]
    (response,) = [e for e in on_stream if type(e) is ResponseReceived]
    assert response.stream_ended is not None, "trailers-only: END_STREAM on the one HEADERS"
    others = (DataReceived, TrailersReceived, InformationalResponseReceived)
    assert not [e for e in on_stream if isinstance(e, others)], "nothing but the one HEADERS"
    headers = dict(response.headers)
    assert len(headers) == len(response.headers), "no header repeated"
    assert headers[b":status"] == b"200"
    assert headers[b"content-type"] == b"application/grpc"
    assert headers[b"grpc-status"] == str(grpc_status).encode()
    return headers
