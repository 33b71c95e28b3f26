"""Running a proxy in a background thread, for the demo, the benches and the tests."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from pgleap.config import Config, ServerConfig, load_config
from pgleap.lab.ports import free_port
from pgleap.proxy.server import Proxy

T = TypeVar("T")


def render_config(
    sources: dict[str, Any],
    *,
    users: dict[str, tuple[str, str]] | None = None,
    admin: tuple[str, str] = ("pgleap_admin", "admin-secret"),
    extra: str = "",
    targets: dict[str, Any] | None = None,
    upgrade_extra: str = "",
) -> str:
    """TOML for a proxy on a free port in front of `sources`: {database: a LabServer (superuser) or ServerConfig}.

    `upgrade_extra` is appended to every [[auto_upgrade]] entry (its [auto_upgrade.validation] tables, ...).
    """
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
        user = server.user if isinstance(server, ServerConfig) else server.superuser
        lines += [
            "[[auto_upgrade]]",
            f'database = "{database}"',
            f'source_host = "{server.host}"',
            f"source_port = {server.port}",
            f'source_database = "{getattr(server, "database", "postgres")}"',
            f'source_user = "{user}"',
            f'source_password = "{server.password}"',
        ]
        target = (targets or {}).get(database)
        if target is not None:
            target_user = target.user if isinstance(target, ServerConfig) else target.superuser
            lines += [
                f'target_host = "{target.host}"',
                f"target_port = {target.port}",
                f'target_user = "{target_user}"',
                f'target_password = "{target.password}"',
            ]
            if isinstance(target, ServerConfig):
                lines.append(f'target_database = "{target.database}"')
        if upgrade_extra:
            lines.append(upgrade_extra)
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


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


class ProxyProcess:
    """`pgleap run -c FILE` in a subprocess on free ports, its output in a log file."""

    def __init__(
        self,
        workdir: Path,
        sources: dict[str, Any],
        *,
        extra: str = "",
        metrics: bool = False,
        targets: dict[str, Any] | None = None,
        upgrade_extra: str = "",
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port() if metrics else 0
        if metrics:
            extra = f"{extra}\nmetrics_port = {self.metrics_port}"
        self.config = workdir / "pgleap.toml"
        text = render_config(sources, extra=extra, targets=targets, upgrade_extra=upgrade_extra)
        text = text.replace("listen_port = 0", f"listen_port = {self.port}")
        self.config.write_text(text)
        self.log = workdir / "pgleap.log"
        executable = Path(sys.executable).with_name("pgleap")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(executable), "run", "-c", str(self.config)], stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        """Everything the process logged so far."""
        return self.log.read_text(errors="replace")

    def wait_accepting(self, timeout: float = 60) -> None:
        """Wait until the proxy (and its metrics endpoint, if any) accept connections."""
        deadline = time.monotonic() + timeout
        while not (accepts(self.port) and (not self.metrics_port or accepts(self.metrics_port))):
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgleap exited {self.proc.returncode} before listening:\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"pgleap did not listen on {self.port} within {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def dsn(self, database: str = "app", user: str = "app", password: str = "app-secret") -> str:
        """A libpq conninfo for a client of this proxy."""
        return f"host=127.0.0.1 port={self.port} dbname={database} user={user} password={password} connect_timeout=10"

    def wait_exit(self, timeout: float) -> int:
        """The exit code, once the process has exited within `timeout` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"pgleap still running {timeout}s later:\n{self.output()}") from None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """Make sure the process is gone: SIGTERM, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
