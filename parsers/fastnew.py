"""Fast constructors for the slotted dataclasses built on every message.

    ToServerNew = fast_new(ToServer)
    ToServerNew(data)  # == ToServer(data), in a third of the time

Calling a Python class runs ``type.__call__``, ``object.__new__``, a lookup of
``__init__`` and a Python frame for it: for a command or a request, more than the
engine's own work with the object, and the engines build several per message.
``fast_new(cls)`` returns a constructor that takes the same arguments as the
dataclass ``__init__`` (in field order or by name, defaults filled in) and builds
the same object: the C twin (``parsers/_fastnew.c``, built by ``setup.py``) allocates
it and stores each argument in its slot; the Python twin is the class itself.

A class qualifies when every field is a positional ``__init__`` field (not
keyword-only, not ``init=False``), held in a slot of the class itself, and the class
has no ``__post_init__``: then the C constructor sets
exactly what ``__init__`` would. Any other class gets itself back. A frozen class
stays frozen (the slots are filled as ``quick_init`` fills them, beneath
``__setattr__``).

``L7PROXY_FAST_NEW=python`` forces the Python twin everywhere (``c``: fail at import
when the C one is missing); ``FAST_NEW_IMPLEMENTATION`` says which runs (``l7proxy
status``: ``fast_new``), and ``tests/parsers/test_fastnew.py`` holds the two equal.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any, TypeVar

from parsers.switch import forced_implementation

_T = TypeVar("_T")


def _load_maker() -> tuple[type | None, str]:
    """The C constructor type, or None and why not."""
    try:
        from parsers._fastnew import Maker
    except ImportError as exc:  # not built (no compiler, or a checkout not set up)
        return None, f"not built ({exc})"
    return Maker, ""


C_MAKER, C_MAKER_MISSING = _load_maker()


_FORCED = forced_implementation(
    "L7PROXY_FAST_NEW", C_MAKER_MISSING if C_MAKER is None else None, "the C constructor"
)
FAST_NEW_IMPLEMENTATION = "python" if _FORCED == "python" or C_MAKER is None else "c"


def layout(cls: type) -> tuple[tuple[str, ...], tuple[Any, ...], tuple[Any, ...]] | str:
    """The fields of ``cls`` in ``__init__`` order, the defaults of the last ones and
    their factories (None for a plain default); or why the C constructor cannot
    build it."""
    if not dataclasses.is_dataclass(cls):
        return "not a dataclass"
    if getattr(cls, "__post_init__", None) is not None:
        return "has __post_init__"
    names: list[str] = []
    defaults: list[Any] = []
    factories: list[Any] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.kw_only:
            return f"field {f.name} is not a positional __init__ field"
        if type(cls.__dict__.get(f.name)) is not types.MemberDescriptorType:
            return f"field {f.name} is not a slot of {cls.__name__}"
        if f.default_factory is not dataclasses.MISSING:
            defaults.append(None)
            factories.append(f.default_factory)
        elif f.default is not dataclasses.MISSING:
            defaults.append(f.default)
            factories.append(None)
        names.append(f.name)
    return tuple(names), tuple(defaults), tuple(factories)


def fast_new(cls: type[_T]) -> Callable[..., _T]:
    """A constructor for ``cls`` that builds what ``cls(...)`` builds, faster when the
    C twin is active and ``cls`` qualifies; else ``cls`` itself."""
    if FAST_NEW_IMPLEMENTATION != "c" or C_MAKER is None:
        return cls
    found = layout(cls)
    if isinstance(found, str):
        return cls
    maker: Callable[..., _T] = C_MAKER(cls, *found)
    return maker
