"""Prometheus exposition of the proxy's counters."""

from pgleap.metrics.exporter import MetricsServer, ProxyCollector, start_metrics_server

__all__ = ["MetricsServer", "ProxyCollector", "start_metrics_server"]
