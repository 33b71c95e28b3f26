"""Running a proxy in a background thread, for the demo, the benches and the tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from pgleap.config import Config, load_config
from pgleap.proxy.server import Proxy

T = TypeVar("T")


def render_config(
    sources: dict[str, Any],
    *,
    users: dict[str, tuple[str, str]] | None = None,
    admin: tuple[str, str] = ("pgleap_admin", "admin-secret"),
    extra: str = "",
    targets: dict[str, Any] | None = None,
) -> str:
    """TOML for a proxy on a free port in front of `sources` ({database: server with host/port/superuser/password})."""
    lines = [
        "[pgleap]",
        'listen_addr = "127.0.0.1"',
        "listen_port = 0",
        f'admin_user = "{admin[0]}"',
        f'admin_password = "{admin[1]}"',
        extra,
    ]
    for name, (password, method) in (users or {"app": ("app-secret", "scram-sha-256")}).items():
        lines += ["[[users]]", f'name = "{name}"', f'password = "{password}"', f'auth_method = "{method}"']
    for database, server in sources.items():
        lines += [
            "[[auto_upgrade]]",
            f'database = "{database}"',
            f'source_host = "{server.host}"',
            f"source_port = {server.port}",
            f'source_database = "{getattr(server, "database", "postgres")}"',
            f'source_user = "{server.superuser}"',
            f'source_password = "{server.password}"',
        ]
        target = (targets or {}).get(database)
        if target is not None:
            lines += [
                f'target_host = "{target.host}"',
                f"target_port = {target.port}",
                f'target_user = "{target.superuser}"',
                f'target_password = "{target.password}"',
            ]
    return "\n".join(lines) + "\n"


class ProxyThread:
    """A pgleap proxy on its own uvloop in a daemon thread."""

    def __init__(self, config: Config | Path) -> None:
        self.config = load_config(config) if isinstance(config, Path) else config
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pgleap-proxy", daemon=True)
        self.proxy: Proxy | None = None

    def start(self) -> ProxyThread:
        """Start the loop and the listener."""
        self._thread.start()

        async def create() -> Proxy:
            proxy = Proxy(self.config)
            await proxy.start()
            return proxy

        self.proxy = self.call(create())
        return self

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        assert self.proxy is not None
        return self.proxy.port

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the proxy's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def dsn(self, database: str = "app", user: str = "app", password: str = "app-secret", **extra: str) -> str:
        """A libpq keyword conninfo for a client of this proxy."""
        params = {"host": "127.0.0.1", "port": str(self.port), "dbname": database, "user": user, "password": password}
        params.update(extra)
        return " ".join(f"{k}={v}" for k, v in params.items())

    def stop(self) -> None:
        """Shut the proxy down and stop the loop."""
        if self.proxy is not None and self._thread.is_alive():
            try:
                self.call(self.proxy.shutdown(), timeout=self.config.proxy.shutdown_timeout + 30)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
