"""Random and malformed frames from either side: a clean protocol answer, never an exception."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parsers.base import Close, ParseError, allow_all
from parsers.http2 import PREFACE, H2Engine
from tests.support.h2_transcript import Transcript, request_headers

COMMAND_TYPES = ("ToServer", "ToClient", "Access", "Reply", "ParseError", "Close", "Log", "ShutdownServer", "ShutdownClient")

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
        out += len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload
    return out


def check(commands) -> bool:
    """Command types are known; returns True once the engine gave up on the connection."""
    closed = False
    for cmd in commands:
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
@given(st.binary(min_size=1, max_size=200))
def test_garbage_instead_of_a_preface(garbage):
    engine = H2Engine(allow_all)
    commands = engine.client_data(garbage)
    if PREFACE.startswith(garbage):
        assert commands == [] and engine.reading_headers
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
