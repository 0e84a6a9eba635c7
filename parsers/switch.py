"""The switches that force one of a C implementation and its Python twin.

``L7PROXY_FAST_NEW`` (``parsers.fastnew``) and ``L7PROXY_HTTP1_QUICK``
(``parsers.http1.quick``) are each read once, at import, with the same rules.
"""

from __future__ import annotations

import os


def forced_implementation(variable: str, c_missing: str | None, c_name: str) -> str:
    """``auto``, ``c`` or ``python``: what the environment's ``variable`` forces (unset
    or empty: ``auto``). Any other value is a ``ValueError``; ``c`` while the C one
    (``c_name``) is missing, ``c_missing`` saying why, is an ``ImportError``: a start
    that asks for it stops with that reason."""
    forced = os.environ.get(variable, "auto").strip().lower() or "auto"
    if forced not in ("auto", "c", "python"):
        raise ValueError(f"unknown {variable} {forced!r} (want c, python or auto)")
    if forced == "c" and c_missing is not None:
        raise ImportError(f"{variable}=c, but {c_name} is {c_missing}")
    return forced
