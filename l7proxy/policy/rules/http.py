"""``rules.http``: method, path and host (full-match regexes), headers, headerMatches.

A rule applies to plain HTTP requests and to gRPC calls (through the call's
underlying HTTP request), as in Cilium where gRPC is written as HTTP paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from l7proxy.policy.errors import YamlPath
from l7proxy.policy.rules import Edits, L7Kind, register
from parsers.requests import GrpcCall, HttpRequest

MISMATCH_ACTIONS = ("LOG", "ADD", "DELETE", "REPLACE")
_FIELDS = ("method", "path", "host", "headers", "headerMatches")

# An HTTP rule judges plain requests and gRPC calls alike, through ``request.http``.
HttpOrGrpc = HttpRequest | GrpcCall

# A pattern of plain words and alternatives only (``GET``, ``GET|HEAD``): nothing in it
# means anything to a regex but the bars.
_WORDS = re.compile(r"[A-Za-z0-9_/-]+(?:\|[A-Za-z0-9_/-]+)*")


@dataclass(frozen=True, slots=True)
class Words:
    """A pattern that is plain words, ``GET`` or ``GET|HEAD``, compiled to a lookup.

    ``fullmatch`` answers as a compiled regex's does (something true, or None), and
    is a dict's ``get``: a method written as a word is matched without the regex
    engine, a third of the time per request."""

    pattern: str
    fullmatch: Callable[[str], bool | None] = field(compare=False, repr=False)

    @classmethod
    def of(cls, pattern: str) -> Words:
        return cls(pattern, dict.fromkeys(pattern.split("|"), True).get)


Pattern = re.Pattern[str] | Words


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str  # lower-case
    value: str | None  # None = presence only
    mismatch: str | None  # None = the rule fails on mismatch

    def check(self, request: HttpRequest) -> tuple[bool, tuple[str, str, str] | None, str]:
        """(rule still matches, header edit to apply, explanation)."""
        values = request.header_values(self.name)
        if self.value is None:
            ok = bool(values)
        else:
            ok = self.value in values
        if ok:
            return True, None, f"header {self.name} ok"
        want = self.name if self.value is None else f"{self.name}: {self.value}"
        if self.mismatch is None:
            return False, None, f"header {want} missing"
        edit = {
            "LOG": None,
            "ADD": ("add", self.name, self.value or ""),
            "DELETE": ("delete", self.name, ""),
            "REPLACE": ("replace", self.name, self.value or ""),
        }[self.mismatch]
        return True, edit, f"header {want} mismatch -> {self.mismatch}"


@dataclass(frozen=True, slots=True)
class HttpRule:
    method: Pattern | None
    path: Pattern | None
    host: Pattern | None
    headers: tuple[HeaderMatch, ...]
    # ``matches``, made for the fields this rule sets (``_request_test``): a request is
    # judged in one call, with no test of a field the rule leaves open.
    matches: Callable[[HttpOrGrpc], bool] = field(init=False, repr=False, compare=False)
    # A header it matches may add, delete or replace a header: the request must ask.
    may_edit: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "matches", _request_test(self))
        object.__setattr__(
            self, "may_edit", any(h.mismatch not in (None, "LOG") for h in self.headers)
        )

    def __reduce__(self) -> tuple[type[HttpRule], tuple[Any, ...]]:
        # (A compiled policy is pickled for the workers: ``matches`` is made again.)
        return HttpRule, (self.method, self.path, self.host, self.headers)

    def edits(self, request: HttpOrGrpc) -> Edits:
        headers = self.headers
        if not headers:
            return ()
        return tuple(e for h in headers if (e := h.check(request.http)[1]) is not None)

    def explain(self, request: HttpOrGrpc) -> str:
        http = request.http
        reasons = []
        for name, pattern, value in (
            ("method", self.method, http.method),
            ("path", self.path, http.path),
            ("host", self.host, http.host),
        ):
            if pattern is not None:
                ok = pattern.fullmatch(value) is not None
                reasons.append(
                    f"{name} {value!r} {'matches' if ok else 'does not match'} {pattern.pattern!r}"
                )
        reasons += [h.check(http)[2] for h in self.headers]
        return "; ".join(reasons) or "matches every request"

    def describe(self) -> str:
        parts = [p.pattern for p in (self.method, self.path) if p is not None]
        if self.host is not None:
            parts.append(f"host={self.host.pattern}")
        parts += [h.name if h.value is None else f"{h.name}={h.value}" for h in self.headers]
        return " ".join(parts) or "any"


def _request_test(rule: HttpRule) -> Callable[[HttpOrGrpc], bool]:
    """What ``rule.matches`` is: true when every field the rule sets matches.

    A rule of a method and a path, the most common, is two pattern calls. (An
    HttpRequest's ``http`` is itself: no property call for a plain request.)"""
    method, path, host, headers = rule.method, rule.path, rule.host, rule.headers
    if host is None and not headers:
        if method is not None and path is not None:
            method_matches, path_matches = method.fullmatch, path.fullmatch

            def method_and_path(request: HttpOrGrpc) -> bool:
                http = request if type(request) is HttpRequest else request.http
                return (
                    method_matches(http.method) is not None and path_matches(http.path) is not None
                )

            return method_and_path
        if method is None and path is None:
            return lambda request: True
        pattern = method or path
        assert pattern is not None
        one_matches = pattern.fullmatch
        field_name = "method" if method is not None else "path"

        def one_field(request: HttpOrGrpc) -> bool:
            http = request if type(request) is HttpRequest else request.http
            return one_matches(getattr(http, field_name)) is not None

        return one_field

    def every_field(request: HttpOrGrpc) -> bool:
        http = request if type(request) is HttpRequest else request.http
        if method is not None and not method.fullmatch(http.method):
            return False
        if path is not None and not path.fullmatch(http.path):
            return False
        if host is not None and not host.fullmatch(http.host):
            return False
        return not headers or all(h.check(http)[0] for h in headers)

    return every_field


def _regex(node: Any, path: YamlPath) -> Pattern | None:
    if node is None or node == "":
        return None
    if not isinstance(node, str):
        raise path.error(f"expected a regex string, got {type(node).__name__}")
    if _WORDS.fullmatch(node):
        return Words.of(node)
    try:
        return re.compile(node)
    except re.error as exc:
        raise path.error(f"invalid regex {node!r}: {exc}") from None


def _header_list(node: Any, path: YamlPath) -> list[HeaderMatch]:
    if not isinstance(node, list):
        raise path.error("expected a list")
    out = []
    for i, item in enumerate(node):
        if not isinstance(item, str) or not item.strip():
            raise path.index(i).error("expected a header name, or 'Name: value'")
        name, sep, value = item.partition(":")
        if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name.strip()):
            raise path.index(i).error(f"invalid header name {name.strip()!r}")
        out.append(HeaderMatch(name.strip().lower(), value.strip() if sep else None, None))
    return out


def _header_matches(node: Any, path: YamlPath) -> list[HeaderMatch]:
    if not isinstance(node, list):
        raise path.error("expected a list")
    out = []
    for i, item in enumerate(node):
        ipath = path.index(i)
        if not isinstance(item, dict):
            raise ipath.error("expected a mapping with name, value and optional mismatch")
        for key in item:
            if key not in ("name", "value", "mismatch", "secret"):
                raise ipath.key(str(key)).error(
                    "unknown field (expected one of: name, value, mismatch)"
                )
        if "secret" in item:
            raise ipath.key("secret").error("secrets are not supported on this node; use value")
        name = item.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
            raise ipath.key("name").error(f"invalid header name {name!r}")
        value = item.get("value")
        if value is not None and not isinstance(value, (str, int)):
            raise ipath.key("value").error("expected a string")
        mismatch = item.get("mismatch")
        if mismatch is not None and mismatch not in MISMATCH_ACTIONS:
            raise ipath.key("mismatch").error(
                f"expected one of {', '.join(MISMATCH_ACTIONS)}, got {mismatch!r}"
            )
        if mismatch in ("ADD", "REPLACE") and value is None:
            raise ipath.key("value").error(f"mismatch {mismatch} needs a value")
        out.append(HeaderMatch(name.lower(), None if value is None else str(value), mismatch))
    return out


def compile_rule(node: Any, path: YamlPath) -> HttpRule:
    if not isinstance(node, dict):
        raise path.error("expected a mapping")
    for key in node:
        if key not in _FIELDS:
            raise path.key(str(key)).error(f"unknown field (expected one of: {', '.join(_FIELDS)})")
    headers = []
    if node.get("headers") is not None:
        headers += _header_list(node["headers"], path.key("headers"))
    if node.get("headerMatches") is not None:
        headers += _header_matches(node["headerMatches"], path.key("headerMatches"))
    return HttpRule(
        method=_regex(node.get("method"), path.key("method")),
        path=_regex(node.get("path"), path.key("path")),
        host=_regex(node.get("host"), path.key("host")),
        headers=tuple(headers),
    )


KIND = register(
    L7Kind[HttpOrGrpc, HttpRule](
        key="http", parser="http", request_types=(HttpRequest, GrpcCall), compile=compile_rule
    )
)
