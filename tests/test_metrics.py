"""The Prometheus endpoint of `pgleap run`: the metric families exist, move with a workload, carry no per-query labels."""

from __future__ import annotations

import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgleap.lab import LabServer
from pgleap.testing import ProxyProcess

pytestmark = pytest.mark.integration

PGLEAP = Path(sys.executable).with_name("pgleap")
ALLOWED_LABELS = {"database", "role", "le"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Exporter(ProxyProcess):
    """`pgleap run` with a metrics port, in a subprocess."""

    def __init__(self, tmp_path: Path, server: LabServer) -> None:
        super().__init__(tmp_path, {"app": server}, metrics=True)

    def scrape_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            assert response.status == 200
            return response.read().decode()

    def scrape(self) -> Samples:
        """Every sample as {(name, sorted labels): value}."""
        samples: Samples = {}
        for family in text_string_to_metric_families(self.scrape_text()):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples


@pytest.fixture
def exporter(tmp_path: Path, backend: LabServer) -> Iterator[Exporter]:
    """pgleap in front of `backend` with its metrics endpoint up."""
    e = Exporter(tmp_path, backend)
    try:
        e.wait_accepting()
        yield e
    finally:
        e.stop()


def app_value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"database": "app", **labels}.items())))
    assert key in samples, f"{key} not exported; have {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def test_metric_families_exist_with_only_coarse_labels(exporter: Exporter) -> None:
    """Every documented family is exported for database app, labelled only by database/role/le."""
    samples = exporter.scrape()
    for name in (
        "pgleap_client_connections",
        "pgleap_queries_total",
        "pgleap_transactions_total",
        "pgleap_received_bytes_total",
        "pgleap_sent_bytes_total",
        "pgleap_server_errors_total",
        "pgleap_query_duration_seconds_count",
        "pgleap_query_duration_seconds_sum",
    ):
        app_value(samples, name)
    app_value(samples, "pgleap_server_connections", role="source")
    assert any(name == "pgleap_query_duration_seconds_bucket" for name, _ in samples)
    for name, labels in samples:
        extra = {k for k, _ in labels} - ALLOWED_LABELS
        assert not extra, f"{name} has labels {extra} besides {ALLOWED_LABELS}"


def test_metrics_move_with_workload_and_errors(exporter: Exporter) -> None:
    """Connections, queries, transactions, bytes, errors and the latency histogram all follow a real workload."""
    before = exporter.scrape()
    with psycopg.connect(exporter.dsn(), autocommit=False) as conn:
        for i in range(10):
            conn.execute("select %s::int", (i,))
        conn.commit()
        conn.execute("select repeat('x', 100000)").fetchone()
        conn.commit()
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        conn.rollback()
        during = exporter.scrape()
        assert app_value(during, "pgleap_client_connections") == 1
        assert app_value(during, "pgleap_server_connections", role="source") == 1
        assert app_value(during, "pgleap_server_connections", role="target") == 0
        queries = during[("pgleap_queries_total", (("database", "app"),))]
        assert queries >= app_value(before, "pgleap_queries_total") + 13
        assert app_value(during, "pgleap_transactions_total") >= app_value(before, "pgleap_transactions_total") + 3
        assert app_value(during, "pgleap_server_errors_total") == app_value(before, "pgleap_server_errors_total") + 1
        assert app_value(during, "pgleap_received_bytes_total") > app_value(before, "pgleap_received_bytes_total") + 200
        assert app_value(during, "pgleap_sent_bytes_total") >= app_value(before, "pgleap_sent_bytes_total") + 100000
        count = app_value(during, "pgleap_query_duration_seconds_count")
        assert count == queries
        assert app_value(during, "pgleap_query_duration_seconds_sum") > 0
        assert app_value(during, "pgleap_query_duration_seconds_bucket", le="+Inf") == count
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for (name, labels), value in during.items()
            if name == "pgleap_query_duration_seconds_bucket" and dict(labels).get("database") == "app"
        )
        assert len(buckets) > 5
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), "histogram buckets are not cumulative"
    deadline = time.monotonic() + 30
    while app_value(exporter.scrape(), "pgleap_client_connections") != 0:
        assert time.monotonic() < deadline, "closed client still counted"
        time.sleep(0.05)
    assert app_value(exporter.scrape(), "pgleap_server_connections", role="source") == 0


def test_scrape_shows_no_query_text(exporter: Exporter) -> None:
    """Query text never becomes a label or a series name (no per-query cardinality)."""
    marker = "metrics_marker_7f3a"
    with psycopg.connect(exporter.dsn(), autocommit=True) as conn:
        for i in range(3):
            conn.execute(f"select {i} as {marker}")
        text = exporter.scrape_text()
    assert marker not in text
    series = {name for name, _ in exporter.scrape()}
    assert all(name.startswith("pgleap_") or name.startswith(("python_", "process_")) for name in series), series
