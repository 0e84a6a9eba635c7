"""HTTP/2 floods fed to the engine, and the turns that keep one read from holding the loop.

Issue 14, finding 5. Each flood comes from a real h2 client object; the answer
is read off the wire: GOAWAY with ENHANCE_YOUR_CALM (11) and the last stream
the proxy processed, decoded by hyperframe from the bytes the engine wrote, and
a ``LimitExceeded`` naming the ``H2Limits`` field. The budgets are small here
so that the transcripts stay short; one test runs the defaults. Every
transcript runs whole, byte by byte and split at random.
"""

from __future__ import annotations

from dataclasses import replace

import h2.events as ev
import hpack
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

from parsers.base import (
    Access,
    Close,
    Decision,
    LimitExceeded,
    ParseError,
    ToClient,
    ToServer,
    Yield,
)
from parsers.http2.engine import H2Engine, H2Limits
from parsers.requests import HttpRequest
from tests.support.h2_transcript import SPLITS, Transcript, frames_in, request_headers

LIMITS = H2Limits(
    max_stream_resets=20,
    max_ping_frames=10,
    max_settings_frames=10,
    max_outbound_control_frames=30,
)
CALM = ErrorCodes.ENHANCE_YOUR_CALM  # 11


def decide(request: HttpRequest) -> Decision:
    """Everything but /admin."""
    return Decision(not request.path.startswith("/admin"), policy="web", rule="rule 0")


@pytest.fixture(params=list(SPLITS))
def split(request):
    return SPLITS[request.param]


def engine(**limits: int) -> H2Engine:
    return H2Engine(decide, limits=replace(LIMITS, **limits))


def the_goaway(wire: bytes | bytearray) -> GoAwayFrame:
    """The one GOAWAY in what the engine wrote toward the client, decoded."""
    (goaway,) = [f for f in frames_in(wire) if isinstance(f, GoAwayFrame)]
    return goaway


def the_limit(t: Transcript) -> str:
    """The limit the engine named when it gave up; it closed the connection."""
    (error,) = t.of(ParseError)
    assert isinstance(error.error, LimitExceeded) and error.close and error.side == "client"
    assert error.error.code == "h2_enhance_your_calm"
    assert the_goaway(error.error.wire_reply).error_code == CALM
    assert isinstance(t.commands[-1], Close)
    return error.error.limit


def rapid_resets(t: Transcript, first: int, count: int) -> None:
    """CVE-2023-44487: open a stream and reset it at once, ``count`` times."""
    for sid in range(first, first + 2 * count, 2):
        t.client.send_headers(sid, request_headers(f"/item/{sid}"))
        t.client.reset_stream(sid, ErrorCodes.CANCEL)
    t.pump()


def answer_all(t: Transcript) -> None:
    for request in t.of(ev.RequestReceived, "server"):
        if request.stream_id in t.server.streams and not t.server.streams[request.stream_id].closed:
            t.server.send_headers(request.stream_id, [(b":status", b"204")], end_stream=True)
    t.pump()


# --------------------------------------------------------------------------- resets


def test_rapid_reset_gets_enhance_your_calm_at_the_reset_past_the_budget(split):
    t = Transcript(engine(), split).start()

    rapid_resets(t, first=1, count=25)

    # The 21st RST_STREAM (stream 41) is one past the budget of 20: it is never
    # processed, and the GOAWAY names stream 41, whose HEADERS were.
    (goaway,) = t.of(ev.ConnectionTerminated, "client")
    assert (goaway.error_code, goaway.last_stream_id) == (CALM, 41)
    assert the_limit(t) == "max_stream_resets"
    assert t.engine.client_data(b"\x00" * 9) == []  # and it reads nothing more


def test_streams_the_proxy_resets_for_the_client_count_as_resets_too(split):
    # The client never sends RST_STREAM: it opens streams the policy denies and
    # leaves them open, so each 403 comes with our RST_STREAM(NO_ERROR).
    t = Transcript(engine(), split).start()
    for sid in range(1, 61, 2):
        t.client.send_headers(sid, request_headers("/admin/users", "POST"))
    t.pump()

    # Our resets are counted after the turn that made them: the GOAWAY names the
    # last stream answered, at least one past the budget.
    answered = [e.stream_id for e in t.of(ev.ResponseReceived, "client")]
    assert len(answered) > 20
    (goaway,) = t.of(ev.ConnectionTerminated, "client")
    assert (goaway.error_code, goaway.last_stream_id) == (CALM, answered[-1])
    assert the_limit(t) == "max_stream_resets"
    assert not t.of(ev.RequestReceived, "server")


def test_streams_refused_over_the_concurrency_limit_count_as_resets(split):
    # Our MAX_CONCURRENT_STREAMS is 128; this client ignores it (an h2 client
    # object would not), and each stream past it is refused: RST_STREAM(REFUSED_STREAM).
    t = Transcript(engine(max_stream_resets=5), split, client_listens=False).start()
    encoder = hpack.Encoder()
    frames = b"".join(
        HeadersFrame(
            sid, encoder.encode(request_headers(f"/q/{sid}")), flags=["END_HEADERS"]
        ).serialize()
        for sid in range(1, 2 * 140, 2)
    )
    t.client_raw(frames)

    # The sixth refusal is one past the budget of five. Our own resets are
    # counted after the turn that made them, so the GOAWAY names the last
    # stream processed, which may be later.
    sent = frames_in(t.unread)
    refused = [f.stream_id for f in sent if isinstance(f, RstStreamFrame)]
    assert refused[:6] == [257, 259, 261, 263, 265, 267]
    assert {f.error_code for f in sent if isinstance(f, RstStreamFrame)} == {7}  # REFUSED_STREAM
    assert (sent[-1].error_code, sent[-1].last_stream_id) == (CALM, refused[-1])
    assert the_limit(t) == "max_stream_resets"


def test_completed_streams_earn_resets_back(split):
    t = Transcript(engine(), split).start()
    rapid_resets(t, first=1, count=20)  # the whole budget
    for sid in range(41, 61, 2):
        t.client.send_headers(sid, request_headers(f"/ok/{sid}"), end_stream=True)
    t.pump()
    answer_all(t)  # ten streams complete without a reset: ten resets back

    rapid_resets(t, first=61, count=10)
    assert not t.of(ev.ConnectionTerminated, "client")

    rapid_resets(t, first=81, count=1)
    (goaway,) = t.of(ev.ConnectionTerminated, "client")
    assert (goaway.error_code, goaway.last_stream_id) == (CALM, 81)


def test_resets_the_server_causes_are_not_charged_to_the_client(split):
    t = Transcript(engine(), split).start()
    for sid in range(1, 61, 2):  # thirty streams, each reset by the server
        t.client.send_headers(sid, request_headers(f"/busy/{sid}"), end_stream=True)
    t.pump()
    for request in t.of(ev.RequestReceived, "server"):
        t.server.reset_stream(request.stream_id, ErrorCodes.REFUSED_STREAM)
    t.pump()

    assert len(t.of(ev.StreamReset, "client")) == 30
    assert not t.of(ev.ConnectionTerminated, "client")
    assert not t.of(ParseError)


def test_a_client_may_cancel_responses_it_no_longer_wants(split):
    # A reset once the response has begun (a download abandoned, a call
    # cancelled mid-stream) cancels a response, not a request: it is not counted.
    t = Transcript(engine(), split).start()
    for sid in range(1, 61, 2):
        t.client.send_headers(sid, request_headers(f"/video/{sid}"), end_stream=True)
    t.pump()
    for request in t.of(ev.RequestReceived, "server"):
        t.server.send_headers(request.stream_id, [(b":status", b"200")])
    t.pump()
    for sid in range(1, 61, 2):
        t.client.reset_stream(sid, ErrorCodes.CANCEL)
    t.pump()

    assert len(t.of(ev.StreamReset, "server")) == 30  # each cancelled upstream
    assert not t.of(ev.ConnectionTerminated, "client")
    assert not t.of(ParseError)


def test_the_default_reset_budget_is_nghttp2s_burst_of_1000():
    t = Transcript(H2Engine(decide)).start()
    rapid_resets(t, first=1, count=1000)
    assert not t.of(ev.ConnectionTerminated, "client")

    rapid_resets(t, first=2001, count=1)
    (goaway,) = t.of(ev.ConnectionTerminated, "client")
    assert (goaway.error_code, goaway.last_stream_id) == (CALM, 2001)


# --------------------------------------------------------------------------- PING, SETTINGS


def test_a_ping_flood_is_refused_at_the_ping_past_the_budget(split):
    t = Transcript(engine(), split, client_listens=False).start()
    t.client.send_headers(1, request_headers("/"), end_stream=True)
    for n in range(15):
        t.client.ping(n.to_bytes(8, "big"))
    t.pump()

    frames = frames_in(t.unread)
    acks = [f.opaque_data for f in frames if isinstance(f, PingFrame) if "ACK" in f.flags]
    assert acks == [n.to_bytes(8, "big") for n in range(10)]  # the 11th is not answered
    assert (frames[-1].error_code, frames[-1].last_stream_id) == (CALM, 1)
    assert the_limit(t) == "max_ping_frames"


def test_a_settings_flood_is_refused_at_the_settings_past_the_budget(split):
    t = Transcript(engine(), split, client_listens=False).start()
    t.client.send_headers(1, request_headers("/"), end_stream=True)
    for n in range(15):
        t.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 70_000 + n})
    t.pump()

    frames = frames_in(t.unread)
    acks = [f for f in frames if isinstance(f, SettingsFrame) and "ACK" in f.flags]
    assert len(acks) == 10  # the preface's SETTINGS and nine updates; the tenth is one too many
    assert (frames[-1].error_code, frames[-1].last_stream_id) == (CALM, 1)
    assert the_limit(t) == "max_settings_frames"


def test_acknowledgements_piling_up_toward_a_client_that_does_not_read(split):
    # Neither PINGs (20 of 100) nor SETTINGS (12 of 100) are over their own
    # budget, but the 31st acknowledgement owed is over the control frames'.
    t = Transcript(
        engine(max_ping_frames=100, max_settings_frames=100), split, client_listens=False
    ).start()
    for n in range(20):
        t.client.ping(n.to_bytes(8, "big"))
        t.client.update_settings({SettingCodes.MAX_FRAME_SIZE: 16384 + n})
    t.pump()

    frames = frames_in(t.unread)
    acks = [f for f in frames if isinstance(f, (PingFrame, SettingsFrame)) and "ACK" in f.flags]
    assert len(acks) == 30
    assert frames[-1].error_code == CALM
    assert the_limit(t) == "max_outbound_control_frames"


def test_a_client_that_reads_its_answers_may_ping_and_update_settings_for_ever(split):
    # Once a count reaches half its budget the proxy sends a PING of its own;
    # the client's acknowledgement shows it read everything before it, and the
    # counts start again. Two hundred rounds of 8 PINGs and 8 SETTINGS: 1,600 of
    # each against budgets of 10 per round trip.
    t = Transcript(engine(), split).start()
    for round_ in range(200):
        for n in range(8):
            t.client.ping((round_ * 8 + n).to_bytes(8, "big"))
            t.client.update_settings({SettingCodes.MAX_FRAME_SIZE: 16384 + n})
        t.pump()

    assert len(t.of(ev.PingAckReceived, "client")) == 1600
    ours = [e for e in t.of(ev.PingReceived, "client")]
    assert len(ours) == 200  # one round-trip PING a round
    assert not t.of(ev.ConnectionTerminated, "client")
    assert not t.of(ParseError)


# --------------------------------------------------------------------------- turns


UNBOUNDED_PINGS = {"max_ping_frames": 10_000, "max_outbound_control_frames": 10_000}


def ping_acks(out: list) -> int:
    wire = b"".join(c.data for c in out if type(c) is ToClient)
    return sum(1 for f in frames_in(wire) if isinstance(f, PingFrame) and "ACK" in f.flags)


def test_one_large_read_is_processed_in_turns_of_a_bounded_number_of_frames():
    t = Transcript(engine(frames_per_turn=10, **UNBOUNDED_PINGS)).start()
    for n in range(35):
        t.client.ping(n.to_bytes(8, "big"))

    out = t.engine.client_data(t.client.data_to_send())

    turns = [ping_acks(out)]
    while type(out[-1]) is Yield:
        out = out[-1].resume()
        turns.append(ping_acks(out))
    assert turns == [10, 10, 10, 5]


def test_a_read_that_completes_a_cut_frame_shares_one_turn_with_the_rest_of_it():
    # The read completing a PING cut by the last one also carries a DATA frame
    # and four more PINGs: the completed frame counts in the same turn of 4.
    t = Transcript(engine(frames_per_turn=4, **UNBOUNDED_PINGS)).start()
    t.client.send_headers(1, request_headers("/up", "POST"))
    t.engine.client_data(t.client.data_to_send())
    t.client.ping(b"ping-one")
    t.client.send_data(1, b"u" * 16384)
    for n in range(4):
        t.client.ping(n.to_bytes(8, "big"))
    wire = t.client.data_to_send()
    assert t.engine.client_data(wire[:10]) == []

    out = t.engine.client_data(wire[10:])

    upstream = b"".join(c.data for c in out if type(c) is ToServer)
    assert b"u" * 16384 in upstream
    turns = [ping_acks(out)]
    while type(out[-1]) is Yield:
        out = out[-1].resume()
        turns.append(ping_acks(out))
    assert turns == [3, 2]


def test_a_turn_holds_a_bounded_number_of_header_bytes():
    # Header blocks cost by their size (HPACK decoding, validation, re-encoding):
    # a turn ends once it has taken 512 payload bytes of frames other than DATA.
    t = Transcript(engine()).start()
    for n in range(10):
        pad = b"%03d" % n + b"~" * 117  # new each time; about 200 bytes after Huffman coding
        t.client.send_headers(
            1 + 2 * n, request_headers("/", extra=[(b"x-pad", pad)]), end_stream=True
        )

    out = t.engine.client_data(t.client.data_to_send())

    judged = [sum(1 for c in out if type(c) is Access)]
    while type(out[-1]) is Yield:
        out = out[-1].resume()
        judged.append(sum(1 for c in out if type(c) is Access))
    assert judged == [3, 3, 3, 1]


def test_input_that_arrives_before_a_yield_is_resumed_waits_its_turn_in_order():
    # A driver that reads on after a Yield (it should not) loses nothing and
    # reorders nothing: the new bytes queue behind the held ones.
    t = Transcript(engine(frames_per_turn=4, **UNBOUNDED_PINGS)).start()
    for n in range(6):
        t.client.ping(n.to_bytes(8, "big"))
    first = t.engine.client_data(t.client.data_to_send())
    t.client.ping(b"latecome")
    second = t.engine.client_data(t.client.data_to_send())
    out = first + second
    while type(out[-1]) is Yield:
        out = out[:-1] + out[-1].resume()

    wire = b"".join(c.data for c in out if type(c) is ToClient)
    acks = [f.opaque_data for f in frames_in(wire) if isinstance(f, PingFrame)]
    assert acks == [n.to_bytes(8, "big") for n in range(6)] + [b"latecome"]


def test_a_yield_after_the_connection_ended_resumes_to_nothing():
    t = Transcript(engine(frames_per_turn=2, **UNBOUNDED_PINGS)).start()
    for n in range(6):
        t.client.ping(n.to_bytes(8, "big"))
    out = t.engine.client_data(t.client.data_to_send())
    assert type(out[-1]) is Yield

    t.engine.client_data(b"")  # the client left

    assert out[-1].resume() == []
