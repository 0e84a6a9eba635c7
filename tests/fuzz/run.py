"""Run one fuzz target under atheris: ``python -m tests.fuzz.run TARGET [libFuzzer args]``.

With ``L7PROXY_FUZZ_MODULE`` set to ``MODULE=PATH``, PATH is a build of the C extension
MODULE made for fuzzing (``tests.fuzz.__main__`` makes one: AddressSanitizer and
libFuzzer's edge coverage), and the targets use it instead of the ordinary build.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import atheris


def use_instrumented_build(name: str, path: str) -> None:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


if os.environ.get("L7PROXY_FUZZ_MODULE"):
    use_instrumented_build(*os.environ["L7PROXY_FUZZ_MODULE"].split("=", 1))

with atheris.instrument_imports(include=["parsers"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    name = sys.argv[1]
    target = TARGETS[name]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
