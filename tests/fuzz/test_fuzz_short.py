"""The short fuzz run CI does on every change (``make fuzz`` runs 600 s)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support import REPO


def test_short_fuzz_run_finds_nothing(tmp_path):
    pytest.importorskip("atheris")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", "--budget", "21", "--artifacts", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    tried = int(re.search(r"total inputs tried: (\d+)", proc.stdout).group(1))
    assert tried > 1000
    assert list(tmp_path.iterdir()) == []  # no crash, timeout or OOM artifacts
