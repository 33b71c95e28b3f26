"""Copy progress as the proxy shows it: SHOW UPGRADE TABLES in the console and the copy gauges in /metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from pgleap.config import ServerConfig, UpgradeConfig
from pgleap.lab import Lab, LabServer
from pgleap.metrics import ProxyCollector
from pgleap.store import StateStore
from pgleap.testing import ProxyThread, render_config
from pgleap.upgrade.copy import CopyJob, CopyOptions

pytestmark = pytest.mark.integration


def _server(server: LabServer, database: str) -> ServerConfig:
    return ServerConfig(server.host, server.port, database, server.superuser, server.password)


def test_copy_progress_in_console_and_metrics(tmp_path: Path, lab: Lab, pg_old: LabServer) -> None:
    """After a copy, the console lists every table as done with its rows, and the gauges agree."""
    pg_old.psql("drop database if exists status_src")
    pg_old.psql("create database status_src")
    pg_old.psql(
        "create table accounts(id int primary key, v text); "
        "insert into accounts select i, 'v' || i from generate_series(1, 1000) i; "
        "create table notes(n text); insert into notes select 'n' from generate_series(1, 10)",
        dbname="status_src",
    )
    target = lab.target(18)
    state = tmp_path / "state.db"
    upgrade = UpgradeConfig(
        database="status", source=_server(pg_old, "status_src"), target=_server(target, "status_src")
    )
    store = StateStore(state)
    try:
        asyncio.run(CopyJob(upgrade, store, CopyOptions(parallel_workers=2, copy_roles=False)).run())
    finally:
        store.close()

    config_path = tmp_path / "pgleap.toml"
    config_path.write_text(render_config({"status": upgrade.source}, extra=f'state_path = "{state}"'))
    with ProxyThread(config_path) as proxy:
        dsn = proxy.dsn(database="pgleap", user="pgleap_admin", password="admin-secret")
        with psycopg.connect(dsn, autocommit=True) as admin:
            cursor = admin.execute("SHOW UPGRADE TABLES")
            columns = [c.name for c in cursor.description or []]
            rows = {r[columns.index("table")]: dict(zip(columns, r, strict=True)) for r in cursor.fetchall()}
        assert set(rows) == {"public.accounts", "public.notes"}, rows
        assert rows["public.accounts"]["status"] == "done" and rows["public.accounts"]["rows"] == "1000"
        assert rows["public.accounts"]["database"] == "status"
        assert "no_pk" in rows["public.notes"]["flags"]  # copied, flagged for verification
        assert proxy.proxy is not None
        gauges = {
            (m.name, s.labels.get("database")): s.value
            for m in ProxyCollector(proxy.proxy).collect()
            for s in m.samples
            if m.name.startswith("pgleap_copy_")
        }
    assert gauges[("pgleap_copy_tables_total", "status")] == 2
    assert gauges[("pgleap_copy_tables_done", "status")] == 2
    assert gauges[("pgleap_copy_rows", "status")] == 1010
    assert gauges[("pgleap_copy_running", "status")] == 0
