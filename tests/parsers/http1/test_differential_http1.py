"""Differential test: whatever Http1Engine accepts and forwards must frame the
same in h11, in aiohttp's two parsers (pure Python and llhttp) and in nginx.

The corpus is generated: request-smuggling classics (CL.TE, TE.CL, TE.TE
obfuscations, duplicate Content-Length, obs-fold, bare LF/CR, chunk-size
tricks, absolute-form, odd request lines), each followed by a second request
so a desync would show, plus seeded random mutations of valid requests.

For each case, "ours" is the list of complete requests the engine forwarded
(re-parsed from the forwarded bytes with h11) and whether it rejected the
connection. Another parser *diverges* when it reads one of our forwarded
requests differently (method, target, body) or misses it, or when it sees a
request we never forwarded although we accepted the whole input.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import h11
import pytest
from aiohttp import base_protocol, http_parser, web

from parsers.base import Access, Log, ParseError, ToServer, allow_all
from parsers.http1.engine import Http1Engine, request_reader
from parsers.http1.reader import Data, End, Head

try:
    from aiohttp._http_parser import HttpRequestParser as AiohttpCParser
except ImportError:  # pragma: no cover - wheels ship it
    AiohttpCParser = None

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HOST = b"Host: example.test\r\n"
NEXT = b"GET /next HTTP/1.1\r\n" + HOST + b"\r\n"


def req(head_lines: bytes, body: bytes = b"", line: bytes = b"POST /a HTTP/1.1") -> bytes:
    return line + b"\r\n" + HOST + head_lines + b"\r\n" + body


# --------------------------------------------------------------------------
# The corpus


def classics() -> list[tuple[str, bytes]]:
    cases: list[tuple[str, bytes]] = [
        ("get", b"GET / HTTP/1.1\r\n" + HOST + b"\r\n"),
        ("post_cl", req(b"Content-Length: 5\r\n", b"hello")),
        (
            "post_chunked",
            req(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        ),
        ("pipeline", req(b"Content-Length: 2\r\n", b"hi") + NEXT + req(b"Content-Length: 0\r\n")),
        ("http10", b"GET /old HTTP/1.0\r\n\r\n"),
        (
            "http10_keepalive",
            b"POST /o HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx" + NEXT,
        ),
        ("leading_crlf", b"\r\n" + NEXT),
        ("trailers", req(b"Transfer-Encoding: chunked\r\n", b"1\r\na\r\n0\r\nX-T: 1\r\n\r\n")),
        ("chunk_ext", req(b"Transfer-Encoding: chunked\r\n", b'3;a=b;c="d e"\r\nabc\r\n0\r\n\r\n')),
        (
            "chunk_upper_hex",
            req(b"Transfer-Encoding: chunked\r\n", b"A\r\n0123456789\r\n0\r\n\r\n"),
        ),
        (
            "chunk_leading_zeros",
            req(b"Transfer-Encoding: chunked\r\n", b"0005\r\nhello\r\n0\r\n\r\n"),
        ),
        ("cl_leading_zeros", req(b"Content-Length: 0005\r\n", b"hello")),
        ("cl_ows", req(b"Content-Length:   5\t\r\n", b"hello")),
        ("absolute_form", b"GET http://example.test/x?y=1 HTTP/1.1\r\n" + HOST + b"\r\n"),
        ("absolute_form_port", b"GET http://example.test:8080/x HTTP/1.1\r\n" + HOST + b"\r\n"),
        ("expect_continue", req(b"Expect: 100-continue\r\nContent-Length: 3\r\n", b"abc")),
        ("options_star", b"OPTIONS * HTTP/1.1\r\n" + HOST + b"\r\n"),
        ("obs_text_value", b"GET / HTTP/1.1\r\n" + HOST + b"X-Name: D\xfcsseldorf\r\n\r\n"),
        ("empty_value", b"GET / HTTP/1.1\r\n" + HOST + b"X-Empty:\r\n\r\n"),
        ("odd_target_chars", b"GET /a/b;c=d?e=f&g=h|i HTTP/1.1\r\n" + HOST + b"\r\n"),
    ]
    smuggling = {
        # CL.TE and TE.CL
        "cl_te": (b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nX"),
        "te_cl": (
            b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
            b"8\r\nSMUGGLED\r\n0\r\n\r\n",
        ),
        # TE.TE obfuscations
        "te_xchunked": (b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"),
        "te_space_colon": (b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"),
        "te_tab_value": (b"Transfer-Encoding:\tchunked\r\n", b"0\r\n\r\n"),
        "te_tab_name": (b"Transfer-Encoding\t: chunked\r\n", b"0\r\n\r\n"),
        "te_vtab": (b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n"),
        "te_ff": (b"Transfer-Encoding: \x0cchunked\r\n", b"0\r\n\r\n"),
        "te_nbsp": (b"Transfer-Encoding:\xa0chunked\r\n", b"0\r\n\r\n"),
        "connection_nbsp": (b"Connection:\xa0close\r\nContent-Length: 1\r\n", b"x"),
        "te_nul": (b"Transfer-Encoding: chunked\x00\r\n", b"0\r\n\r\n"),
        "te_double": (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n", b"0\r\n\r\n"),
        "te_double_chunked": (
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            b"0\r\n\r\n",
        ),
        "te_identity_chunked": (b"Transfer-Encoding: identity, chunked\r\n", b"0\r\n\r\n"),
        "te_chunked_identity": (b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
        "te_upper": (b"Transfer-Encoding: CHUNKED\r\n", b"0\r\n\r\n"),
        "te_quoted": (b'Transfer-Encoding: "chunked"\r\n', b"0\r\n\r\n"),
        "te_param": (b"Transfer-Encoding: chunked;q=1\r\n", b"0\r\n\r\n"),
        "te_underscore": (b"Transfer_Encoding: chunked\r\n", b"0\r\n\r\n"),
        "te_fold": (b"X: y\r\n Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        "te_fold_value": (b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n"),
        "te_cow": (b"Transfer-Encoding: cow\r\n", b"0\r\n\r\n"),
        "te_empty_list": (b"Transfer-Encoding: ,chunked\r\n", b"0\r\n\r\n"),
        "te_gzip_chunked": (b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
        "te_lf_only": (b"Transfer-Encoding: chunked\n", b"0\r\n\r\n"),
        # duplicate and odd Content-Length
        "cl_dup_same": (b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"),
        "cl_dup_differ": (b"Content-Length: 3\r\nContent-Length: 5\r\n", b"abcde"),
        "cl_list": (b"Content-Length: 3, 3\r\n", b"abc"),
        "cl_plus": (b"Content-Length: +3\r\n", b"abc"),
        "cl_minus": (b"Content-Length: -1\r\n", b"abc"),
        "cl_hex": (b"Content-Length: 0x3\r\n", b"abc"),
        "cl_space_inside": (b"Content-Length: 1 2\r\n", b"abcdefghijkl"),
        "cl_space_colon": (b"Content-Length : 3\r\n", b"abc"),
        "cl_nul": (b"Content-Length: 3\x00\r\n", b"abc"),
        "cl_huge": (b"Content-Length: 99999999999999999999999\r\n", b"abc"),
        "cl_fold": (b"Content-Length:\r\n 3\r\n", b"abc"),
        "cl_empty": (b"Content-Length:\r\n", b""),
        "cl_underscore": (b"Content_Length: 3\r\n", b"abc"),
        # obs-fold, bare CR and LF in ordinary fields
        "fold": (b"X-A: 1\r\n 2\r\n", b""),
        "fold_tab": (b"X-A: 1\r\n\t2\r\n", b""),
        "bare_cr_value": (b"X-A: 1\r2\r\n", b""),
        "bare_lf_header": (b"X-A: 1\nContent-Length: 3\r\n", b"abc"),
        "bare_lf_end": (b"Content-Length: 3\r\n\n", b"abc"),
        # chunk-size tricks
        "chunk_size_space": (b"Transfer-Encoding: chunked\r\n", b"3 \r\nabc\r\n0\r\n\r\n"),
        "chunk_size_tab": (b"Transfer-Encoding: chunked\r\n", b"3\t\r\nabc\r\n0\r\n\r\n"),
        "chunk_size_0x": (b"Transfer-Encoding: chunked\r\n", b"0x3\r\nabc\r\n0\r\n\r\n"),
        "chunk_size_plus": (b"Transfer-Encoding: chunked\r\n", b"+3\r\nabc\r\n0\r\n\r\n"),
        "chunk_size_neg": (b"Transfer-Encoding: chunked\r\n", b"-3\r\nabc\r\n0\r\n\r\n"),
        "chunk_size_overflow": (
            b"Transfer-Encoding: chunked\r\n",
            b"fffffffffffffffff3\r\nabc\r\n0\r\n\r\n",
        ),
        "chunk_size_lf": (b"Transfer-Encoding: chunked\r\n", b"3\nabc\r\n0\r\n\r\n"),
        "chunk_data_lf": (b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\n0\r\n\r\n"),
        "chunk_data_long": (b"Transfer-Encoding: chunked\r\n", b"3\r\nabcdef\r\n0\r\n\r\n"),
        "chunk_data_short": (b"Transfer-Encoding: chunked\r\n", b"5\r\nabc\r\n0\r\n\r\n"),
        "chunk_ext_space": (b"Transfer-Encoding: chunked\r\n", b"3 ;x\r\nabc\r\n0\r\n\r\n"),
        "chunk_ext_empty": (b"Transfer-Encoding: chunked\r\n", b"3;\r\nabc\r\n0\r\n\r\n"),
        "chunk_ext_bare_cr": (b"Transfer-Encoding: chunked\r\n", b"3;a\rb\r\nabc\r\n0\r\n\r\n"),
        "chunk_last_no_crlf": (b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n"),
        "chunk_trailer_cl": (b"Transfer-Encoding: chunked\r\n", b"0\r\nContent-Length: 5\r\n\r\n"),
        "chunk_trailer_fold": (b"Transfer-Encoding: chunked\r\n", b"0\r\nX: a\r\n b\r\n\r\n"),
        "chunk_nul_size": (b"Transfer-Encoding: chunked\r\n", b"3\x00\r\nabc\r\n0\r\n\r\n"),
    }
    for name, (lines, body) in smuggling.items():
        cases.append((name, req(lines, body) + NEXT))
    lines = {
        "line_double_space": b"GET  / HTTP/1.1",
        "line_tab": b"GET\t/ HTTP/1.1",
        "line_trailing_space": b"GET / HTTP/1.1 ",
        "line_lower_method": b"get / HTTP/1.1",
        "line_version_12": b"GET / HTTP/1.2",
        "line_version_2": b"GET / HTTP/2.0",
        "line_version_10_digits": b"GET / HTTP/1.10",
        "line_no_version": b"GET /",
        "line_lower_http": b"GET / http/1.1",
        "line_fragment": b"GET /a#b HTTP/1.1",
        "line_userinfo": b"GET http://u:p@example.test/ HTTP/1.1",
        "line_scheme_upper": b"GET HTTP://example.test/ HTTP/1.1",
        "line_scheme_ftp": b"GET ftp://example.test/ HTTP/1.1",
        "line_no_slash": b"GET a/b HTTP/1.1",
        "line_double_slash": b"GET //example.test/x HTTP/1.1",
        "line_space_target": b"GET /a b HTTP/1.1",
        "line_high_byte": b"GET /\xe9 HTTP/1.1",
        "line_del": b"GET /\x7f HTTP/1.1",
        "line_unknown_method": b"FROB / HTTP/1.1",
        "line_method_token": b"GE(T / HTTP/1.1",
        "line_star_get": b"GET * HTTP/1.1",
        "line_lf": b"GET / HTTP/1.1\n",
    }
    for name, line in lines.items():
        if line.endswith(b"\n"):
            cases.append((name, line + HOST + b"\r\n" + NEXT))
        else:
            cases.append((name, line + b"\r\n" + HOST + b"\r\n" + NEXT))
    cases += [
        ("host_missing", b"GET / HTTP/1.1\r\n\r\n" + NEXT),
        ("host_duplicate", b"GET / HTTP/1.1\r\n" + HOST + HOST + b"\r\n" + NEXT),
        ("name_space", b"GET / HTTP/1.1\r\n" + HOST + b"X A: 1\r\n\r\n" + NEXT),
        ("name_empty", b"GET / HTTP/1.1\r\n" + HOST + b": 1\r\n\r\n" + NEXT),
        ("name_at", b"GET / HTTP/1.1\r\n" + HOST + b"X@A: 1\r\n\r\n" + NEXT),
        ("value_del", b"GET / HTTP/1.1\r\n" + HOST + b"X-A: 1\x7f\r\n\r\n" + NEXT),
        ("te_http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + NEXT),
        ("all_lf", b"GET / HTTP/1.1\nHost: example.test\n\n" + NEXT),
        ("first_line_fold", b"GET / HTTP/1.1\r\n " + HOST + b"\r\n" + NEXT),
    ]
    return cases


MUTATION_BYTES = [
    b" ",
    b"\t",
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b"\x0b",
    b",",
    b";",
    b":",
    b'"',
    b"0",
    b"a",
    b"-",
]


def mutants(seed: int = 20261122, count: int = 360) -> list[tuple[str, bytes]]:
    """Seeded random edits of valid requests: insert, delete, replace, duplicate a line."""
    rng = random.Random(seed)
    bases = [data for name, data in classics()[:16]]
    out = []
    for i in range(count):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(4)
            pos = rng.randrange(len(data))
            if op == 0:
                data[pos:pos] = rng.choice(MUTATION_BYTES)
            elif op == 1:
                del data[pos : pos + rng.randint(1, 2)]
            elif op == 2:
                data[pos : pos + 1] = rng.choice(MUTATION_BYTES)
            else:
                lines = bytes(data).split(b"\r\n")
                k = rng.randrange(len(lines))
                lines.insert(k, lines[k])
                data = bytearray(b"\r\n".join(lines))
        out.append((f"mutant{i}", bytes(data)))
    return out


CORPUS = classics() + mutants()

# h11 has no HTTP/1.0 keep-alive, and does not skip empty lines before a
# request line (RFC 9112 2.2 says a server SHOULD; llhttp and nginx do).
REFUSALS_H11 = ["http10_keepalive", "leading_crlf"] + [
    f"mutant{i}" for i in (46, 94, 147, 166, 263, 341)
]
REFUSALS_AIOHTTP_PY: list[str] = []
REFUSALS_AIOHTTP_C: list[str] = []
# nginx 1.22 does not take HTAB as whitespace around Content-Length or
# Transfer-Encoding values (400/501), refuses "OPTIONS *" and a repeated Expect.
REFUSALS_NGINX = ["cl_ows", "options_star", "te_tab_value", "mutant31", "mutant309", "mutant354"]


# --------------------------------------------------------------------------
# The parsers


def parse_with_h11(data: bytes) -> tuple[list[tuple], bool]:
    """Complete requests h11 reads from ``data`` (it plays the server)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    requests, current, body = [], None, b""
    try:
        while True:
            event = conn.next_event()
            if (
                event is h11.NEED_DATA
                or event is h11.PAUSED
                or isinstance(event, h11.ConnectionClosed)
            ):
                return requests, False
            if isinstance(event, h11.Request):
                current, body = (event.method.decode(), event.target.decode("latin-1")), b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                requests.append((*current, body))
                conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                conn.send(h11.EndOfMessage())
                if conn.our_state is h11.MUST_CLOSE:
                    # h11 has no HTTP/1.0 keep-alive: it stops reading here.
                    return requests, True
                conn.start_next_cycle()
    except h11.ProtocolError:
        return requests, True


_loop = asyncio.new_event_loop()


def parse_with_aiohttp(parser_class, data: bytes) -> tuple[list[tuple], bool]:
    """Fed a byte at a time: aiohttp drops the messages of a feed that ends
    in an error, and we want those read before the error."""
    protocol = base_protocol.BaseProtocol(_loop)
    parser = parser_class(
        protocol, _loop, 2**16, max_line_size=65536, max_field_size=65536, auto_decompress=False
    )
    messages = []
    try:
        for i in range(len(data)):
            got, upgraded, _ = parser.feed_data(data[i : i + 1])
            messages.extend(got)
            if upgraded:
                break
        rejected = False
    except Exception:  # aiohttp raises BadHttpMessage and friends
        rejected = True
    requests = []
    for msg, payload in messages:
        if not payload.is_eof():
            break
        requests.append((msg.method, msg.path, b"".join(getattr(payload, "_buffer", ()))))
    return requests, rejected


def parse_forwarded(data: bytes) -> list[tuple]:
    """Our forwarded bytes are canonical (one CL or plain chunked); read them
    back with our own reader, which, unlike h11, keeps HTTP/1.0 keep-alive."""
    requests, current, body = [], None, b""
    for event in request_reader("python").feed(data):
        if type(event) is Head:
            current, body = (event.head.method, event.head.target), b""
        elif type(event) is Data:
            body += event.data
        elif type(event) is End:
            requests.append((*current, body))
    return requests


def ours(data: bytes, impl: str) -> tuple[list[tuple], bool, list[str]]:
    """What the engine forwarded (complete requests), whether it refused
    the connection, and the paths it judged (nginx's view of a target).

    The server answers each forwarded request with a 204, so that an error
    queued behind a forwarded request is flushed too."""
    engine = Http1Engine(allow_all, parser=impl)
    commands = engine.client_data(data)
    forwarded = b"".join(c.data for c in commands if type(c) is ToServer)
    for _ in range(sum(1 for c in commands if type(c) is Access)):
        commands += engine.server_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    # Refused: a parse error, or bytes after "Connection: close" that the
    # engine drops (they are never forwarded either).
    rejected = any(
        type(c) is ParseError or type(c) is Log and "Connection: close" in c.message
        for c in commands
    )
    paths = [c.request.path for c in commands if type(c) is Access]
    return parse_forwarded(forwarded), rejected, paths


def compare(our_requests, our_rejected, theirs, their_rejected) -> str | None:
    """``"divergence"`` when the other parser frames differently (a forwarded
    request read differently, or a request we never saw although we accepted
    everything); ``"refusal"`` when it refused a request we forwarded."""
    common = min(len(our_requests), len(theirs))
    if theirs[:common] != our_requests[:common]:
        return "divergence"
    if len(theirs) > len(our_requests) and not our_rejected:
        return "divergence"
    if len(theirs) < len(our_requests):
        return "refusal" if their_rejected else "divergence"
    return None


# --------------------------------------------------------------------------
# nginx in front of an echo server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{echo_port};
            proxy_set_header X-Orig-Method $request_method;
            proxy_set_header X-Orig-Uri $request_uri;
            proxy_ignore_client_abort on;
        }}
    }}
}}
"""


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    info = {
        "method": request.headers.get("X-Orig-Method", request.method),
        "uri": request.headers.get("X-Orig-Uri", request.path_qs),
        "body": base64.b64encode(body).decode(),
    }
    # A header, so that HEAD answers carry it too.
    return web.Response(
        text="", headers={"X-Echo": base64.b64encode(json.dumps(info).encode()).decode()}
    )


@pytest.fixture(scope="module")
def nginx():
    if not Path(NGINX).exists():
        pytest.skip("nginx not installed")
    logging.getLogger("aiohttp.server").setLevel(
        logging.CRITICAL
    )  # nginx passes on junk we refuse anyway
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    echo_port = _free_port()
    site = web.TCPSite(runner, "127.0.0.1", echo_port)
    loop.run_until_complete(site.start())
    tmp = Path(tempfile.mkdtemp(prefix="l7proxy-nginx-"))
    port = _free_port()
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=port, echo_port=echo_port))
    proc = subprocess.Popen(
        [NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf")], stderr=subprocess.PIPE
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                loop.run_until_complete(asyncio.sleep(0.05))
        else:
            pytest.fail("nginx did not start")
        yield loop, port
    finally:
        proc.kill()
        proc.wait()
        loop.run_until_complete(runner.cleanup())
        loop.close()
        shutil.rmtree(tmp, ignore_errors=True)


async def _through_nginx(port: int, data: bytes) -> tuple[list[tuple], bool]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    raw = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 3)
            if not chunk:
                break
            raw += chunk
    except TimeoutError:
        pass
    finally:
        writer.close()
    return _nginx_answers(raw)


def _nginx_answers(raw: bytes) -> tuple[list[tuple], bool]:
    conn = h11.Connection(h11.CLIENT)
    requests = []
    # h11 needs to have "sent" requests to read responses; HEAD-free corpus.
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    while True:
        try:
            event = conn.next_event()
        except h11.ProtocolError:
            return requests, True
        if isinstance(event, h11.Response):
            echo = dict(event.headers).get(b"x-echo")
            if echo is None:
                return requests, True  # nginx answered this request itself (4xx)
            info = json.loads(base64.b64decode(echo))
            requests.append((info["method"], info["uri"], base64.b64decode(info["body"])))
        elif isinstance(event, h11.EndOfMessage):
            if conn.their_state is h11.MUST_CLOSE:
                return requests, False
            conn.start_next_cycle()
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return requests, False


# --------------------------------------------------------------------------
# The tests


def _run(label: str, parse, impl: str = "c") -> dict[str, list]:
    found: dict[str, list] = {"divergence": [], "refusal": []}
    accepted = 0
    for name, data in CORPUS:
        our_requests, our_rejected, paths = ours(data, impl)
        accepted += bool(our_requests)
        theirs, their_rejected = parse(data, our_requests, paths)
        kind = compare(our_requests, our_rejected, theirs, their_rejected)
        if kind:
            found[kind].append((name, our_requests, our_rejected, theirs))
    print(
        f"\n{label}: {len(CORPUS)} cases, {accepted} with forwarded requests, "
        f"{len(found['divergence'])} divergences, {len(found['refusal'])} refusals"
    )
    for kind, items in found.items():
        for name, *detail in items:
            print(f"  {kind} {name}: {detail}")
    return found


def test_corpus_is_large_and_mixed():
    assert len(CORPUS) >= 450
    outcomes = [ours(data, "python") for _, data in CORPUS]
    assert sum(1 for requests, _, _ in outcomes if requests) > 100
    assert sum(1 for _, rejected, _ in outcomes if rejected) > 200


def test_both_implementations_forward_the_same():
    for name, data in CORPUS:
        assert ours(data, "c") == ours(data, "python"), name


PARSERS = {
    "h11": lambda data, *_: parse_with_h11(data),
    "aiohttp-py": lambda data, *_: parse_with_aiohttp(http_parser.HttpRequestParserPy, data),
}
if AiohttpCParser is not None:
    PARSERS["aiohttp-c"] = lambda data, *_: parse_with_aiohttp(AiohttpCParser, data)

# Inputs we forward that the other parser refuses outright (never a framing
# difference; docs/http1.md says why each is accepted here).
EXPECTED_REFUSALS = {
    "h11": REFUSALS_H11,
    "aiohttp-py": REFUSALS_AIOHTTP_PY,
    "aiohttp-c": REFUSALS_AIOHTTP_C,
}


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_no_divergence_from_python_parsers(parser):
    found = _run(parser, PARSERS[parser])
    assert [d[0] for d in found["divergence"]] == []
    assert sorted(d[0] for d in found["refusal"]) == sorted(EXPECTED_REFUSALS[parser])


def test_no_divergence_from_nginx(nginx):
    loop, port = nginx

    def parse(data, our_requests, paths):
        theirs, rejected = loop.run_until_complete(_through_nginx(port, data))
        # nginx reports the path of an absolute-form target, as HttpRequest.path does:
        # compare our requests with that path in place of the raw target.
        our_view = {(m, t, b): (m, p, b) for (m, t, b), p in zip(our_requests, paths, strict=False)}
        back = {v: k for k, v in our_view.items()}
        return [back.get(r, r) for r in theirs], rejected

    found = _run("nginx", parse)
    assert [d[0] for d in found["divergence"]] == []
    assert sorted(d[0] for d in found["refusal"]) == sorted(REFUSALS_NGINX)
