"""Keep-alive repeats: a head seen before on the connection is not parsed again,
but everything else (decision, ordering, flow records) is exactly as the first time."""

from __future__ import annotations

import pytest

from parsers.base import Access, Close, Decision, ParseError, Reply, ToClient, ToServer
from parsers.http1.engine import Http1Engine

GET = b"GET /v1/ships HTTP/1.1\r\nHost: deathstar\r\nAccept: */*\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class Policy:
    """A decide function whose answer the test changes between requests."""

    def __init__(self) -> None:
        self.answer = Decision(True, policy="p", rule="r0")
        self.seen: list = []

    def __call__(self, request):
        self.seen.append(request)
        return self.answer


@pytest.mark.parametrize("impl", ["c", "python"])
def test_a_repeated_request_and_response_produce_the_same_transcript(impl):
    policy = Policy()
    engine = Http1Engine(policy, parser=impl)
    first = engine.client_data(GET)
    first_reply = engine.server_data(OK)
    for key in (1, 2, 3):
        again = engine.client_data(GET)
        assert again == [Access(policy.seen[-1], policy.answer, key), ToServer(first[1].data)]
        assert engine.server_data(OK) == [
            ToClient(first_reply[0].data),
            Reply(key, {"status": 200}),
        ]
    assert len(policy.seen) == 4  # every request was judged
    assert first_reply == [
        ToClient(
            OK.replace(
                b"Content-Length: 2\r\nContent-Type: text/plain",
                b"Content-Type: text/plain\r\nContent-Length: 2",
            )
        ),
        Reply(0, {"status": 200}),
    ]


@pytest.mark.parametrize("impl", ["c", "python"])
def test_a_repeat_is_judged_by_the_policy_in_force_now(impl):
    policy = Policy()
    engine = Http1Engine(policy, parser=impl)
    engine.client_data(GET)
    engine.server_data(OK)
    policy.answer = Decision(False, policy="p", rule="", reason="no L7 rule matches")
    denied = engine.client_data(GET)
    assert [type(c) for c in denied] == [Access, ToClient, Reply]
    assert denied[1].data.startswith(b"HTTP/1.1 403 Forbidden\r\n") and denied[1].data.endswith(
        b"Access denied"
    )
    policy.answer = Decision(True, policy="p", edits=(("add", "X-Fleet", "imperial"),))
    edited = engine.client_data(GET)
    assert edited[1] == ToServer(GET[:-2] + b"X-Fleet: imperial\r\n\r\n")


def test_a_repeated_head_with_a_different_body_length_is_parsed_again():
    engine = Http1Engine(Policy())
    engine.client_data(GET)
    engine.server_data(OK)
    engine.client_data(GET)
    # Same head, but the body arrives in a later read: the general path handles it.
    assert engine.server_data(OK[:-2]) == [
        ToClient(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n")
    ]
    assert engine.server_data(b"ok") == [ToClient(b"ok"), Reply(1, {"status": 200})]


def test_pipelined_repeats_keep_their_order():
    engine = Http1Engine(Policy())
    engine.client_data(GET)
    engine.server_data(OK)
    out = engine.client_data(GET + GET)  # two requests in one read: not a single repeat
    assert [type(c) for c in out] == [Access, ToServer, Access, ToServer]
    assert out[1].data + out[3].data == GET + GET
    replies = engine.server_data(OK + OK)
    assert [c for c in replies if type(c) is Reply] == [
        Reply(1, {"status": 200}),
        Reply(2, {"status": 200}),
    ]


def test_a_response_that_closes_is_not_taken_as_a_repeat():
    closing = OK.replace(b"Content-Type", b"Connection: close\r\nContent-Type")
    engine = Http1Engine(Policy())
    engine.client_data(GET)
    engine.server_data(OK)
    engine.client_data(GET)
    out = engine.server_data(closing)
    assert out[-1] == Close("server ended the connection")


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TARGET_CHARS = st.sampled_from(
    [chr(c) for c in range(0x21, 0x7F)] + ["%41", "%zz", " ", "\t", "\x7f", "\x80"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(TARGET_CHARS, max_size=40).map("".join), st.sampled_from(["c", "python"]))
def test_a_new_target_on_a_known_shape_is_treated_exactly_as_a_full_parse_would(tail, impl):
    request = ("GET /" + tail + " HTTP/1.1\r\nHost: deathstar\r\nAccept: */*\r\n\r\n").encode(
        "latin-1"
    )
    fresh = Http1Engine(Policy(), parser=impl)
    expected = fresh.client_data(request)

    primed = Http1Engine(Policy(), parser=impl)
    primed.client_data(GET)
    primed.server_data(OK)
    got = primed.client_data(request)
    # Same commands (the exchange key is one higher on the primed connection).
    if expected and type(expected[0]) is Access:
        expected[0] = Access(expected[0].request, expected[0].decision, 1)
    assert normalised(got) == normalised(expected)


def normalised(commands: list) -> list:
    """Errors compare by type and message (exception objects compare by identity)."""
    return [
        (type(c).__name__, c.side, type(c.error).__name__, str(c.error), c.close)
        if type(c) is ParseError
        else c
        for c in commands
    ]
