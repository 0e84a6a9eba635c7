"""The fast constructors (parsers/fastnew.py and its C twin, parsers/_fastnew.c): what a
maker builds is what the class builds, for every class the engines build per message,
for random layouts, and for every wrong call; classes that do not qualify get
themselves back; the switch forces the Python twin, and status says which runs."""

from __future__ import annotations

import dataclasses
import gc
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parsers import fastnew
from parsers.base import Access, Decision, Reply, ToClient, ToServer
from parsers.fastnew import C_MAKER, fast_new, layout
from parsers.http1.engine import RequestForm, _Exchange
from parsers.http1.head import MessageHead
from parsers.requests import GrpcCall, HttpRequest
from tests.support.interpreter import run_python

C_ACTIVE = fastnew.FAST_NEW_IMPLEMENTATION == "c"
needs_c = pytest.mark.skipif(not C_ACTIVE, reason="the C constructors are not active")

ALLOW = Decision(True, policy="p", rule="r")
GET = HttpRequest("GET", "/a?b=1", "example.com", (("host", "example.com"),), "1.1")

# Each class the engines build per message, with calls as the engines and tests make them.
CALLS: list[tuple[type, tuple[Any, ...], dict[str, Any]]] = [
    (ToServer, (b"GET / HTTP/1.1\r\n\r\n",), {}),
    (ToClient, (memoryview(b"HTTP/1.1 200 OK\r\n\r\n"),), {}),
    (Access, (GET, ALLOW, 7), {}),
    (Access, (GET, ALLOW), {}),
    (Access, (), {"request": GET, "decision": ALLOW, "key": 3}),
    (Reply, (7, {"status": 200}), {}),
    (Reply, (7,), {}),
    (Reply, (), {"key": 1}),
    (_Exchange, (0, GET, None, True), {}),
    (_Exchange, (0, GET, None, False, b"403", True), {"last": True}),
    (RequestForm, (GET, b"GET /a?b=1 HTTP/1.1\r\n\r\n"), {}),
    (HttpRequest, ("GET", "/", "h", (), "1.1"), {}),
    (HttpRequest, ("POST", "/svc/M", "h", ()), {"version": "2"}),
    (GrpcCall, ("pkg.Svc", "Do", GET), {}),
    (MessageHead, (), {"method": "GET", "target": "/", "headers": [(b"Host", b"h")], "size": 30}),
    (MessageHead, (), {"status": 204, "reason": "No Content", "version": "1.0"}),
]


def slots(obj: object) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}  # type: ignore[arg-type]


@needs_c
@pytest.mark.parametrize(("cls", "args", "kwargs"), CALLS, ids=lambda v: getattr(v, "__name__", ""))
def test_a_maker_builds_what_its_class_builds(cls, args, kwargs):
    maker = fast_new(cls)
    assert type(maker) is C_MAKER
    made, called = maker(*args, **kwargs), cls(*args, **kwargs)
    assert type(made) is cls
    assert made == called and repr(made) == repr(called)
    assert slots(made) == slots(called)
    assert gc.is_tracked(made) == gc.is_tracked(called)
    assert dataclasses.replace(made) == called
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    if params.frozen:
        assert hash(made) == hash(called)
        with pytest.raises(dataclasses.FrozenInstanceError):
            made.__setattr__(dataclasses.fields(cls)[0].name, None)
    else:
        name = dataclasses.fields(cls)[0].name
        setattr(made, name, "changed")  # an ordinary instance: its slots stay writable
        assert getattr(made, name) == "changed"


@needs_c
def test_a_default_factory_makes_a_new_default_each_time():
    new_reply = fast_new(Reply)
    first, second = new_reply(1), new_reply(2)
    assert first.fields == {} and second.fields == {}
    first.fields["status"] = 200
    assert second.fields == {}


@needs_c
@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "Access() missing required argument 'request'"),
        ((GET,), {}, "Access() missing required argument 'decision'"),
        ((GET, ALLOW, 1, 2), {}, "Access() takes 3 positional arguments but 4 were given"),
        ((GET,), {"request": GET, "decision": ALLOW}, "multiple values for argument 'request'"),
        ((GET, ALLOW), {"verdict": 1}, "unexpected keyword argument 'verdict'"),
    ],
)
def test_a_wrong_call_is_refused_as_the_class_refuses_it(args, kwargs, message):
    with pytest.raises(TypeError) as by_class:
        Access(*args, **kwargs)
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fast_new(Access)(*args, **kwargs)
    assert by_class.value  # the class refuses the same call


@needs_c
def test_no_reference_is_kept_or_lost_by_building_freeing_or_refusing():
    new_access, new_reply = fast_new(Access), fast_new(Reply)
    request, decision, fields = object(), object(), {"status": 200}
    before = [sys.getrefcount(x) for x in (request, decision, fields)]
    held = sys.getrefcount(request)
    made = [new_access(request, decision, i) for i in range(1000)]
    made += [new_reply(i, fields) for i in range(1000)]
    assert sys.getrefcount(request) == held + 1000
    del made
    for _ in range(1000):
        with pytest.raises(TypeError):
            new_access(request, decision, 1, request=request)
        with pytest.raises(TypeError):
            new_reply(fields=fields)  # the key missing: the factory is not run
    assert [sys.getrefcount(x) for x in (request, decision, fields)] == before


# ------------------------------------------------------------- random layouts


@st.composite
def layouts(draw: st.DrawFn) -> tuple[type, list[Any], dict[str, Any]]:
    """A slotted dataclass of 1 to 10 fields (the last ones with defaults, some made by
    a factory), maybe frozen; and a call of it: the required fields, then some of the
    rest positionally and some by name."""
    n = draw(st.integers(1, 10))
    required = draw(st.integers(0, n))
    frozen = draw(st.booleans())
    fields = []
    for i in range(n):
        if i < required:
            fields.append((f"f{i}", Any))
        elif draw(st.booleans()):
            fields.append((f"f{i}", Any, field(default_factory=list)))
        else:
            fields.append((f"f{i}", Any, field(default=draw(st.integers() | st.text(max_size=3)))))
    cls = dataclasses.make_dataclass("Random", fields, slots=True, frozen=frozen)
    values = draw(st.lists(st.integers() | st.binary(max_size=4), min_size=n, max_size=n))
    given_positionally = draw(st.integers(required, n))
    by_name = {f"f{i}": values[i] for i in range(given_positionally, n) if draw(st.booleans())}
    return cls, values[:given_positionally], by_name


@needs_c
@settings(max_examples=300, deadline=None)
@given(layouts())
def test_any_slotted_layout_is_built_as_its_class_builds_it(case):
    cls, args, kwargs = case
    maker = fast_new(cls)
    assert type(maker) is C_MAKER
    assert slots(maker(*args, **kwargs)) == slots(cls(*args, **kwargs))


# ------------------------------------------------------------- who qualifies


@dataclass
class WithDict:
    a: int


@dataclass(slots=True)
class WithPostInit:
    a: int

    def __post_init__(self) -> None:
        self.a += 1


@dataclass(slots=True)
class WithComputedField:
    a: int
    b: int = field(init=False, default=0)


@dataclass(slots=True, kw_only=True)
class KeywordOnly:
    a: int


class PlainClass:
    __slots__ = ("a",)


@pytest.mark.parametrize(
    ("cls", "why"),
    [
        (WithDict, "field a is not a slot of WithDict"),
        (WithPostInit, "has __post_init__"),
        (WithComputedField, "field b is not a positional __init__ field"),
        (KeywordOnly, "field a is not a positional __init__ field"),
        (PlainClass, "not a dataclass"),
    ],
)
def test_a_class_that_does_not_qualify_is_its_own_constructor(cls, why):
    assert layout(cls) == why
    assert fast_new(cls) is cls


@needs_c
def test_the_c_maker_itself_refuses_what_is_not_a_slot_of_the_class():
    assert C_MAKER is not None
    with pytest.raises(TypeError, match="field 0 of WithDict is not an object slot"):
        C_MAKER(WithDict, ("a",), (), ())
    with pytest.raises(TypeError, match="a factory per default"):
        C_MAKER(Access, ("request", "decision", "key"), (None,), ())

    @dataclass(slots=True)
    class Child(Access):  # the parent's slots are not the child's own
        extra: int = 0

    with pytest.raises(TypeError, match="field 0 of Child is not an object slot"):
        C_MAKER(Child, ("request", "decision", "key", "extra"), (None, 0), (None, None))


# ------------------------------------------------------------- the switch


# What a client's request turns into, and the status line's entry.
TRANSCRIPT = (
    "from parsers.registry import active_parsers\n"
    "from parsers.base import allow_all\n"
    "from parsers.http1.engine import Http1Engine\n"
    "engine = Http1Engine(allow_all)\n"
    "print(active_parsers()['fast_new'])\n"
    "print(engine.client_data(b'GET /x?y=1 HTTP/1.1\\r\\nHost: h\\r\\nX-Id: 1\\r\\n\\r\\n'))\n"
    "print(engine.server_data(b'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok'))\n"
)


@needs_c
def test_forcing_the_python_twin_changes_nothing_but_the_status():
    c_run = run_python(TRANSCRIPT)
    python_run = run_python(TRANSCRIPT, L7PROXY_FAST_NEW="python")
    assert c_run.returncode == 0 and python_run.returncode == 0, c_run.stderr + python_run.stderr
    c_status, *c_commands = c_run.stdout.splitlines()
    python_status, *python_commands = python_run.stdout.splitlines()
    assert (c_status, python_status) == ("c", "python")
    assert c_commands == python_commands
    assert c_commands[0].startswith("[Access(request=HttpRequest(method='GET', path='/x?y=1'")
    assert c_commands[1] == (
        "[ToClient(data=b'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok'), "
        "Reply(key=0, fields={'status': 200})]"
    )


def test_without_the_compiled_constructors_the_classes_serve_and_status_says_so():
    code = (
        "from parsers import fastnew\n"
        "from parsers.base import ToServer, new_to_server\n"
        "print(fastnew.FAST_NEW_IMPLEMENTATION, new_to_server is ToServer)\n"
        "print(fastnew.C_MAKER_MISSING)\n"
    )
    proc = run_python(code, unbuilt="parsers._fastnew")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "python True",
        "not built (No module named 'parsers._fastnew')",
    ]
    forced = run_python(code, unbuilt="parsers._fastnew", L7PROXY_FAST_NEW="c")
    assert forced.returncode != 0
    assert "L7PROXY_FAST_NEW=c, but the C constructor is not built" in forced.stderr


def test_an_unknown_implementation_is_refused_at_start():
    proc = run_python("import parsers.fastnew", L7PROXY_FAST_NEW="rust")
    assert proc.returncode != 0
    assert "unknown L7PROXY_FAST_NEW 'rust'" in proc.stderr
