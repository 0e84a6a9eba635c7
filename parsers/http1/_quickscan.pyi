# The C twin of parsers.http1.quick.quick_request_head (parsers/http1/_quickscan.c).
from collections.abc import Callable
from typing import Any

from parsers.http1.head import MessageHead, RequestFields

MAX_FIELDS: int

def configure(
    head_type: type[MessageHead], fields_type: type[RequestFields], head_fields: tuple[str, ...], /
) -> None: ...
def derive_forms(
    make_request: Callable[[str, str, str, tuple[tuple[str, str], ...], str], Any],
    make_form: Callable[[Any, bytes], Any],
    /,
) -> None: ...
def scan_request_head(raw: bytes, /) -> MessageHead | None: ...
