"""``make demo-cluster``: the table passes, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support import REPO
from tests.support.demo_cluster import missing

pytestmark = [pytest.mark.root, pytest.mark.cluster]

DEMO = [sys.executable, "-m", "tests.support.demo_cluster"]


@pytest.fixture(autouse=True)
def _needs() -> None:
    why = missing()
    if why:
        pytest.skip(f"needs {why}")


def leftovers(tag: str) -> list[str]:
    namespaces = subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [
        line
        for line in (namespaces + links).splitlines()
        if f"l7c-{tag}-" in line or f"l7cb{tag}" in line or f"l7cn{tag}" in line
    ]


def test_the_star_wars_table_passes_across_three_nodes() -> None:
    done = subprocess.run(DEMO, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    out = done.stdout
    assert "All outcomes as expected." in out
    assert re.search(
        r"3 L7 +tiefighter PUT /v1/exhaust-port +403 Access denied +403 Access denied +yes", out
    )
    assert re.search(r"2 L3/L4 +xwing POST /v1/request-landing +timeout +timeout +yes", out)
    tag = re.search(r"netns l7c-([0-9a-f]+)-node-1", out)
    assert tag is not None
    assert leftovers(tag.group(1)) == []


def _ctrl_c_reaches_python() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and
    # Python then installs no KeyboardInterrupt for it: a suite run as ``make test &``
    # would send this Ctrl-C to a process deaf to it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_cleans_everything_up() -> None:
    proc = subprocess.Popen(
        DEMO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        preexec_fn=_ctrl_c_reaches_python,
    )
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + 120
    while "== Pods" not in seen:
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, seen
        seen += line
    tag = re.search(r"netns l7c-([0-9a-f]+)-node-1", seen)
    assert tag is not None and leftovers(tag.group(1))
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + rest
    assert "interrupted; cleaned up" in rest
    assert leftovers(tag.group(1)) == []
