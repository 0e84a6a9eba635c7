"""Helpers shared by the HTTP/1 tests (no tests here); the three ways to feed
them are in tests/support/feeding.py."""

from __future__ import annotations

from parsers.base import Decision, ToClient, ToServer

IMPLS = ("c", "python")


def normalise(commands) -> list:
    """Merge consecutive writes in one direction, so different input splits
    that mean the same thing compare equal."""
    out: list = []
    for cmd in commands:
        if isinstance(cmd, ToServer | ToClient) and out and type(out[-1]) is type(cmd):
            out[-1] = type(cmd)(out[-1].data + cmd.data)
        elif isinstance(cmd, ToServer | ToClient):
            out.append(type(cmd)(bytes(cmd.data)))
        else:
            out.append(cmd)
    return out


def sent(commands, kind) -> bytes:
    return b"".join(c.data for c in commands if type(c) is kind)


def deny_path(prefix: str):
    """A decide function that refuses paths starting with ``prefix``."""

    def decide(request):
        if request.path.startswith(prefix):
            return Decision(False, policy="test", rule="deny", reason=f"path {prefix}*")
        return Decision(True, policy="test", rule="allow")

    return decide


# ---------------------------------------------------------------- the quick read's twins


def in_c_subset(head) -> bool:
    """Whether the C head scanner must read a head the Python quick read gave as
    ``head`` (None: it read nothing): the subset docs/http1.md states, spelled out
    here apart from the C code, so a test fails if the two drift."""
    if head is None:
        return False
    names = {name.lower() for name, _ in head.headers}
    if names & {b"content-length", b"transfer-encoding", b"upgrade", b"expect"}:
        return False
    connection = head.values(b"connection")
    if len(connection) > 1 or any(
        value.lower() not in (b"close", b"keep-alive") for value in connection
    ):
        return False
    return not any(host.startswith(b"[") for host in head.values(b"host"))


def typed(value):
    """A value with its type, and the items of a list or tuple with theirs: ``==``
    alone takes 1 for True, and a tuple subclass for a tuple."""
    if isinstance(value, list | tuple):
        return (type(value).__name__, [typed(v) for v in value])
    return (type(value).__name__, value)


def as_built(head) -> dict:
    """Every field of a ``MessageHead``, typed; ``derived_fields`` field by field."""
    import dataclasses

    out = {f.name: typed(getattr(head, f.name)) for f in dataclasses.fields(head)}
    form = head.derived
    if form is not None:  # a request's RequestForm: its HttpRequest field by field
        request = form.request
        out["derived"] = (
            type(form).__name__,
            type(request).__name__,
            {f.name: typed(getattr(request, f.name)) for f in dataclasses.fields(request)},
            typed(form.wire),
        )
    facts = head.derived_fields
    if facts is not None:
        out["derived_fields"] = (
            type(facts).__name__,
            {n: typed(getattr(facts, n)) for n in facts._fields},
        )
    return out


def twin_difference(raw: bytes) -> str | None:
    """How the C scanner's reading of ``raw`` differs from the Python quick read's,
    or None when they agree: the same head field for field (``derived_fields``: what
    the engine's ``request_field_facts`` makes of the Python one, which the scanner
    makes itself; ``derived``: the form the engine's ``_request_form`` makes of it;
    ``wire``: ``raw`` itself), or the scanner's None for a head outside its subset."""
    import dataclasses

    from parsers.http1.engine import request_field_facts
    from parsers.http1.quick import C_SCANNER, quick_request_head

    def engine_form(head):
        """The form the engine makes of a head at its first use; None for a head it
        refuses (an HTTP/1.1 request without Host)."""
        from parsers.base import allow_all
        from parsers.http1.engine import Http1Engine
        from parsers.http1.errors import Http1Error

        try:
            return Http1Engine(allow_all)._request_form(dataclasses.replace(head))
        except Http1Error:
            return None

    assert C_SCANNER is not None, "the C head scanner is not built (make setup)"
    py = quick_request_head(raw)
    c = C_SCANNER(raw)
    if c is None:
        return f"the scanner refused a head in its subset: {raw!r}" if in_c_subset(py) else None
    if py is None:
        return f"the scanner read a head the Python read refuses: {raw!r}"
    if not in_c_subset(py):
        return f"the scanner read a head outside its subset: {raw!r}"
    py = dataclasses.replace(py, derived_fields=request_field_facts(py), wire=raw)
    expected = as_built(dataclasses.replace(py, derived=engine_form(py)))
    got = as_built(c)
    if got != expected:
        wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
        return f"the twins differ on {raw!r}: {wrong}"
    if c.wire is not raw or py.wire is not raw:
        return f"the head is not forwarded as the same bytes object: {raw!r}"
    return None


def edited(raw: bytes, edits, byte: int | None = None) -> bytes:
    """``raw`` with each ``(where, byte, how)`` edit done in turn: ``how`` inserts,
    replaces or deletes the byte at ``where`` (modulo the length then). Edits given
    as ``(where, how)`` use ``byte`` for every one."""
    data = bytearray(raw)
    for edit in edits:
        where, value, how = edit if len(edit) == 3 else (edit[0], byte, edit[1])
        at = where % (len(data) + 1)
        if how == "insert":
            data[at:at] = bytes([value])
        elif how == "replace" and at < len(data):
            data[at] = value
        elif at < len(data):
            del data[at]
    return bytes(data)
