"""The web UI in a real browser: the shipped ``l7proxy firewall --ui`` in front of a
real aiohttp server, a known workload through it, and Debian's headless Chromium
driven by Selenium reading what the page shows.

Workload (the firewall protects app=deathstar in namespace empire):
- this host (127.0.0.1): 3 x GET /v1/ok (forwarded), 2 x PUT /v1/exhaust-port (denied);
- 127.0.0.2, a CIDR peer allowed GET only: 2 x GET /v1/charts (forwarded),
  1 x POST /v1/request-landing (denied);
- 127.0.0.3, denied at L3/L4 by ingressDeny: 1 connection, dropped.

Screenshots go to bench/results/ (the run's artifacts); with
L7PROXY_DOCS_SCREENSHOT=1 (``make ui-screenshot``) the map also goes to
docs/ui-screenshot.png.
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import time

import pytest
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.support import REPO
from tests.support.browser import chromium
from tests.support.firewall import running_firewall
from tests.support.http_upstream import http_upstream
from tests.ui import POLICY

RESULTS = REPO / "bench" / "results"


def ui_url(fw) -> str:
    """The firewall prints its UI address on the line after it starts listening."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fw.proc.stdout], [], [], 0.2)
        if ready:
            line = fw.proc.stdout.readline()
            if "UI on" in line:
                return line.strip().rsplit(" ", 1)[-1]
    raise AssertionError(f"the firewall did not print its UI address:\n{fw.stderr_text()}")


def request(fw, method: str, path: str, source: str = "127.0.0.1") -> int:
    conn = http.client.HTTPConnection(*fw.address, timeout=5, source_address=(source, 0))
    try:
        conn.request(method, path, body=b"" if method in ("POST", "PUT") else None)
        return conn.getresponse().status
    finally:
        conn.close()


def refused(fw, source: str) -> bool:
    """A connection the firewall refuses at L3/L4: closed before any answer."""
    with socket.create_connection(fw.address, timeout=5, source_address=(source, 0)) as s:
        s.sendall(b"GET /v1/ok HTTP/1.1\r\nHost: deathstar\r\n\r\n")
        try:
            return s.recv(100) == b""
        except ConnectionResetError:
            return True


def wait_for(driver, what, timeout: float = 15.0):
    """``what()`` once it is true; the page redraws the map and prepends rows
    while it is read, so an element gone stale meanwhile means: look again."""
    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    )
    return wait.until(lambda _: what())


def settles_at(driver, read, expected, timeout: float = 15.0) -> None:
    """Assert that ``read()`` comes to equal ``expected`` (the last reading if not)."""
    seen = []

    def check():
        seen.append(read())
        return seen[-1] == expected

    try:
        wait_for(driver, check, timeout)
    except TimeoutException:
        assert (seen[-1] if seen else None) == expected


NODES = (By.CSS_SELECTOR, "#nodes g.node")
GROUP_LABELS = (By.CSS_SELECTOR, "#groups .group-label")
ROWS = (By.CSS_SELECTOR, "#flows tbody tr")


def edge_label(edge_id: str) -> tuple[str, str]:
    return (By.CSS_SELECTOR, f'g.edge[data-id="{edge_id}"] text.label')


def edge_counts(driver) -> dict[str, dict[str, int]]:
    """Each drawn edge's lines: verdict -> count (read in one round trip)."""
    return driver.execute_script(
        """
        const out = {};
        for (const edge of document.querySelectorAll("#edges g.edge")) {
          out[edge.dataset.id] = {};
          for (const p of edge.querySelectorAll("path.verdict"))
            out[edge.dataset.id][p.dataset.verdict] = Number(p.dataset.count);
        }
        return out;
        """
    )


def table_rows(driver) -> list[dict[str, str]]:
    """The flow table as shown (read in one round trip)."""
    return driver.execute_script(
        """
        return [...document.querySelectorAll("#flows tbody tr")].map((tr) => ({
          verdict: tr.dataset.verdict,
          source: tr.querySelector("td.source").innerText,
          summary: tr.querySelector("td.summary").innerText,
        }));
        """
    )


@pytest.fixture
def firewall_with_ui():
    with http_upstream() as upstream:
        with running_firewall(
            POLICY.replace("PORT", str(upstream.port)),
            ("127.0.0.1", upstream.port),
            {"app": "deathstar", "io.kubernetes.pod.namespace": "empire"},
            extra_args=["--ui", "127.0.0.1:0"],
        ) as fw:
            yield fw, ui_url(fw), upstream


def test_the_page_shows_the_map_filters_flows_and_explains_a_denial(firewall_with_ui):
    fw, url, upstream = firewall_with_ui
    service = f"ep:service:127.0.0.1:{upstream.port}"

    assert [request(fw, "GET", "/v1/ok") for _ in range(3)] == [200] * 3
    assert [request(fw, "PUT", "/v1/exhaust-port") for _ in range(2)] == [403] * 2
    assert [request(fw, "GET", "/v1/charts", "127.0.0.2") for _ in range(2)] == [200] * 2
    assert request(fw, "POST", "/v1/request-landing", "127.0.0.2") == 403
    assert refused(fw, "127.0.0.3")
    assert len(fw.flows(wait_for=9)) == 9
    # The denied requests never reached the service.
    assert sorted(m for m, _ in upstream.requests) == ["GET"] * 5

    RESULTS.mkdir(parents=True, exist_ok=True)
    with chromium() as browser:
        browser.get(url)
        # The map: one node per peer (the CIDR peers apart from this host), and the
        # service in its namespace's group.
        settles_at(
            browser,
            lambda: {n.get_attribute("data-id") for n in browser.find_elements(*NODES)},
            {"host", "cidr:127.0.0.2/32", "cidr:127.0.0.3/32", service},
        )
        settles_at(
            browser,
            lambda: {g.text for g in browser.find_elements(*GROUP_LABELS)},
            {"namespace empire", "this node", "outside: world and CIDRs"},
        )
        # Edges coloured by verdict, with the counts of the workload.
        settles_at(
            browser,
            lambda: edge_counts(browser),
            {
                f"host->{service}": {"FORWARDED": 3, "DENIED": 2},
                f"cidr:127.0.0.2/32->{service}": {"FORWARDED": 2, "DENIED": 1},
                f"cidr:127.0.0.3/32->{service}": {"DROPPED": 1},
            },
        )
        # The table holds every flow, newest first.
        settles_at(browser, lambda: len(table_rows(browser)), 9)
        settles_at(browser, lambda: table_rows(browser)[0]["verdict"], "DROPPED")
        # An edge's L7 summary.
        wait_for(
            browser, lambda: browser.find_element(*edge_label(f"host->{service}")).click() or 1
        )
        settles_at(
            browser,
            lambda: [
                tuple(td.text for td in tr.find_elements(By.TAG_NAME, "td")[:2])
                for tr in browser.find_elements(By.CSS_SELECTOR, "#l7-summary tr")
            ],
            [("GET /v1/ok", "3"), ("PUT /v1/exhaust-port", "2")],
        )
        browser.save_screenshot(str(RESULTS / "ui-screenshot.png"))
        if os.environ.get("L7PROXY_DOCS_SCREENSHOT"):
            browser.save_screenshot(str(REPO / "docs" / "ui-screenshot.png"))

        # Filter the table: denied flows only.
        browser.find_element(By.ID, "clear").click()
        browser.find_element(By.CSS_SELECTOR, 'input[name=verdict][value="DENIED"]').click()
        settles_at(
            browser,
            lambda: sorted(
                (r["verdict"], r["source"].split(":")[0], r["summary"].split()[0])
                for r in table_rows(browser)
            ),
            [
                ("DENIED", "127.0.0.1", "PUT"),
                ("DENIED", "127.0.0.1", "PUT"),
                ("DENIED", "127.0.0.2", "POST"),
            ],
        )
        # Filter further by endpoint: the CIDR peer.
        browser.find_element(By.ID, "endpoint").send_keys("127.0.0.2\n")
        settles_at(
            browser,
            lambda: [r["summary"].split("/", 1)[-1] for r in table_rows(browser)],
            ["v1/request-landing"],
        )

        # Open the flow's decision: the policy and rule, and the policy trace.
        wait_for(browser, lambda: browser.find_element(*ROWS).click() or 1)
        trace = wait_for(browser, lambda: browser.find_elements(By.ID, "trace"))[0]
        recorded = {
            dd.get_attribute("data-field"): dd.text
            for dd in browser.find_elements(By.CSS_SELECTOR, "#recorded dd")
        }
        assert recorded["verdict"] == "DENIED"
        assert recorded["policy"] == "deathstar-api"
        assert recorded["reason"] == "no L7 rule matches"
        assert "allow deathstar-api spec.ingress[1].toPorts[0].rules.http[0] [GET /v1/.*]: " in (
            trace.text
        )
        assert trace.text.splitlines()[-1] == (
            "verdict: DENIED by policy deathstar-api (no L7 rule matches)"
        )
        command = browser.find_element(By.CSS_SELECTOR, "code.command").text
        assert command.startswith("l7proxy policy trace --from 127.0.0.2 --to ")
        assert "--http 'POST /v1/request-landing " in command
        browser.save_screenshot(str(RESULTS / "ui-decision.png"))


def test_the_page_follows_live_traffic(firewall_with_ui):
    """Flows that happen while the page is open appear in the table and on the map."""
    fw, url, upstream = firewall_with_ui
    service = f"ep:service:127.0.0.1:{upstream.port}"
    with chromium() as browser:
        browser.get(url)
        wait_for(
            browser, lambda: "on" in browser.find_element(By.ID, "live-dot").get_attribute("class")
        )
        assert browser.find_elements(*NODES) == []
        assert request(fw, "PUT", "/v1/exhaust-port") == 403
        assert request(fw, "GET", "/v1/ok") == 200
        settles_at(
            browser, lambda: [r["verdict"] for r in table_rows(browser)], ["FORWARDED", "DENIED"]
        )
        settles_at(
            browser,
            lambda: edge_counts(browser),
            {f"host->{service}": {"FORWARDED": 1, "DENIED": 1}},
        )


def test_the_table_pages_back_through_history(firewall_with_ui):
    """The first page is the newest 50 flows; "load older" reads on from where it stopped."""
    fw, url, _ = firewall_with_ui
    for n in range(60):
        assert request(fw, "GET", f"/v1/page?n={n}") == 200
    assert len(fw.flows(wait_for=60)) == 60
    with chromium() as browser:
        browser.get(url)
        browser.find_element(By.ID, "live").click()  # hold the table still
        settles_at(browser, lambda: len(table_rows(browser)), 50)
        newest = [r["summary"].rsplit("=", 1)[1] for r in table_rows(browser)]
        assert newest == [str(n) for n in range(59, 9, -1)]
        assert browser.find_element(By.ID, "table-count").text == "50 rows"
        browser.find_element(By.ID, "older").click()
        settles_at(
            browser,
            lambda: [r["summary"].rsplit("=", 1)[1] for r in table_rows(browser)],
            [str(n) for n in range(59, -1, -1)],
        )
        settles_at(
            browser, lambda: browser.find_element(By.ID, "table-count").text, "60 rows (all)"
        )
        assert not browser.find_element(By.ID, "older").is_enabled()
