"""A Prometheus collector that reads the proxy's counters at scrape time (nothing on the hot path)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pgleap.proxy.server import Proxy


class ProxyCollector(Collector):
    """Reports connections, queries, transactions, bytes, errors and query latency per database."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        proxy = self.proxy
        sessions = list(proxy.sessions.values())
        clients = GaugeMetricFamily("pgleap_client_connections", "Client connections open", labels=["database"])
        servers = GaugeMetricFamily("pgleap_server_connections", "Server connections open", labels=["database", "role"])
        families = {
            "queries": CounterMetricFamily(
                "pgleap_queries", "Requests answered (simple queries, syncs, function calls)", labels=["database"]
            ),
            "transactions": CounterMetricFamily("pgleap_transactions", "Transactions completed", labels=["database"]),
            "errors": CounterMetricFamily(
                "pgleap_server_errors", "ErrorResponses sent by servers", labels=["database"]
            ),
            "client_errors": CounterMetricFamily(
                "pgleap_client_errors", "Client connections refused or closed with an error", labels=["database"]
            ),
            "bytes_in": CounterMetricFamily(
                "pgleap_received_bytes", "Bytes received from clients", labels=["database"]
            ),
            "bytes_out": CounterMetricFamily("pgleap_sent_bytes", "Bytes sent to clients", labels=["database"]),
        }
        latency = HistogramMetricFamily(
            "pgleap_query_duration_seconds", "Request latency seen by pgleap", labels=["database"]
        )
        for name, db in sorted(proxy.databases.items()):
            stats = db.stats
            mine = [s for s in sessions if s.database is db]
            clients.add_metric([name], len(mine))
            live = [s for s in mine if s.forwarder is not None and not s.forwarder.closed.done()]
            for role in ("source", "target"):
                servers.add_metric([name, role], sum(1 for s in live if s.server_role == role))
            for attr, family in families.items():
                family.add_metric([name], getattr(stats, attr))
            latency.add_metric([name], stats.latency.cumulative(), stats.latency.total)
        yield clients
        yield servers
        yield from families.values()
        yield latency
        yield from self._copy_gauges()
        yield from self._capture_metrics()
        yield from self._replay_metrics()
        yield from self._bypass_metrics()
        yield from self._validation_metrics()
        yield GaugeMetricFamily("pgleap_paused", "1 while PAUSE holds new transactions", value=int(proxy.gate.paused))

    def _capture_metrics(self) -> Iterator[Metric]:
        captured = CounterMetricFamily(
            "pgleap_capture_transactions",
            "Committed write transactions appended to the change log",
            labels=["database"],
        )
        failures = CounterMetricFamily(
            "pgleap_capture_log_failures", "Committed transactions the change log could not take", labels=["database"]
        )
        healthy = GaugeMetricFamily(
            "pgleap_changelog_healthy", "0 after a change log write failed", labels=["database"]
        )
        hold = HistogramMetricFamily(
            "pgleap_capture_commit_hold_seconds",
            "How long a COMMIT waited for its change-log record to become durable before going to the server",
            labels=["database"],
        )
        for name, db in sorted(self.proxy.databases.items()):
            capture = db.capture
            if capture is None:
                continue
            captured.add_metric([name], capture.transactions)
            failures.add_metric([name], capture.log_failures)
            healthy.add_metric([name], 1.0 if capture.changelog.healthy else 0.0)
            hold.add_metric([name], capture.commit_hold.cumulative(), capture.commit_hold.total)
        yield from (captured, failures, healthy, hold)

    def _replay_metrics(self) -> Iterator[Metric]:
        # The replay service samples in the proxy's loop; this thread only reads the latest sample.
        service = self.proxy.replay
        if service is None:
            return
        labels = ["database"]
        gauges = {
            "running": GaugeMetricFamily("pgleap_replay_running", "1 while replay applies the log", labels=labels),
            "transactions": GaugeMetricFamily(
                "pgleap_replay_lag_transactions",
                "Transactions in the log not yet applied (committed, or their COMMIT in flight)",
                labels=labels,
            ),
            "bytes": GaugeMetricFamily(
                "pgleap_replay_lag_bytes", "Size in the log of the transactions not yet applied", labels=labels
            ),
            "seconds": GaugeMetricFamily(
                "pgleap_replay_lag_seconds", "Age of the oldest transaction not yet applied", labels=labels
            ),
            "position": GaugeMetricFamily(
                "pgleap_replay_applied_position", "Log position applied on the target", labels=labels
            ),
        }
        applied = CounterMetricFamily(
            "pgleap_replay_applied", "Source transactions applied on the target", labels=labels
        )
        divergences = CounterMetricFamily(
            "pgleap_replay_divergences", "Replayed statements whose row count differed from the source", labels=labels
        )
        errors = CounterMetricFamily(
            "pgleap_replay_apply_errors", "Transactions the target refused (paused or skipped)", labels=labels
        )
        for report in service.sampled():
            name = [report.database]
            gauges["running"].add_metric(name, int(report.running))
            if report.lag.position_known:  # else absent: replay has not reached the target yet
                gauges["transactions"].add_metric(name, report.lag.transactions)
                gauges["bytes"].add_metric(name, report.lag.bytes)
                gauges["seconds"].add_metric(name, report.lag.seconds)
                gauges["position"].add_metric(name, report.status.applied_position)
            applied.add_metric(name, report.applied_total)
            divergences.add_metric(name, report.divergences_total)
            errors.add_metric(name, report.apply_errors)
        yield from gauges.values()
        yield from (applied, divergences, errors)

    def _bypass_metrics(self) -> Iterator[Metric]:
        writers = GaugeMetricFamily(
            "pgleap_bypass_writers",
            "Distinct sessions seen writing on the source without going through pgleap",
            labels=["database"],
        )
        for name, monitor in sorted(self.proxy.bypass_monitors.items()):
            writers.add_metric([name], len(monitor.writers))
        yield writers

    def _validation_metrics(self) -> Iterator[Metric]:
        # The validator's counters are read under its lock; nothing here touches a Replayer.
        validator = getattr(self.proxy, "validator", None)
        if validator is None:
            return
        labels = ["database"]
        counters = {
            "total": CounterMetricFamily(
                "pgleap_validation_compared", "Sampled reads compared on the target to a conclusion", labels=labels
            ),
            "matching": CounterMetricFamily(
                "pgleap_validation_matching", "Compared reads whose results matched", labels=labels
            ),
            "data_mismatches": CounterMetricFamily(
                "pgleap_validation_data_mismatches", "Compared reads whose results differed", labels=labels
            ),
            "syntax_errors": CounterMetricFamily(
                "pgleap_validation_syntax_errors", "Sampled reads the target's grammar rejected", labels=labels
            ),
            "timeouts": CounterMetricFamily(
                "pgleap_validation_timeouts", "Sampled reads that timed out on the target", labels=labels
            ),
            "target_errors": CounterMetricFamily(
                "pgleap_validation_target_errors", "Sampled reads the target failed otherwise", labels=labels
            ),
            "inconclusive": CounterMetricFamily(
                "pgleap_validation_inconclusive",
                "Differences seen while in-flight transactions wrote the tables read (not counted as mismatches)",
                labels=labels,
            ),
            "dropped": CounterMetricFamily(
                "pgleap_validation_dropped", "Samples dropped because comparison fell behind", labels=labels
            ),
            "overturned": CounterMetricFamily(
                "pgleap_validation_overturned",
                "First comparisons that differed but matched when re-run at one source snapshot",
                labels=labels,
            ),
        }
        features = CounterMetricFamily(
            "pgleap_validation_incompatibilities",
            "Sampled reads the target refused for a missing feature, by SQLSTATE condition",
            labels=["database", "feature"],
        )
        skipped = CounterMetricFamily(
            "pgleap_validation_skipped", "Sampled reads not compared, by reason", labels=["database", "reason"]
        )
        rate = GaugeMetricFamily(
            "pgleap_validation_error_rate", "Failed comparisons / compared over the sliding window", labels=labels
        )
        latency = HistogramMetricFamily(
            "pgleap_validation_query_duration_seconds",
            "Latency of the compared reads on the source and on the target",
            labels=["database", "role"],
        )
        for name in validator.databases():
            m = validator.metrics(name)
            for attr, family in counters.items():
                family.add_metric([name], getattr(m, attr))
            for feature, count in sorted(m.feature_incompatibilities.items()):
                features.add_metric([name, feature], count)
            for reason, count in sorted(m.skipped.items()):
                skipped.add_metric([name, reason], count)
            rate.add_metric([name], m.error_rate_window)
            source_buckets, source_sum, target_buckets, target_sum = validator.latency(name)
            latency.add_metric([name, "source"], source_buckets, source_sum)
            latency.add_metric([name, "target"], target_buckets, target_sum)
        yield from counters.values()
        yield from (features, skipped, rate, latency)

    def _copy_gauges(self) -> Iterator[Metric]:
        from pgleap.upgrade.copy.progress import copy_gauges

        store = self.proxy.state_store()
        if store is None:
            return
        families: dict[str, GaugeMetricFamily] = {}
        for database in sorted(self.proxy.databases):
            for name, value in copy_gauges(store, database).items():
                family = families.setdefault(
                    name, GaugeMetricFamily(name, _COPY_HELP.get(name, name), labels=["database"])
                )
                family.add_metric([database], value)
        yield from families.values()


class MetricsServer:
    """The /metrics HTTP endpoint, served from a background thread."""

    def __init__(self, proxy: Proxy, addr: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ProxyCollector(proxy))
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port: int = self._server.server_port

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


_COPY_HELP = {
    "pgleap_copy_tables_total": "Tables the bulk copy has to copy",
    "pgleap_copy_tables_done": "Tables copied completely",
    "pgleap_copy_rows": "Rows copied so far",
    "pgleap_copy_bytes": "Bytes copied so far",
    "pgleap_copy_estimated_bytes": "Estimated bytes to copy in total",
    "pgleap_copy_rate_bytes_per_second": "Current copy rate",
    "pgleap_copy_eta_seconds": "Estimated seconds until the data copy ends (-1: unknown)",
    "pgleap_copy_running": "1 while a copy run is in progress",
    "pgleap_copy_schema_errors": "Objects the target rejected during the schema copy",
}


def start_metrics_server(proxy: Proxy, addr: str, port: int) -> MetricsServer:
    """Serve /metrics on addr:port (0: a free port) until `stop()`."""
    return MetricsServer(proxy, addr, port)
