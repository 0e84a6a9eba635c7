"""HTTP/2 header sections: validation (RFC 9113 §8.2-8.3), typed requests, denials.

h2's own inbound validation turns every malformed header section into a
*connection* error. RFC 9113 §8.1.1 wants a *stream* error for a malformed
request or response, so the engine switches h2's validation off and calls
these functions instead; they return a reason string (malformed) or None.

Headers stay as h2 hands them over: ``(bytes, bytes)`` tuples, in wire order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from parsers.base import Decision
from parsers.requests import GrpcCall, HttpRequest, new_grpc_call, new_http_request

Headers = list[tuple[bytes, bytes]]

_REQUEST_PSEUDO = {b":method", b":scheme", b":authority", b":path"}
# RFC 9113 §8.2.2: connection-specific fields must not appear in HTTP/2.
_CONNECTION_SPECIFIC = {
    b"connection",
    b"proxy-connection",
    b"keep-alive",
    b"transfer-encoding",
    b"upgrade",
}
# A field name is a lower-case token (RFC 9110 §5.1, RFC 9113 §8.2.1).
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
_STATUS = re.compile(rb"[1-9][0-9][0-9]")


def _regular_field_problem(name: bytes, value: bytes) -> str | None:
    if _NAME.fullmatch(name) is None:
        return f"invalid field name {name!r}"
    if _BAD_VALUE.search(value) is not None:
        return f"invalid value for field {name.decode('latin-1')}"
    if name in _CONNECTION_SPECIFIC:
        return f"connection-specific field {name.decode('latin-1')}"
    if name == b"te" and value != b"trailers":
        return "te other than trailers"
    return None


def request_problem(headers: Headers) -> str | None:
    """Why this request header section is malformed, or None."""
    pseudo: dict[bytes, bytes] = {}
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                return "pseudo-header after a regular field"
            if name not in _REQUEST_PSEUDO:
                return f"unknown pseudo-header {name!r}"
            if name in pseudo:
                return f"duplicate pseudo-header {name!r}"
            pseudo[name] = value
            continue
        regular = True
        problem = _regular_field_problem(name, value)
        if problem:
            return problem
    method = pseudo.get(b":method")
    if not method:
        return "missing :method"
    if method == b"CONNECT":
        if b":scheme" in pseudo or b":path" in pseudo or not pseudo.get(b":authority"):
            return "CONNECT needs :authority only"
        return None
    if not pseudo.get(b":scheme"):
        return "missing :scheme"
    path = pseudo.get(b":path", b"")
    if not path:
        return "missing :path"
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        return "invalid :path"
    return None


def response_problem(headers: Headers) -> str | None:
    """Why this response header section is malformed, or None."""
    status = None
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if regular or name != b":status" or status is not None:
                return f"bad pseudo-header {name!r}"
            status = value
            continue
        regular = True
        problem = _regular_field_problem(name, value)
        if problem:
            return problem
    if status is None or _STATUS.fullmatch(status) is None:
        return "missing or invalid :status"
    return None


def trailers_problem(headers: Headers) -> str | None:
    for name, value in headers:
        if name[:1] == b":":
            return "pseudo-header in trailers"
        problem = _regular_field_problem(name, value)
        if problem:
            return problem
    return None


def header_list_size(headers: Headers) -> int:
    """SETTINGS_MAX_HEADER_LIST_SIZE accounting (RFC 9113 §6.5.2)."""
    return sum(len(n) + len(v) + 32 for n, v in headers)


def is_grpc(headers: Headers) -> bool:
    for name, value in headers:
        if name == b"content-type":
            # application/grpc, application/grpc+proto, application/grpc+json, ...;
            # parameters after ";" do not change the protocol.
            ctype = value.split(b";", 1)[0].strip().lower()
            return ctype == b"application/grpc" or ctype.startswith(b"application/grpc+")
    return False


def build_request(headers: Headers) -> HttpRequest | GrpcCall:
    """The typed request ``decide`` judges (latin-1 keeps every byte)."""
    method = path = authority = ""
    host = ""
    regular = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value.decode("latin-1")
            elif name == b":path":
                path = value.decode("latin-1")
            elif name == b":authority":
                authority = value.decode("latin-1")
            continue
        n, v = name.decode("latin-1"), value.decode("latin-1")
        if n == "host":
            host = v
        regular.append((n, v))
    http = new_http_request(method, path, authority or host, tuple(regular), "2")
    if not is_grpc(headers):
        return http
    service, method_name = grpc_names(path)
    return new_grpc_call(service, method_name, http)


def grpc_names(path: str) -> tuple[str, str]:
    """``/package.Service/Method`` -> ("package.Service", "Method"); ("", "") if not that shape."""
    parts = path.split("?", 1)[0].split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
        return "", ""
    return parts[1], parts[2]


def apply_edits(headers: Headers, edits: tuple[tuple[str, str, str], ...]) -> Headers:
    """Decision.edits (add / delete / replace) on a request header list."""
    for action, name, value in edits:
        key = name.lower().encode("latin-1")
        val = value.encode("latin-1")
        if action == "add":
            headers = [*headers, (key, val)]
        elif action == "delete":
            headers = [(n, v) for n, v in headers if n != key]
        elif action == "replace":
            headers = [(n, v) for n, v in headers if n != key] + [(key, val)]
    return headers


# ---------------------------------------------------------------- denials

DENIED_BODY = b"Access denied"
DENIED_STATUS = 403
GRPC_PERMISSION_DENIED = 7


def http_denial(status: int = DENIED_STATUS, body: bytes = DENIED_BODY) -> tuple[Headers, bytes]:
    return [
        (b":status", str(status).encode()),
        (b"content-type", b"text/plain"),
        (b"content-length", str(len(body)).encode()),
    ], body


def grpc_denial(reason: str, status: int = GRPC_PERMISSION_DENIED) -> Headers:
    """A trailers-only gRPC response (one HEADERS frame with END_STREAM)."""
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", str(status).encode()),
        (b"grpc-message", percent_encode(reason)),
    ]


def percent_encode(message: str) -> bytes:
    """gRPC's grpc-message encoding: printable ASCII except '%' stays, the rest is %XX of UTF-8."""
    out = bytearray()
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def denial_reason(decision: Decision) -> str:
    who = decision.policy or "policy"
    if decision.rule:
        who += f" rule {decision.rule}"
    text = f"Access denied by {who}"
    return f"{text}: {decision.reason}" if decision.reason else text


def headers_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def int_or_none(value: bytes | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
