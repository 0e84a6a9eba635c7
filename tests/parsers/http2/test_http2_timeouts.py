"""What the HTTP/2 engine answers when the driver's clock runs out on a client.

A header block (or any frame but DATA) that the client leaves unfinished holds
the whole connection: RFC 9113 §6.10 lets no other frame in between. So the
answer to a head past its deadline, or a DATA frame that stalls, is for the
connection: GOAWAY(NO_ERROR) naming the limit, then close. The answers are read
back by a real h2 client (and the upstream's GOAWAY by a real h2 server).
"""

from __future__ import annotations

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes

from parsers.base import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    Close,
    Command,
    Reply,
    ToClient,
    ToServer,
    allow_all,
)
from parsers.http import HttpEngine
from parsers.http2.engine import PREFACE, H2Engine
from tests.support.h2_transcript import Transcript, request_headers

HEADERS, DATA, PING, CONTINUATION = 0x1, 0x0, 0x6, 0x9
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([kind, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


def deliver(t: Transcript, commands: list[Command]) -> list[Command]:
    """Hand the engine's bytes to the peers; the rest of the commands."""
    rest = []
    for cmd in commands:
        if type(cmd) is ToClient:
            t.client_events += t.client.receive_data(cmd.data)
        elif type(cmd) is ToServer:
            t.server_events += t.server.receive_data(cmd.data)
        else:
            rest.append(cmd)
    return rest


def goaway(events: list) -> tuple[ErrorCodes, int, bytes | None]:
    [terminated] = [e for e in events if type(e) is ev.ConnectionTerminated]
    return terminated.error_code, terminated.last_stream_id, terminated.additional_data


def test_an_unfinished_header_block_past_its_deadline_gets_goaway_no_error():
    engine = H2Engine(allow_all)
    t = Transcript(engine).start()
    t.client.send_headers(1, request_headers("/a"), end_stream=True)
    t.pump()
    t.server.send_headers(1, [(b":status", b"204")], end_stream=True)
    t.pump()  # stream 1 is done
    block = t.client.encoder.encode(request_headers("/slow"))
    t.client_raw(frame(HEADERS, END_STREAM, 3, block[:5]))  # no END_HEADERS: more to come
    assert engine.reading_headers

    rest = deliver(t, engine.client_timed_out(HEADER_TIMEOUT))

    # Stream 3 was never processed: the client may retry it elsewhere.
    assert goaway(t.client_events) == (ErrorCodes.NO_ERROR, 1, b"header_timeout")
    assert goaway(t.server_events)[0] == ErrorCodes.NO_ERROR  # nothing was in flight there
    assert rest == [Close("header_timeout")]
    assert not engine.reading_headers and engine.client_data(b"\x00") == []


def test_streams_in_flight_are_cut_and_their_upstream_twins_cancelled():
    engine = H2Engine(allow_all)
    t = Transcript(engine).start()
    t.client.send_headers(1, request_headers("/pending"), end_stream=True)
    t.pump()  # at the server, no answer yet
    t.client_raw(frame(PING, 0, 0, b"12345678")[:11])  # a control frame trickled in

    rest = deliver(t, engine.client_timed_out(HEADER_TIMEOUT))

    assert goaway(t.client_events) == (ErrorCodes.NO_ERROR, 1, b"header_timeout")
    assert goaway(t.server_events)[0] == ErrorCodes.CANCEL
    assert rest == [
        Reply(1, {"status": None, "reset": "connection closed"}),
        Close("header_timeout"),
    ]


def test_a_stalled_data_frame_is_a_body_and_gets_goaway_naming_the_body_timeout():
    engine = H2Engine(allow_all)
    t = Transcript(engine).start()
    t.client.send_headers(1, request_headers("/upload", "POST"))
    t.pump()
    t.client_raw(frame(DATA, END_STREAM, 1, b"x" * 100)[:30])  # 21 of 100 bytes
    assert engine.reading_body and not engine.reading_headers

    rest = deliver(t, engine.client_timed_out(BODY_TIMEOUT))

    assert goaway(t.client_events) == (ErrorCodes.NO_ERROR, 1, b"body_timeout")
    assert rest[-1] == Close("body_timeout")
    assert not engine.reading_body


def test_a_frame_is_a_head_from_its_first_byte_to_its_last():
    engine = H2Engine(allow_all)
    t = Transcript(engine).start()
    block = t.client.encoder.encode(request_headers("/trickled"))
    wire = frame(HEADERS, END_STREAM | END_HEADERS, 1, block)
    before = engine.heads_read
    for i in range(len(wire) - 1):
        engine.client_data(wire[i : i + 1])
        assert engine.reading_headers and engine.heads_read == before, i

    engine.client_data(wire[-1:])

    assert not engine.reading_headers and engine.heads_read != before


def test_a_header_block_is_one_head_over_its_continuation_frames():
    engine = H2Engine(allow_all)
    t = Transcript(engine).start()
    block = t.client.encoder.encode(request_headers("/in-pieces"))
    before = engine.heads_read
    engine.client_data(frame(HEADERS, END_STREAM, 1, block[:3]))
    engine.client_data(frame(CONTINUATION, 0, 1, block[3:6]))
    assert engine.reading_headers and engine.heads_read == before  # one head, one deadline

    engine.client_data(frame(CONTINUATION, END_HEADERS, 1, block[6:]))

    assert not engine.reading_headers and engine.heads_read != before


def test_a_preface_past_its_deadline_gets_our_settings_then_goaway():
    engine = HttpEngine(allow_all)
    engine.client_data(PREFACE[:10])  # "PRI * HTTP": HTTP/2, not yet said in full
    assert engine.reading_headers

    out = engine.client_timed_out(HEADER_TIMEOUT)

    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    events = client.receive_data(b"".join(c.data for c in out if type(c) is ToClient))
    # our connection preface (SETTINGS, the connection window), then the GOAWAY
    assert [type(e) for e in events] == [
        ev.RemoteSettingsChanged,
        ev.WindowUpdated,
        ev.ConnectionTerminated,
    ]
    assert goaway(events) == (ErrorCodes.NO_ERROR, 0, b"header_timeout")
    assert out[-1] == Close("header_timeout")
    assert not [c for c in out if type(c) is ToServer]  # the server never heard of it
