"""Two workers' real metrics combined as the supervisor serves them: traffic summed,
what each worker computes from the same policy counted once, readiness only if
all are ready, and a gone worker's counts kept."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from l7proxy.observe.aggregate import combine_families, counted, parse
from l7proxy.observe.metrics import Metrics


def worker(forwarded: int, denied: int, *, healthy: bool, connections: int) -> list:
    status = {
        "healthy": healthy,
        "policies": [{"name": "api"}],
        "policy_revision": 3,
        "policy_imports": 3,
        "policy_import_errors": 1,
        "redirects": {"http": 1},
        "proxy": {"connections_total": connections, "connections_active": 1, "parse_errors": {}},
    }
    metrics = Metrics(lambda: status)
    for verdict, count in (("FORWARDED", forwarded), ("DENIED", denied)):
        for _ in range(count):
            metrics.observe(
                {"type": "l7", "verdict": verdict, "protocol": "http", "latency_ms": 2.0}
            )
    metrics.status = status
    return parse(generate_latest(metrics.registry).decode())


def values(families: list) -> dict[str, float]:
    """``name{k=v,...}`` -> value, labels sorted."""
    return {
        f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}": s.value
        for fam in families
        for s in fam.samples
    }


def test_traffic_is_summed_and_the_policy_counted_once() -> None:
    combined = values(
        combine_families(
            [
                worker(5, 2, healthy=True, connections=7),
                worker(3, 1, healthy=False, connections=4),
            ]
        )
    )
    flows = "hubble_flows_processed_total{protocol=http,type=L7,verdict="
    assert combined[flows + "FORWARDED}"] == 8
    assert combined[flows + "DENIED}"] == 3
    assert combined["cilium_policy_l7_total{proxy_type=http,rule=received}"] == 11
    assert combined["l7proxy_proxy_connections_total{}"] == 11
    assert combined["l7proxy_proxy_connections_active{}"] == 2
    assert combined["cilium_proxy_upstream_reply_seconds_count{protocol=http}"] == 8
    assert combined["cilium_policy{}"] == 1
    assert combined["cilium_policy_max_revision{}"] == 3
    assert combined["cilium_policy_change_total{outcome=success}"] == 3
    assert combined["cilium_proxy_redirects{protocol=http}"] == 1
    assert combined["l7proxy_healthy{}"] == 0  # one worker is not ready


def test_what_a_gone_worker_counted_stays_in_the_totals_and_its_levels_do_not() -> None:
    gone = counted(worker(5, 2, healthy=True, connections=7))
    combined = values(combine_families([worker(1, 0, healthy=True, connections=1), gone]))
    assert combined["hubble_flows_processed_total{protocol=http,type=L7,verdict=FORWARDED}"] == 6
    assert combined["l7proxy_proxy_connections_total{}"] == 8
    assert combined["l7proxy_proxy_connections_active{}"] == 1  # a level: only the living
    assert combined["cilium_policy{}"] == 1
    assert not [k for k in values(gone) if "_created{" in k]


def test_the_combined_families_are_a_valid_exposition() -> None:
    from prometheus_client import CollectorRegistry

    families = combine_families([worker(2, 1, healthy=True, connections=3)] * 2)

    class Fixed:
        def collect(self):
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert {"hubble_flows_processed", "cilium_policy", "l7proxy_healthy"} <= names
