"""Prometheus exposition of the proxy's counters."""

from pgleap.metrics.exporter import ProxyCollector, start_metrics_server

__all__ = ["ProxyCollector", "start_metrics_server"]
