"""Keep-alive repeats: a head seen before on the connection is not parsed again,
but everything else (decision, ordering, flow records) is exactly as the first time,
and every request is judged: one ``decide`` call per request, always."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers.base import Access, Close, Decision, ParseError, Reply, ToClient, ToServer
from parsers.http1.engine import Http1Engine
from parsers.http1.head import MessageHead, PyRequestHead
from parsers.http1.memo import MEMO_REST, MEMO_REST_MAX, MEMO_SIZE, RequestHeadMemo
from parsers.http1.quick import C_SCANNER, QuickRequestHead
from parsers.http1.reader import End, Head, MessageReader
from parsers.requests import HttpRequest

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


# ---------------------------------------------------------------- one decide per request


class RulesPolicy:
    """A decide function with real rules (GET allowed, POST denied, GET /tagged/*
    allowed with a header added) that counts its calls."""

    def __init__(self) -> None:
        self.calls: list[HttpRequest] = []

    def __call__(self, request: HttpRequest) -> Decision:
        self.calls.append(request)
        if request.method != "GET":
            return Decision(False, policy="p", reason="only GET")
        if request.path.startswith("/tagged/"):
            return Decision(True, policy="p", rule="tag", edits=(("add", "X-Fleet", "imperial"),))
        return Decision(True, policy="p", rule="get")


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: deathstar\r\nAccept: */*\r\n\r\n".encode()


POST = b"POST /v1/ships HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 4\r\n\r\nwing"
TALK = [
    get("/v1/ships"),  # allowed
    POST,  # denied, body dropped, connection kept
    get("/tagged/1"),  # edited
    get("/v1/ships"),  # allowed, repeated
    POST,  # denied, repeated
    get("/tagged/1"),  # edited, repeated
    get("/tagged/2"),  # edited, a known head with a new target
    get("/v1/ships?page=2"),  # allowed, a known head with a new target
    get("/v1/ships"),  # and the first one again
]


def talk(engine: Http1Engine, requests: list[bytes], feed: str) -> list:
    """Send each request and answer each forwarded one; every command, in order."""
    out: list = []
    for request in requests:
        if feed == "whole":
            sent = engine.client_data(request)
        else:
            sent = [c for i in range(len(request)) for c in engine.client_data(request[i : i + 1])]
        out += sent
        if any(type(c) is ToServer for c in sent):
            out += engine.server_data(OK)
    return out


@pytest.mark.parametrize("feed", ["whole", "byte by byte"])
@pytest.mark.parametrize("impl", ["c", "python"])
def test_decide_is_called_exactly_once_per_request_allowed_denied_edited_or_repeated(impl, feed):
    policy = RulesPolicy()
    engine = Http1Engine(policy, parser=impl)
    out = talk(engine, TALK, feed)

    accesses = [c for c in out if type(c) is Access]
    assert len(policy.calls) == len(TALK) == len(accesses)
    # Each flow record carries the very request that was judged, in order.
    assert [a.request for a in accesses] == policy.calls
    assert all(a.request is judged for a, judged in zip(accesses, policy.calls, strict=True))
    assert [a.key for a in accesses] == list(range(len(TALK)))
    assert [(r.method, r.path) for r in policy.calls] == [
        ("GET", "/v1/ships"),
        ("POST", "/v1/ships"),
        ("GET", "/tagged/1"),
        ("GET", "/v1/ships"),
        ("POST", "/v1/ships"),
        ("GET", "/tagged/1"),
        ("GET", "/tagged/2"),
        ("GET", "/v1/ships?page=2"),
        ("GET", "/v1/ships"),
    ]
    # What reached the server: the allowed requests, edited where asked, never a POST.
    forwarded = b"".join(c.data for c in out if type(c) is ToServer)
    tagged = "GET {} HTTP/1.1\r\nHost: deathstar\r\nAccept: */*\r\nX-Fleet: imperial\r\n\r\n"
    assert forwarded == b"".join(
        [
            get("/v1/ships"),
            tagged.format("/tagged/1").encode(),
            get("/v1/ships"),
            tagged.format("/tagged/1").encode(),
            tagged.format("/tagged/2").encode(),
            get("/v1/ships?page=2"),
            get("/v1/ships"),
        ]
    )
    replies = [c.fields["status"] for c in out if type(c) is Reply]
    assert replies == [200, 403, 200, 200, 403, 200, 200, 200, 200]


@pytest.mark.parametrize("impl", ["c", "python"])
def test_pipelined_repeats_are_each_judged_once(impl):
    policy = RulesPolicy()
    engine = Http1Engine(policy, parser=impl)
    engine.client_data(get("/v1/ships"))
    engine.server_data(OK)
    out = engine.client_data(get("/v1/ships") + POST + get("/tagged/1") + get("/v1/ships"))
    assert len(policy.calls) == 5
    assert [c.key for c in out if type(c) is Access] == [1, 2, 3, 4]
    # The 403 waits its turn behind the response owed for request 1.
    assert not any(type(c) is ToClient for c in out)
    replies = engine.server_data(OK + OK + OK)
    assert [c for c in replies if type(c) is Reply] == [
        Reply(1, {"status": 200}),
        Reply(2, {"status": 403}),
        Reply(3, {"status": 200}),
        Reply(4, {"status": 200}),
    ]
    assert len(policy.calls) == 5


# ---------------------------------------------------------------- the memo itself


class CountingHeads(PyRequestHead):
    """The pure-Python head parser, counting the heads it really parses."""

    def __init__(self) -> None:
        super().__init__()
        self.parsed = 0

    def complete(self, head: bytes) -> MessageHead:
        self.parsed += 1
        return super().complete(head)


def test_a_repeated_head_is_the_same_parsed_head_object_without_parsing():
    heads = CountingHeads()
    reader = MessageReader(RequestHeadMemo(lambda: heads))
    first = reader.feed(GET)
    again = reader.feed(GET)
    assert heads.parsed == 1
    assert type(first[0]) is Head and type(again[0]) is Head
    assert again[0].head is first[0].head
    assert again == first == [Head(first[0].head), End()]


def test_a_head_split_across_reads_is_recognised_too():
    heads = CountingHeads()
    reader = MessageReader(RequestHeadMemo(lambda: heads))
    first = reader.feed(GET)
    assert reader.feed(GET[:10]) == []
    again = reader.feed(GET[10:])
    assert heads.parsed == 1 and again[0].head is first[0].head
    # The parser's partial state was reset: a new head, split too, still parses normally.
    other = b"GET /v1/other HTTP/1.1\r\nHost: elsewhere\r\n\r\n"
    assert reader.feed(other[:7]) == []
    parsed = reader.feed(other[7:])
    assert heads.parsed == 2 and parsed[0].head.target == "/v1/other"


def test_a_new_target_on_a_known_shape_reuses_the_known_fields_without_parsing():
    heads = CountingHeads()
    reader = MessageReader(RequestHeadMemo(lambda: heads))
    first = reader.feed(get("/items/1"))[0].head
    second = reader.feed(get("/items/2"))[0].head
    assert heads.parsed == 1
    assert second.target == "/items/2" and second.headers is first.headers
    # A target that could read as an absolute URI always takes the full parse.
    reader.feed(get("/items/x://elsewhere/"))
    assert heads.parsed == 2


@pytest.mark.skipif(C_SCANNER is None, reason="the C head scanner is not built")
def test_heads_the_c_scanner_reads_are_scanned_not_taken_as_shapes():
    """The scanner reads a plain head in less time than a shape is found and rebuilt:
    with it, such heads are remembered by their bytes only; a head it does not read
    (a body's Content-Length) still goes behind it, scanned once, and is kept as a
    shape."""
    assert C_SCANNER is not None
    scanned: list[bytes] = []

    def scan(raw: bytes) -> MessageHead | None:
        scanned.append(raw)
        return C_SCANNER(raw)

    heads = CountingHeads()
    quick = QuickRequestHead(heads, "c")
    quick._scan = scan  # (the quick read behind the memo starts with the same scanner)
    memo = RequestHeadMemo(lambda: quick, scan=scan)
    reader = MessageReader(memo)
    first = reader.feed(get("/items/1"))[0].head
    second = reader.feed(get("/items/2"))[0].head
    assert (first, second) == (C_SCANNER(get("/items/1")), C_SCANNER(get("/items/2")))
    assert heads.parsed == 0  # the parser behind saw neither
    assert set(memo._heads) == {get("/items/1"), get("/items/2")} and not memo._shapes
    assert reader.feed(get("/items/1"))[0].head is first  # found again by its bytes

    posted = POST.replace(b"/v1/ships", b"/items/1")
    reader.feed(posted)
    assert scanned.count(posted[: posted.index(b"\r\n\r\n") + 4]) == 1
    found, reads = memo._memory.found, len(scanned)
    head = reader.feed(POST)[0].head  # the same shape with another target
    assert head.target == "/v1/ships" and len(memo._shapes) == 1
    assert memo._memory.found == found + 1  # found as that shape ...
    assert len(scanned) == reads + 1  # ... after one scan, and no other read
    assert heads.parsed == 0


def test_the_memo_stays_bounded():
    heads = CountingHeads()
    reader = MessageReader(RequestHeadMemo(lambda: heads))
    first = b"GET /0 HTTP/1.1\r\nHost: h0\r\n\r\n"
    reader.feed(first)
    reader.feed(first)
    assert heads.parsed == 1
    for i in range(1, MEMO_SIZE + 1):  # distinct hosts: distinct shapes too
        reader.feed(f"GET /{i} HTTP/1.1\r\nHost: h{i}\r\n\r\n".encode())
    assert heads.parsed == MEMO_SIZE + 1
    reader.feed(first)  # forgotten when the memo filled up: parsed again
    assert heads.parsed == MEMO_SIZE + 2


@pytest.mark.parametrize(
    "request_bytes",
    [
        GET,
        POST,
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"PUT /big HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
    ],
)
def test_with_target_copies_every_other_field(request_bytes):
    head = PyRequestHead().complete(request_bytes[: request_bytes.index(b"\r\n\r\n") + 4])
    raw = b"x" * 99  # (only its length is read: the head came from the full parser)
    moved = head.with_target("/elsewhere", raw)
    assert moved == replace(head, target="/elsewhere", size=99)
    assert moved.wire is None


def test_a_connection_whose_heads_never_repeat_rests_the_memo_then_tries_again():
    heads = CountingHeads()
    reader = MessageReader(RequestHeadMemo(lambda: heads))

    def head(i: int) -> bytes:  # a new target and a new request id every time
        return f"GET /item/{i} HTTP/1.1\r\nHost: h\r\nX-Request-Id: {i}\r\n\r\n".encode()

    for i in range(MEMO_SIZE + 1):  # the memory fills up, and none was seen again
        reader.feed(head(i))
    assert heads.parsed == MEMO_SIZE + 1
    reader.feed(head(1000))
    reader.feed(head(1000))  # resting: not remembered, so read again
    assert heads.parsed == MEMO_SIZE + 3
    for i in range(MEMO_REST - 2):
        reader.feed(head(2000 + i))
    reader.feed(head(3000))
    reader.feed(head(3000))  # the rest is over: remembered again
    assert heads.parsed == MEMO_SIZE + 3 + (MEMO_REST - 2) + 1


def test_each_rest_that_found_nothing_is_followed_by_a_longer_one_until_a_head_repeats():
    heads = CountingHeads()
    reader = MessageReader(RequestHeadMemo(lambda: heads))
    sent = 0

    def new_heads(count: int) -> None:  # never seen before, never seen again
        nonlocal sent
        for _ in range(count):
            sent += 1
            reader.feed(f"GET /item/{sent} HTTP/1.1\r\nHost: h\r\nX-Id: {sent}\r\n\r\n".encode())

    def parses_when_sent_twice(name: str) -> int:
        before = heads.parsed
        for _ in range(2):
            # (A field of its own: no head with a shape of another, found by its shape.)
            reader.feed(f"GET /{name} HTTP/1.1\r\nHost: h\r\nX-Probe: {name}\r\n\r\n".encode())
        return heads.parsed - before

    new_heads(MEMO_SIZE + 1)  # the memory fills up and none is seen again: a rest
    new_heads(MEMO_REST)
    new_heads(MEMO_SIZE + 1)  # in vain again: the next rest is twice as long
    new_heads(2 * MEMO_REST - 1)
    assert parses_when_sent_twice("last-of-the-rest") == 2  # not remembered
    assert parses_when_sent_twice("first-after-it") == 1  # remembered, found again

    new_heads(MEMO_SIZE - 2)  # a fill that found a head: rests are short again
    new_heads(MEMO_SIZE + 1)
    new_heads(MEMO_REST - 1)
    assert parses_when_sent_twice("last-of-a-short-rest") == 2
    assert parses_when_sent_twice("after-the-short-rest") == 1
    assert MEMO_REST_MAX == 64 * MEMO_REST
