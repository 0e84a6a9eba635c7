"""How the HTTP/2 engine ends a healthy connection when asked to ``finish()``
(a takeover's drain): the graceful two-step GOAWAY of RFC 9113 6.8.

GOAWAY(NO_ERROR, 2^31-1) and a PING first; once the PING comes back, GOAWAY(NO_ERROR,
the last stream id received); streams up to it are served to their end, later ones
refused; then ``Finished(told=True)``, and the client closes. The frames are decoded
with hyperframe, and read by a real h2 client (fed whole, byte by byte, at random).
"""

from __future__ import annotations

import h2.events as ev
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame, PingFrame, SettingsFrame

from parsers.base import Close, Decision, Finished, ToClient
from parsers.http2.engine import FINISH_PING, MAX_STREAM_ID, H2Engine
from tests.support.h2_transcript import SPLITS, Transcript, request_headers


def allow(_request: object) -> Decision:
    return Decision(True)


@pytest.fixture(params=list(SPLITS))
def split(request):
    return SPLITS[request.param]


def frames(data: bytes) -> list[Frame]:
    """The frames in ``data``, decoded with hyperframe."""
    out = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        out.append(frame)
        view = view[9 + length :]
    return out


def goaways(t: Transcript) -> list[tuple[int, int]]:
    return [(e.error_code, e.last_stream_id) for e in t.of(ev.ConnectionTerminated, "client")]


def respond(t: Transcript, stream_id: int) -> None:
    t.server.send_headers(stream_id, [(b":status", b"200")])
    t.server.send_data(stream_id, b"ok", end_stream=True)
    t.pump()


def test_finish_sends_goaway_with_the_highest_id_and_a_ping_then_nothing_else():
    t = Transcript(H2Engine(allow), graceful_client=True).start()
    t.client.send_headers(1, request_headers("/a"), end_stream=True)
    t.pump()

    [out] = t.engine.finish()

    assert type(out) is ToClient
    goaway, ping = frames(out.data)
    assert type(goaway) is GoAwayFrame
    assert (goaway.error_code, goaway.last_stream_id) == (0, MAX_STREAM_ID)
    assert type(ping) is PingFrame and ping.opaque_data == FINISH_PING
    assert "ACK" not in ping.flags
    assert t.engine.finish() == []  # asking again changes nothing


def test_streams_opened_before_the_ping_came_back_are_served_later_ones_refused(split):
    t = Transcript(H2Engine(allow), split, graceful_client=True).start()
    t.client.send_headers(1, request_headers("/a"), end_stream=True)
    t.pump()

    first = t.engine.finish()
    # Stream 3 crosses our GOAWAY on the wire: the client had not read it yet.
    t.client.send_headers(3, request_headers("/b"), end_stream=True)
    for chunk in split(t.client.data_to_send()):
        t._run(t.engine.client_data(chunk))
    t._run(first)  # now it reads GOAWAY(2^31-1) and the PING, and answers the PING
    t.pump()

    assert goaways(t) == [(0, MAX_STREAM_ID), (0, 3)]
    served = [e.stream_id for e in t.of(ev.RequestReceived, "server")]
    assert served == [1, 3]

    # A stream after the final GOAWAY's id was never processed: refused, safe to retry.
    t.client.send_headers(5, request_headers("/c"), end_stream=True)
    t.pump()
    assert [e.stream_id for e in t.of(ev.RequestReceived, "server")] == [1, 3]
    [refused] = t.of(ev.StreamReset, "client")
    assert (refused.stream_id, refused.error_code) == (5, ErrorCodes.REFUSED_STREAM)

    respond(t, 1)
    assert t.of(Finished) == []  # stream 3 is still owed
    respond(t, 3)
    assert [e.stream_id for e in t.of(ev.StreamEnded, "client")] == [1, 3]
    assert t.of(Finished) == [Finished(told=True)]
    assert t.of(Close) == []  # the client closes, not us

    out = t.engine.client_data(b"")
    assert out[-1] == Close("client closed")  # (behind a GOAWAY toward the server)


def test_an_idle_connection_is_finished_one_round_trip_after_the_ask(split):
    t = Transcript(H2Engine(allow), split, graceful_client=True).start()
    t.client.send_headers(1, request_headers("/a"), end_stream=True)
    t.pump()
    respond(t, 1)

    t._run(t.engine.finish())
    assert t.of(Finished) == []  # the PING has not come back yet
    t.pump()

    assert goaways(t) == [(0, MAX_STREAM_ID), (0, 1)]
    assert t.of(Finished) == [Finished(told=True)]


def test_a_ping_of_the_client_s_own_is_not_taken_for_ours():
    t = Transcript(H2Engine(allow), graceful_client=True).start()
    t.engine.finish()
    t.client.ping(b"theirs!!")
    t.pump()  # the engine's h2 answers it; our PING's answer is still to come
    assert [f for f in t.of(ev.PingAckReceived, "client") if f.ping_data == b"theirs!!"]
    assert goaways(t) == []  # our GOAWAYs were never delivered (finish's bytes dropped)
    assert t.of(Finished) == []


def test_finish_before_the_client_preface_is_answered_after_it():
    engine = H2Engine(allow)
    [out] = engine.finish()
    kinds = [type(f) for f in frames(out.data)]
    assert kinds[0] is SettingsFrame  # our preface comes first
    assert kinds[-2:] == [GoAwayFrame, PingFrame]


def test_a_connection_already_going_away_is_left_to_end_as_it_does(split):
    t = Transcript(H2Engine(allow), split, graceful_server=True).start()
    t.server.close_connection()  # a server's GOAWAY: the engine is refusing already
    t.pump()
    assert t.engine.finish() == []
