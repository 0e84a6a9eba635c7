"""Random and malformed frames from either side: a clean protocol answer, never an exception."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parsers.base import Close, ParseError, Yield, allow_all
from parsers.http2.engine import PREFACE, H2Engine
from tests.support.h2_transcript import Transcript, request_headers

COMMAND_TYPES = (
    "ToServer",
    "ToClient",
    "Access",
    "Reply",
    "ParseError",
    "Close",
    "Log",
    "ShutdownServer",
    "ShutdownClient",
)

frames = st.lists(
    st.tuples(
        st.integers(0, 12),  # type (10+ are unknown types, which must be ignored)
        st.integers(0, 255),  # flags
        st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]),  # stream id
        st.binary(max_size=64),
    ),
    max_size=12,
)


def raw(frame_list) -> bytes:
    out = b""
    for ftype, flags, stream, payload in frame_list:
        out += (
            len(payload).to_bytes(3, "big")
            + bytes([ftype, flags])
            + stream.to_bytes(4, "big")
            + payload
        )
    return out


def settle(commands) -> list:
    """The commands with every ``Yield`` resumed at once, as the driver would."""
    out = []
    for cmd in commands:
        if isinstance(cmd, Yield):
            out += settle(cmd.resume())
        else:
            out.append(cmd)
    return out


def check(commands) -> bool:
    """Command types are known; returns True once the engine gave up on the connection."""
    closed = False
    for cmd in settle(commands):
        assert type(cmd).__name__ in COMMAND_TYPES
        if isinstance(cmd, ParseError):
            assert cmd.error.code  # typed, with a code
        if isinstance(cmd, Close):
            closed = True
    return closed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames, st.integers(1, 7))
def test_random_client_frames_after_the_preface(frame_list, step):
    engine = H2Engine(allow_all)
    data = PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + raw(frame_list)
    closed = False
    for i in range(0, len(data), step):
        commands = engine.client_data(data[i : i + step])
        if closed:
            assert commands == []
        closed = check(commands) or closed
    check(engine.client_data(b""))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames)
def test_random_server_frames_mid_request(frame_list):
    t = Transcript(H2Engine(allow_all)).start()
    t.client.send_headers(1, request_headers("/"), end_stream=True)
    t.pump()
    commands = t.engine.server_data(raw(frame_list))
    check(commands)
    check(t.engine.server_data(b""))


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.binary(min_size=1, max_size=200), st.integers(1, 23).map(lambda n: PREFACE[:n]))
)
def test_garbage_instead_of_a_preface(garbage):
    engine = H2Engine(allow_all)
    commands = engine.client_data(garbage)
    if PREFACE.startswith(garbage):
        # Still possibly HTTP/2: our SETTINGS may go out, nothing else happens yet.
        assert [type(c).__name__ for c in commands] in ([], ["ToClient"])
        assert engine.reading_headers
    else:
        assert check(commands)
        assert not any(type(c).__name__ == "ToServer" for c in commands)  # never bother the server


def test_trailing_garbage_after_a_complete_exchange():
    t = Transcript(H2Engine(allow_all)).start()
    t.client.send_headers(1, request_headers("/"), end_stream=True)
    t.pump()
    t.server.send_headers(1, [(b":status", b"204")], end_stream=True)
    t.pump()
    commands = t.engine.client_data(b"\xff" * 40)
    assert check(commands)
    errors = [c for c in commands if isinstance(c, ParseError)]
    assert errors and errors[0].side == "client" and errors[0].close


# ------------------------------------------------------------------ model-based
# Real h2 peers doing legal things in random order, with reads that bundle
# several frames: the engine must never raise, and the peers must never see a
# frame that makes *them* raise (that would be the engine breaking the protocol).

ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "open",
                "open_end",
                "c_data",
                "c_end",
                "c_reset",
                "respond",
                "s_data",
                "s_end",
                "s_trailers",
                "s_reset",
                "c_ack",
                "s_ack",
                "ping",
                "c_window",
                "pump",
            ]
        ),
        st.integers(0, 5),
        st.integers(0, 40_000),
    ),
    max_size=40,
)


def _state(conn, stream_id):
    stream = conn.streams.get(stream_id)
    return stream.state_machine.state.name if stream is not None else "GONE"


def _can_send(conn, stream_id) -> bool:
    # h2 closes a stream on an illegal move even when the caller catches the
    # error, so the peers only make moves their state allows.
    return _state(conn, stream_id) in ("OPEN", "HALF_CLOSED_REMOTE")


def _can_reset(conn, stream_id) -> bool:
    return _state(conn, stream_id) in ("OPEN", "HALF_CLOSED_REMOTE", "HALF_CLOSED_LOCAL")


def _try(fn, *args, **kwargs) -> None:
    from h2.exceptions import ProtocolError as PeerRefused

    try:
        fn(*args, **kwargs)
    except (PeerRefused, KeyError):
        pass  # not a legal move for that peer right now (closed stream, no window, ...)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ACTIONS, st.sampled_from(["whole", "random"]))
def test_random_legal_traffic_from_both_peers(actions, mode):
    from parsers.base import Decision
    from tests.support.h2_transcript import SPLITS

    engine = H2Engine(lambda r: Decision(not r.path.endswith("/3")))
    t = Transcript(engine, SPLITS[mode]).start()
    t.client_reads = t.server_reads = False
    opened: list[int] = []
    responded: set[int] = set()

    def server_id(i):
        requests = [e.stream_id for e in t.server_events if type(e).__name__ == "RequestReceived"]
        return requests[i % len(requests)] if requests else None

    def client_id(i):
        return opened[i % len(opened)] if opened else None

    for action, i, n in actions:
        cid, sid = client_id(i), server_id(i)
        if action in ("open", "open_end"):
            new = t.client.get_next_available_stream_id()
            _try(
                t.client.send_headers,
                new,
                request_headers(f"/p/{len(opened)}", "POST"),
                end_stream=action == "open_end",
            )
            opened.append(new)
        elif action == "c_data" and cid and _can_send(t.client, cid):
            _try(
                t.client.send_data,
                cid,
                b"c"
                * min(n, t.client.local_flow_control_window(cid), t.client.max_outbound_frame_size),
            )
        elif action == "c_end" and cid and _can_send(t.client, cid):
            _try(t.client.end_stream, cid)
        elif action == "c_reset" and cid and _can_reset(t.client, cid):
            _try(t.client.reset_stream, cid, 8)
        elif action == "respond" and sid and sid not in responded and _can_send(t.server, sid):
            responded.add(sid)
            _try(t.server.send_headers, sid, [(b":status", b"200")])
        elif action == "s_data" and sid in responded and _can_send(t.server, sid):
            _try(
                t.server.send_data,
                sid,
                b"s"
                * min(n, t.server.local_flow_control_window(sid), t.server.max_outbound_frame_size),
            )
        elif action == "s_end" and sid in responded and _can_send(t.server, sid):
            _try(t.server.end_stream, sid)
        elif action == "s_trailers" and sid in responded and _can_send(t.server, sid):
            _try(t.server.send_headers, sid, [(b"grpc-status", b"0")], end_stream=True)
        elif action == "s_reset" and sid and _can_reset(t.server, sid):
            _try(t.server.reset_stream, sid, 8)
        elif action == "c_ack":
            for e in t.client_events:
                if type(e).__name__ == "DataReceived" and e.flow_controlled_length:
                    _try(t.client.acknowledge_received_data, e.flow_controlled_length, e.stream_id)
            t.client_events = [e for e in t.client_events if type(e).__name__ != "DataReceived"]
        elif action == "s_ack":
            for size, stream in t.server_unacked:
                _try(t.server.acknowledge_received_data, size, stream)
            t.server_unacked.clear()
        elif action == "ping":
            _try(t.client.ping, b"01234567")
        elif action == "c_window" and cid and _can_reset(t.client, cid):
            _try(t.client.increment_flow_control_window, n + 1, cid)
        elif action == "pump":
            t.pump()
    t.pump()
    assert not any(isinstance(c, ParseError) and c.close for c in t.commands)
