"""Run one fuzz target under atheris: ``python -m tests.fuzz.run TARGET [libFuzzer args]``."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["parsers"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    name = sys.argv[1]
    target = TARGETS[name]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
