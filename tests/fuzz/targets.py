"""Fuzz targets: each takes the fuzzer's bytes and raises only on a real bug."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

import atheris

from parsers.base import Decision, ParseError
from parsers.fastnew import FAST_NEW_IMPLEMENTATION, fast_new
from parsers.http1.engine import Http1Engine, Http1Limits, request_reader, response_reader
from parsers.http1.errors import Http1Error
from parsers.http1.reader import Data, End, Head
from parsers.http2.engine import PREFACE, H2Engine, H2Limits
from parsers.http2.frames import settings_frame
from parsers.tls.hello import ClientHelloReader
from parsers.tls.wire import ClientHelloTooLarge, TlsError
from tests.parsers.http1.helpers import twin_difference

LIMITS = Http1Limits(max_head=4096, max_chunk_line=256)


def _pieces(data: bytes):
    """The first byte picks how the rest is cut, so splits get fuzzed too."""
    if not data:
        return b"", [b""]
    step = data[0] % 17 or len(data)
    body = data[1:]
    return body, [body[i : i + step] for i in range(0, len(body), step)]


def _read(kind: str, impl: str, pieces, *, whole_first: bool = False) -> tuple:
    """What a reader reads from ``pieces``; with ``whole_first``, each piece goes to
    ``read_whole`` first and to ``feed`` only when it is not one whole message."""
    reader = request_reader(impl, LIMITS) if kind == "request" else response_reader(impl, LIMITS)
    summary: list = []
    try:
        for piece in [*pieces, b""]:
            head = reader.read_whole(piece) if whole_first else None
            if head is None:
                _summarise(reader.feed(piece), summary)
                continue
            body = piece[len(piece) - head.length :] if head.framing == "length" else b""
            _summarise([Head(head), *([Data(body)] if body else []), End()], summary)
    except Http1Error as exc:
        _summarise(exc.events, summary)  # what was read before the error
        summary.append("rejected")
    return _merge(summary)


def _summarise(events, summary: list) -> None:
    for event in events:
        if type(event) is Head:
            h = event.head
            summary.append(
                ("head", h.method, h.target, h.status, h.version, tuple(h.headers), h.framing)
            )
        elif type(event) is Data:
            summary.append(("data", event.data))
        elif type(event) is End:
            summary.append(("end", event.trailers))


def _merge(summary: list) -> tuple:
    """Adjacent body pieces are one body (splits move their edges)."""
    out: list = []
    for item in summary:
        if out and item[0] == "data" and out[-1][0] == "data":
            out[-1] = ("data", out[-1][1] + item[1])
        else:
            out.append(item)
    return tuple(out)


def readers(data: bytes) -> None:
    """Both implementations, both directions: typed errors only, same result,
    and the same result whole as split."""
    body, pieces = _pieces(data)
    for kind in ("request", "response"):
        c_split = _read(kind, "c", pieces)
        py_split = _read(kind, "python", pieces)
        if c_split != py_split:
            raise AssertionError(
                f"C and Python parsers disagree on {kind} {body!r}: {c_split!r} != {py_split!r}"
            )
        whole = _read(kind, "python", [body])
        if whole != py_split:
            raise AssertionError(
                f"split changes the {kind} reading of {body!r}: {whole!r} != {py_split!r}"
            )
        # Cut after each blank line too, where one piece is often one whole message.
        at_heads = [p + b"\r\n\r\n" for p in body.split(b"\r\n\r\n")]
        at_heads[-1] = at_heads[-1][:-4]
        if not at_heads[-1]:
            at_heads.pop()  # (an empty piece is the end of input)
        for impl, fed in (("c", c_split), ("python", py_split)):
            for cut in (pieces, at_heads):
                if _read(kind, impl, cut, whole_first=True) != fed:
                    raise AssertionError(
                        f"read_whole changes the {impl} {kind} reading of {body!r}"
                    )


def quickscan(data: bytes) -> None:
    """The C head scanner and its Python twin: the same head field for field, or the
    scanner's None, exactly for the heads outside its subset. The input's first head
    (the reader hands whole heads), and the input as it is."""
    raw = data[1:]  # (the first byte chooses the split for the other targets)
    end = raw.find(b"\r\n\r\n")
    for head in (raw,) if end < 0 or end + 4 == len(raw) else (raw[: end + 4], raw):
        difference = twin_difference(head)
        if difference is not None:
            raise AssertionError(difference)


def _engine(impl: str, data: bytes) -> None:
    deny_every_other = iter([True, False] * len(data))
    engine = Http1Engine(
        lambda _req: Decision(next(deny_every_other, True)), parser=impl, limits=LIMITS
    )
    # Client bytes and server bytes from the same input, alternating.
    half = len(data) // 2
    client, server = data[:half], data[half:]
    for i in range(0, max(len(client), len(server)), 7):
        for cmd in engine.client_data(client[i : i + 7] or b"x"):
            if type(cmd) is ParseError and not isinstance(cmd.error, Http1Error):
                raise AssertionError(f"untyped error {cmd.error!r}")
        engine.server_data(server[i : i + 7] or b"y")
    engine.client_data(b"")
    engine.server_data(b"")


def engine_c(data: bytes) -> None:
    _engine("c", data)


def engine_python(data: bytes) -> None:
    _engine("python", data)


def tls_hello_outcome(pieces: list[bytes]) -> tuple:
    """What the ClientHello reader makes of ``pieces``: the hello and the bytes it leaves
    to the relay, a refusal (its code and alert), or a wait for more. Any other
    exception is a bug and propagates."""
    reader = ClientHelloReader(max_client_hello=4096)
    for i, piece in enumerate(pieces):
        try:
            hello = reader.feed(piece)
        except (TlsError, ClientHelloTooLarge) as exc:
            return ("refused", exc.code, exc.wire_reply)
        if hello is not None:
            return ("hello", hello, reader.raw, reader.rest + b"".join(pieces[i + 1 :]))
    return ("waiting",)


def tls_hello(data: bytes) -> None:
    """A ClientHello or a typed refusal, the same whole as split."""
    body, pieces = _pieces(data)
    whole, split = tls_hello_outcome([body]), tls_hello_outcome(pieces)
    if whole != split:
        raise AssertionError(f"split changes the reading of {body!r}: {whole!r} != {split!r}")


H2_LIMITS = H2Limits(max_concurrent_streams=8, stream_window=4096, connection_window=16384)
# Frames of at most 48 bytes (below what RFC 9113 lets a peer be told, which a
# fuzzed peer does not mind): pieces of up to 64 bytes then often complete a
# frame the last piece cut and carry more, the reads the relay handles in two
# parts, as it does the large reads of a download; and every DATA frame is
# relayed with those behind it in one step, as a download's are.
H2_SMALL_FRAMES = replace(H2_LIMITS, max_frame_size=48, run_frame_size=0)


def _h2_held_is_what_waits(engine: H2Engine) -> None:
    """The relay's count of what it holds of each peer (which caps the connection
    credit it passes on) is the DATA in its queues, never below 0."""
    if engine._dead:
        return
    for hop, direction in ((engine._client, "request"), (engine._server, "response")):
        queued = sum(
            item[2]
            for stream in engine._streams.values()
            for item in getattr(stream, direction).queue or ()
            if item[0] == 0
        )
        if hop.held != queued:
            raise AssertionError(f"{direction}: held {hop.held}, queued {queued}")


def h2_relay(data: bytes) -> None:
    """The HTTP/2 relay between a fuzzed client and a fuzzed server. The first byte
    picks the size of the pieces each side is fed in (the client's first, so that
    the server answers streams that exist) and, from 128, small frames; the second
    says where the rest
    divides into client and server bytes. Only protocol answers may come out,
    never an exception; after ``Close``, nothing."""
    if len(data) < 2:
        return
    step = data[0] % 17 or 64
    body = data[2:]
    cut = data[1] * len(body) // 256
    client = PREFACE + settings_frame({}) + body[:cut]
    server = settings_frame({}) + body[cut:]
    deny_every_other = iter([True, False] * len(data))
    limits = H2_LIMITS if data[0] < 128 else H2_SMALL_FRAMES
    engine = H2Engine(lambda _req: Decision(next(deny_every_other, True)), limits=limits)
    closed = False
    pieces = [("client", client[i : i + step]) for i in range(0, len(client), step)]
    pieces += [("server", server[i : i + step]) for i in range(0, len(server), step)]
    for side, chunk in pieces:
        out = engine.client_data(chunk) if side == "client" else engine.server_data(chunk)
        while out:
            if closed:
                raise AssertionError(f"{out!r} after Close")
            resume = None
            for cmd in out:
                name = type(cmd).__name__
                if name == "Close":
                    closed = True
                elif name == "Yield":
                    resume = cmd.resume
            out = resume() if resume is not None else []
        _h2_held_is_what_waits(engine)
    engine.client_data(b"")
    engine.server_data(b"")


def _fields_of(obj: object) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name, "<unset>") for f in dataclasses.fields(obj)}  # type: ignore[arg-type]


def _made_by(build: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
    try:
        return _fields_of(build(*args, **kwargs))
    except TypeError:
        return TypeError


def fastnew(data: bytes) -> None:
    """A C constructor and its class: the same fields for the same call, or both a
    TypeError. The input draws a slotted dataclass (1 to 12 fields, the last ones with
    a default or a factory, maybe frozen) and a call of it, right or wrong: too many
    or too few positional arguments, names repeated or unknown."""
    fdp = atheris.FuzzedDataProvider(data)
    n = fdp.ConsumeIntInRange(1, 12)
    required = fdp.ConsumeIntInRange(0, n)
    fields: list[Any] = []
    for i in range(n):
        if i < required:
            fields.append((f"f{i}", Any))
        elif fdp.ConsumeBool():
            fields.append((f"f{i}", Any, dataclasses.field(default_factory=list)))
        else:
            fields.append((f"f{i}", Any, dataclasses.field(default=fdp.ConsumeInt(2))))
    cls = dataclasses.make_dataclass("Drawn", fields, slots=True, frozen=fdp.ConsumeBool())
    maker = fast_new(cls)
    if FAST_NEW_IMPLEMENTATION == "c" and maker is cls:
        raise AssertionError(f"no C constructor for {fields}")
    positional = [fdp.ConsumeBytes(2) for _ in range(fdp.ConsumeIntInRange(0, n + 2))]
    names = [f"f{fdp.ConsumeIntInRange(0, n + 1)}" for _ in range(fdp.ConsumeIntInRange(0, 4))]
    kwargs = {name: fdp.ConsumeInt(1) for name in names}
    made, called = _made_by(maker, positional, kwargs), _made_by(cls, positional, kwargs)
    if made != called:
        raise AssertionError(f"{cls} {positional!r} {kwargs!r}: {made!r} != {called!r}")


TARGETS = {
    "fastnew": fastnew,
    "h2_relay": h2_relay,
    "readers": readers,
    "quickscan": quickscan,
    "engine_c": engine_c,
    "engine_python": engine_python,
    "tls_hello": tls_hello,
}
