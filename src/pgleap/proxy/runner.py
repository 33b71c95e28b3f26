"""Running a proxy until told to stop: signals, the metrics endpoint, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable

from pgleap.config import Config
from pgleap.metrics import start_metrics_server
from pgleap.proxy.server import Proxy

log = logging.getLogger(__name__)


async def serve(config: Config, install_signals: Iterable[signal.Signals] = ()) -> None:
    """Start a proxy for `config` and run it until SHUTDOWN or a signal."""
    proxy = Proxy(config)
    await proxy.start()
    metrics = None
    if config.proxy.metrics_port:
        metrics = start_metrics_server(proxy, config.proxy.metrics_addr, config.proxy.metrics_port)
        log.info("metrics on http://%s:%s/metrics", config.proxy.metrics_addr, metrics.port)
    loop = asyncio.get_running_loop()
    for sig in install_signals:
        loop.add_signal_handler(sig, _on_signal, sig, proxy)
    try:
        await proxy.wait_stopped()
    finally:
        if metrics is not None:
            metrics.stop()


def _on_signal(sig: signal.Signals, proxy: Proxy) -> None:
    log.info("received %s, shutting down gracefully", sig.name)
    proxy.spawn(proxy.shutdown())
