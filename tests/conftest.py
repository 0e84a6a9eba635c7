"""Suite-wide rules.

Under CI (the ``CI`` environment variable is set), a skipped test is a failure.
CI runs as root on a BPF-capable kernel with every peer installed (scripts/setup.sh),
so a skip there can only mean that a test silently stopped running: the root-only
end-to-end tests above all, which skip with a reason on a developer's machine.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support.etcd import EtcdServer

UNDER_CI = bool(os.environ.get("CI"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if UNDER_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        reason = str(reason).removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where every test must run: {reason}"


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    """A real etcd (Debian's etcd-server) for the tests of one module, its data on
    tmpfs; each test works under its own key prefix."""
    # Imported here: this file also serves tests/test_ci_rules.py's tiny suite,
    # which runs outside the checkout.
    from tests.support import etcd as etcd_support

    why = etcd_support.available()
    if why:
        pytest.skip(why)
    with etcd_support.running_etcd() as server:
        yield server
