"""Types of the C constructors (parsers/_fastnew.c)."""

from typing import Any

class Maker:
    def __init__(
        self,
        cls: type,
        names: tuple[str, ...],
        defaults: tuple[Any, ...],
        factories: tuple[Any, ...],
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
