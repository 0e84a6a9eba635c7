"""A new Python interpreter for a few lines of code, as the proxy's start would see them."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import REPO


def run_python(
    code: str, *, unbuilt: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """``code`` in a new interpreter, in the checkout, with ``env`` and none of the
    caller's ``L7PROXY_*`` switches; with ``unbuilt`` (a C extension's module name),
    as if that extension had not been built: its import fails."""
    prelude = ""
    if unbuilt is not None:
        prelude = (
            "import sys\n"
            "class NotBuilt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name == {unbuilt!r}:\n"
            "            raise ImportError('No module named ' + repr(name))\n"
            "sys.meta_path.insert(0, NotBuilt())\n"
        )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("L7PROXY_")}
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        env={**environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
