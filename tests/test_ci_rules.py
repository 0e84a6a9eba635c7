"""The suite's own rules, checked by running pytest on a tiny suite in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import REPO

SKIPPING_SUITE = textwrap.dedent(
    """
    import pytest

    @pytest.mark.root
    def test_needs_root():
        pytest.skip("needs root")

    def test_runs():
        pass
    """
)


def run_suite(tmp_path: Path, *, ci: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_tiny.py").write_text(SKIPPING_SUITE)
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )


def test_a_skip_is_a_skip_on_a_developers_machine(tmp_path: Path) -> None:
    result = run_suite(tmp_path, ci=False)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 1 skipped" in result.stdout


def test_a_skip_fails_under_ci_naming_its_reason(tmp_path: Path) -> None:
    result = run_suite(tmp_path, ci=True)
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 passed" in result.stdout
    assert "skipped under CI, where every test must run: needs root" in result.stdout


def test_make_test_lints_formats_and_type_checks_before_any_test_runs() -> None:
    """`.ci/run` is `make test`: a lint, format or type error fails it before pytest starts."""
    assert "make test" in (REPO / ".ci" / "run").read_text()
    plan = subprocess.run(
        ["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    steps = [
        next(i for i, line in enumerate(plan) if command in line)
        for command in ("ruff check .", "ruff format --check .", "mypy", "-m pytest")
    ]
    assert steps == sorted(steps), plan
