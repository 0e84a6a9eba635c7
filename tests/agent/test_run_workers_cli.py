"""``l7proxy run --workers``: what the command line refuses, before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "l7proxy", "--state-dir", str(tmp_path / "state"), "run", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_the_web_ui_is_refused_with_workers(tmp_path: Path):
    done = run(tmp_path, "--workers", "2", "--ui", "127.0.0.1:0")
    assert done.returncode == 2
    assert "--ui works with one worker only" in done.stderr
    assert not (tmp_path / "state").exists()  # refused before the agent made anything


def test_a_worker_count_must_be_a_number_from_one_or_auto(tmp_path: Path):
    for bad in ("0", "two", "-1"):
        done = run(tmp_path, "--workers", bad)
        assert done.returncode == 2
        assert f"expected a number of workers from 1, or auto, got '{bad}'" in done.stderr
