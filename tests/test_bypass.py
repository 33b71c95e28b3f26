"""Writes that bypass pgleap: a session writing straight to the source (PG 10 and 18) is reported; pgleap's are not."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgleap.config import ServerConfig
from pgleap.lab import LabServer
from pgleap.metrics import ProxyCollector
from pgleap.testing import ProxyThread

from conftest import show, start_proxy, wait_for

pytestmark = pytest.mark.integration

WARNING_TEXT = "writes to the source without going through pgleap"


@pytest.fixture
def source_db(backend: LabServer) -> Iterator[str]:
    """A fresh database on the source server, so that no other test's writers are in view."""
    dbname = f"bp_{uuid.uuid4().hex[:10]}"
    backend.psql(f"CREATE DATABASE {dbname}")
    backend.psql("CREATE TABLE t (id int PRIMARY KEY)", dbname=dbname)
    yield dbname
    backend.psql(f"DROP DATABASE IF EXISTS {dbname}")


@pytest.fixture
def proxy(tmp_path: Path, backend: LabServer, source_db: str) -> Iterator[ProxyThread]:
    """A proxy for the database, looking for bypassing writers every 100 ms."""
    source = ServerConfig(backend.host, backend.port, source_db, backend.superuser, backend.password)
    p = start_proxy(tmp_path, {"app": source}, extra='bypass_check_interval = "100ms"')  # type: ignore[dict-item]
    try:
        yield p
    finally:
        if p.proxy is not None and "app" in p.proxy.bypass_monitors:
            p.call(_stop_monitor(p))
        p.stop()


def direct(server: LabServer, dbname: str, **extra: str) -> psycopg.Connection[Any]:
    """A session straight to the source, not through pgleap (transactions open on the first statement)."""
    conninfo = make_conninfo(
        host=server.host, port=server.port, dbname=dbname, user=server.superuser, password=server.password, **extra
    )
    return psycopg.connect(conninfo)


def test_direct_writer_is_a_risk_and_pgleap_sessions_are_not(
    proxy: ProxyThread, backend: LabServer, source_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgleap.upgrade.capture.bypass")
    assert proxy.proxy is not None
    admin_dsn = proxy.dsn("pgleap", "pgleap_admin", "admin-secret")

    async def start_monitor() -> None:
        assert proxy.proxy is not None
        proxy.proxy.start_bypass_monitor("app")
        proxy.proxy.start_bypass_monitor("app")  # a second start (capture restarted) keeps the one monitor

    with (
        psycopg.connect(admin_dsn, autocommit=True, prepare_threshold=None) as admin,  # simple queries only
        psycopg.connect(proxy.dsn()) as through,
        direct(backend, source_db) as reader,
        direct(backend, source_db, application_name="nightly_job") as writer,
    ):
        admin.execute("START CAPTURE")
        proxy.call(start_monitor())
        # Open transactions, all at once: one writing through pgleap, one only reading, one writing directly.
        through.execute("INSERT INTO t VALUES (1)")
        through_pid = through.execute("SELECT pg_backend_pid()").fetchone()
        reader.execute("SELECT count(*) FROM t")
        writer.execute("INSERT INTO t VALUES (2)")
        (port,) = writer.execute("SELECT inet_client_port()").fetchone() or (None,)

        # Seen on three polls while all three were open: the pgleap session had every chance to be listed.
        rows = wait_for(
            lambda: [r for r in show(admin, "SHOW UPGRADE RISKS") if int(r["times_seen"]) >= 3],
            "the direct writer to be seen three times",
        )
        (row,) = show(admin, "SHOW UPGRADE RISKS")
        assert row == rows[0]
        assert (row["database"], row["risk"], row["client_addr"], row["client_port"]) == (
            "app",
            "bypass_writer",
            "127.0.0.1",
            str(port),
        )
        assert row["application_name"] == "nightly_job" and row["user"] == backend.superuser
        assert row["pid"] == str(writer.info.backend_pid) and row["writing_now"] == "t"
        assert through_pid is not None and row["pid"] != str(through_pid[0])

        (capture,) = show(admin, "SHOW CAPTURE")
        assert capture["bypass_writers"] == "1" and capture["bypass_addresses"] == f"127.0.0.1:{port}"
        samples = {
            (s.name, s.labels.get("database")): s.value
            for m in ProxyCollector(proxy.proxy).collect()
            for s in m.samples
        }
        assert samples[("pgleap_bypass_writers", "app")] == 1
        warnings = [r for r in caplog.records if WARNING_TEXT in r.getMessage()]
        assert len(warnings) == 1 and f"127.0.0.1:{port}" in warnings[0].getMessage()

        # Once it commits it is no longer writing, but stays listed: its writes never reached the log.
        writer.commit()
        wait_for(lambda: show(admin, "SHOW UPGRADE RISKS")[0]["writing_now"] == "f", "the writer to finish")
        through.commit()
        reader.rollback()

        monitor = proxy.proxy.bypass_monitors["app"]
        proxy.call(_stop_monitor(proxy))
        assert not monitor.running
        assert len(show(admin, "SHOW UPGRADE RISKS")) == 1


async def _stop_monitor(proxy: ProxyThread) -> None:
    assert proxy.proxy is not None
    proxy.proxy.stop_bypass_monitor("app")
    await proxy.proxy.bypass_monitors["app"].wait_stopped()
