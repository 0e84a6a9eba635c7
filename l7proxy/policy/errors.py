"""Typed policy errors: they always say which file, where in the YAML, and why."""

from __future__ import annotations


class PolicyError(Exception):
    """A policy document was rejected.

    ``file`` is the source file (or ``<string>``), ``path`` the YAML path of
    the offending node, e.g. ``spec.ingress[0].toPorts[0].rules.http[1].method``.
    """

    def __init__(self, reason: str, *, path: str = "", file: str = "<string>"):
        self.reason = reason
        self.path = path
        self.file = file
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.reason}"

    def in_file(self, file: str) -> PolicyError:
        return PolicyError(self.reason, path=self.path, file=file)


class YamlPath:
    """A cheap, immutable YAML path used while walking a document."""

    __slots__ = ("_parts",)

    def __init__(self, parts: tuple[str, ...] = ()):
        self._parts = parts

    def key(self, name: str) -> YamlPath:
        return YamlPath(self._parts + (("." if self._parts else "") + name,))

    def index(self, i: int) -> YamlPath:
        return YamlPath(self._parts + (f"[{i}]",))

    def error(self, reason: str) -> PolicyError:
        return PolicyError(reason, path=str(self))

    def __str__(self) -> str:
        return "".join(self._parts)
