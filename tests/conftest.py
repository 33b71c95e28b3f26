"""Fixtures: real PostgreSQL servers from the lab, and pgleap proxies in front of them."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from pgleap.config import ServerConfig, UpgradeConfig
from pgleap.lab import Lab, LabServer, client_tool
from pgleap.proxy.server import Proxy
from pgleap.store import SQLiteChangeLog, StateStore
from pgleap.store.changelog import ChangeLog
from pgleap.testing import ProxyProcess, ProxyThread, render_config
from pgleap.upgrade.capture.capture import Capture
from pgleap.upgrade.capture.catalog import SourceCatalog

# The old major every test can get from the registries (9.x binaries cannot be had here) and the newest.
OLD_MAJOR = 10
NEW_MAJOR = 18


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """One lab per test run; every server it starts is stopped at the end."""
    with Lab() as lab:
        yield lab


@pytest.fixture(scope="session")
def pg_old(lab: Lab) -> LabServer:
    """A PG 10 server that, like 9.x servers, only offers md5 to pgleap."""
    return lab.primary(OLD_MAJOR, auth="md5")


@pytest.fixture(scope="session")
def pg_new(lab: Lab) -> LabServer:
    """A PG 18 server offering SCRAM-SHA-256."""
    return lab.primary(NEW_MAJOR, auth="scram-sha-256")


@pytest.fixture(params=["pg_old", "pg_new"], ids=[f"pg{OLD_MAJOR}", f"pg{NEW_MAJOR}"])
def backend(request: pytest.FixtureRequest) -> LabServer:
    """Each test using this runs once against the old and once against the new major."""
    server: LabServer = request.getfixturevalue(request.param)
    return server


def start_proxy(tmp_path: Path, sources: dict[str, LabServer], **kwargs: object) -> ProxyThread:
    """Write a config for `sources` into tmp_path and start a proxy on a free port."""
    path = tmp_path / "pgleap.toml"
    path.write_text(render_config(sources, **kwargs))  # type: ignore[arg-type]
    return ProxyThread(path).start()


def capture_into(
    proxy: ProxyThread, changelog: ChangeLog, database: str = "app", *, row_images: bool = True
) -> Capture:
    """Turn capture on for `database` of an in-process proxy, into `changelog` (from each session's next boundary).

    With `row_images`, the source catalog is loaded first, as START CAPTURE does.
    """
    capture = Capture(database, changelog)

    async def enable() -> None:
        assert proxy.proxy is not None
        db = proxy.proxy.databases[database]
        if row_images:
            capture.catalog = SourceCatalog(db.upgrade.database, db.upgrade.source)
            assert await capture.catalog.load_once(), f"source catalog: {capture.catalog.last_error}"
            capture.catalog.start()
        db.capture = capture

    proxy.call(enable())
    return capture


@pytest.fixture
def proxy(tmp_path: Path, backend: LabServer) -> Iterator[ProxyThread]:
    """pgleap in front of `backend`, database "app"; stopped after the test."""
    p = start_proxy(tmp_path, {"app": backend})
    yield p
    p.stop()


def server_config(server: LabServer, database: str = "app") -> ServerConfig:
    """A lab server's superuser on `database`."""
    return ServerConfig(server.host, server.port, database, server.superuser, server.password)


class ReconnectingWriters:
    """Client threads that write through pgleap until stopped, reconnecting to `dsn` (which may change) when
    pgleap goes away; `one(conn, worker, i)` is one unit of work and returns whether it committed."""

    def __init__(self, dsn: str, workers: int, one: Callable[[psycopg.Connection[Any], int, int], bool]) -> None:
        self.dsn = dsn
        self.one = one
        self.stop = threading.Event()
        self.committed = 0
        self.reconnects = 0
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(w,)) for w in range(1, workers + 1)]

    def start(self) -> None:
        """Start every writer."""
        for t in self._threads:
            t.start()

    def join(self) -> None:
        """Stop the writers and wait for them."""
        self.stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self, worker: int) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.dsn, connect_timeout=5) as conn:
                    while not self.stop.is_set():
                        i += 1
                        if self.one(conn, worker, i):
                            self.committed += 1
            except psycopg.OperationalError:
                self.reconnects += 1  # pgleap died: connect again, to wherever self.dsn points now
                time.sleep(0.2)
            except BaseException as exc:
                self.errors.append(exc)
                return


@dataclass
class CapturingPair:
    """A source database behind a capturing in-process proxy (database "app"), and the same schema on a target."""

    source: LabServer
    target: LabServer
    dbname: str
    proxy: ProxyThread
    capture: Capture
    changelog: SQLiteChangeLog

    @property
    def upgrade(self) -> UpgradeConfig:
        """The upgrade config replay reads."""
        return UpgradeConfig(
            database="app",
            source=server_config(self.source, self.dbname),
            target=server_config(self.target, self.dbname),
        )

    def drain(self) -> None:
        """Wait until everything captured is in the log."""
        self.proxy.call(self.capture.drain())


Pair = TypeVar("Pair", bound=CapturingPair)


def capturing_pair(
    tmp_path: Path, source: LabServer, target: LabServer, schema: str, prefix: str, kind: type[Pair]
) -> Iterator[Pair]:
    """`schema` in a fresh database on both servers, the source's behind a capturing proxy; all removed after."""
    dbname = f"{prefix}_{uuid.uuid4().hex[:10]}"
    for server in (source, target):
        server.psql(f"CREATE DATABASE {dbname}")
        server.psql(schema, dbname=dbname)
    proxy = start_proxy(tmp_path, {"app": server_config(source, dbname)})  # type: ignore[dict-item]
    changelog = SQLiteChangeLog(tmp_path / "changes.db")
    capture = capture_into(proxy, changelog)
    try:
        yield kind(source, target, dbname, proxy, capture, changelog)
    finally:
        proxy.stop()
        changelog.close()
        if not target.is_running():  # a test may have stopped it
            target.start()
        source.psql(f"DROP DATABASE IF EXISTS {dbname}")
        target.psql(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


@pytest.fixture
def target(lab: Lab) -> Iterator[LabServer]:
    """A fresh PG 18 target for one test (an upgrade's copy creates its database and schema)."""
    server = lab.target(18)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def target18(lab: Lab) -> Iterator[LabServer]:
    """A PG 18 target for one test module (each test uses its own database)."""
    server = lab.target(18)
    yield server
    server.stop()


async def quiesce(proxy: Proxy) -> None:
    """Stop upgrades, replay, capture and the bypass monitors, so no engine task outlives the proxy's loop."""
    await proxy.stop_upgrades()
    await proxy.stop_replay()
    await proxy.stop_capture()
    for monitor in proxy.bypass_monitors.values():
        monitor.stop()
        await monitor.wait_stopped()


def record_copy_snapshot(path: Path, snapshot: str) -> None:
    """What `pgleap copy` leaves in the state store: a finished run of database "app" at S."""
    store = StateStore(path)
    try:
        store.start_run("app", "primary")
        store.set_snapshot("app", snapshot, None, None)
        store.finish_run("app")
    finally:
        store.close()


def pgbench_database(server: LabServer, prefix: str, scale: int = 1, schema: str = "") -> Iterator[str]:
    """A fresh database with pgbench's tables at `scale` (and `schema` after them); dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    server.psql(f"CREATE DATABASE {name}")
    try:
        argv = [tool("pgbench"), "-i", "-s", str(scale), "-q", server.dsn(name)]
        subprocess.run(argv, check=True, capture_output=True, timeout=300)
        if schema:
            server.psql(schema, dbname=name)
        yield name
    finally:
        server.psql(f"DROP DATABASE IF EXISTS {name}")


def console(proxy: ProxyThread | ProxyProcess) -> psycopg.Connection[Any]:
    """An autocommit connection to the proxy's admin console (nothing prepared: each command runs as sent)."""
    return psycopg.connect(proxy.dsn("pgleap", "pgleap_admin", "admin-secret"), autocommit=True, prepare_threshold=None)


def show(conn: psycopg.Connection[Any], command: str) -> list[dict[str, Any]]:
    """Run an admin command and return its rows as dicts keyed by column name."""
    cur = conn.execute(command)
    assert cur.description is not None, f"{command} returned no columns"
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll `predicate` until it returns something truthy, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return value


def tool(name: str) -> str:
    """Path of a PostgreSQL client program; fails the test with how to get it."""
    try:
        return str(client_tool(name))
    except Exception as exc:  # MissingBinaryError carries the advice
        found = shutil.which(name)
        if found:
            return found
        pytest.fail(f"{name} not found ({exc}); run scripts/setup")


def run_tool(
    argv: list[str], timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a client program, failing the test with its output if it fails."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def older_sqlite_file(path: Path, script: str) -> Path:
    """A SQLite file made by `script`, as an older pgleap left it (for the migrations' tests)."""
    db = sqlite3.connect(path)
    try:
        db.executescript(script)
    finally:
        db.close()
    return path
