"""Replay inside the proxy: START REPLAY over the admin console applies what capture logs (PG 10 -> PG 18).

The copy is stood in for by hand: one row written through the capturing proxy before S is put on the
target directly, and S is recorded in the state store the way `pgleap copy` records it.
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgleap.config import ServerConfig
from pgleap.lab import LabServer
from pgleap.lab.ports import free_port
from pgleap.metrics import start_metrics_server
from pgleap.store import ChunkRecord, StateStore
from pgleap.testing import ProxyThread
from pgleap.upgrade.replay import ReplayError
from pgleap.upgrade.replay.service import copy_start_point

from conftest import console, quiesce, record_copy_snapshot, show, start_proxy, wait_for

pytestmark = pytest.mark.integration

SCHEMA = "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL, qty int NOT NULL DEFAULT 0)"


@dataclass
class Env:
    """A PG 10 source database behind an in-process proxy whose upgrade targets the same database on PG 18."""

    source: LabServer
    target: LabServer
    dbname: str
    proxy: ProxyThread
    state_path: Path

    def admin(self) -> psycopg.Connection[Any]:
        """An autocommit connection to the admin console."""
        return console(self.proxy)

    def rows(self, server: LabServer) -> str:
        """Every row of items, in key order, as psql prints them."""
        return server.psql("SELECT id, note, qty FROM items ORDER BY id", dbname=self.dbname)

    def drain(self) -> None:
        """Wait until everything captured is in the change log."""
        assert self.proxy.proxy is not None
        capture = self.proxy.proxy.databases["app"].capture
        assert capture is not None
        self.proxy.call(capture.drain())


@pytest.fixture
def env(tmp_path: Path, pg_old: LabServer, pg_new: LabServer) -> Iterator[Env]:
    """The same empty schema on both servers; the proxy is configured with the PG 18 server as target."""
    dbname = f"rs_{uuid.uuid4().hex[:10]}"
    for server in (pg_old, pg_new):
        server.psql(f"CREATE DATABASE {dbname}")
        server.psql(SCHEMA, dbname=dbname)
    source = ServerConfig(pg_old.host, pg_old.port, dbname, pg_old.superuser, pg_old.password)
    proxy = start_proxy(tmp_path, {"app": source}, targets={"app": pg_new})  # type: ignore[dict-item]
    try:
        yield Env(pg_old, pg_new, dbname, proxy, tmp_path / "pgleap-state.db")
    finally:
        if proxy.proxy is not None:
            proxy.call(quiesce(proxy.proxy))
        proxy.stop()
        pg_old.psql(f"DROP DATABASE IF EXISTS {dbname}")
        pg_new.psql(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def scrape(port: int) -> dict[str, float]:
    """The samples labelled database="app", by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels == {"database": "app"}
    }


def caught_up(admin: psycopg.Connection[Any], position: int) -> dict[str, Any] | None:
    """SHOW REPLAY's row once replay has applied up to `position` with no lag."""
    (row,) = show(admin, "SHOW REPLAY")
    done = row["lag_transactions"] == "0" and row["applied_position"] == row["last_position"] == str(position)
    return row if done else None


def test_start_replay_over_the_console_follows_the_log(env: Env) -> None:
    """Refused without a log or S; then applies every write after S, shows lag 0, stops and resumes exactly."""
    assert env.proxy.proxy is not None
    metrics = start_metrics_server(env.proxy.proxy, "127.0.0.1", 0)
    try:
        with env.admin() as admin, psycopg.connect(env.proxy.dsn(), autocommit=True) as app:
            (row,) = show(admin, "SHOW REPLAY")
            assert row["running"] == "f" and row["applied_position"] is None
            with pytest.raises(psycopg.Error, match="START CAPTURE first"):
                admin.execute("START REPLAY")
            admin.execute("START CAPTURE")
            with pytest.raises(psycopg.Error, match="run `pgleap copy` first"):
                admin.execute("START REPLAY")

            # Captured before S, and "copied": replay must skip it, not apply it a second time.
            app.execute("INSERT INTO items (id, note) VALUES (0, 'copied')")
            env.target.psql("INSERT INTO items (id, note) VALUES (0, 'copied')", dbname=env.dbname)
            snapshot = env.source.psql("SELECT txid_current_snapshot()", dbname=env.dbname)
            record_copy_snapshot(env.state_path, snapshot)

            notes = [r[0] for r in admin.execute("START REPLAY").fetchall()]
            assert len(notes) == 1 and "replaying to" in notes[0] and notes[0].endswith("from S of copy run 1")
            for i in range(1, 21):
                app.execute("INSERT INTO items (id, note) VALUES (%s, %s)", (i, f"row {i}"))
                if i % 2 == 0:
                    with app.transaction():
                        app.execute("UPDATE items SET qty = qty + %s WHERE id = %s", (i, i - 1))
                        app.execute("UPDATE items SET note = note || ' +' WHERE id = 0")
            last = 1 + 20 + 10
            row = wait_for(lambda: caught_up(admin, last), "replay to catch up", timeout=60)
            assert row["running"] == "t" and row["connected"] == "t"
            assert (row["applied"], row["skipped_in_snapshot"], row["skipped_on_error"]) == ("30", "1", "0")
            assert row["lag_bytes"] == "0" and float(row["lag_seconds"]) == 0.0 and float(row["apply_rate"]) > 0
            assert row["divergences"] == "0" and row["apply_errors"] == "0" and row["paused_error"] is None
            assert env.rows(env.target) == env.rows(env.source)
            assert env.rows(env.target).count("\n") == 20  # 21 rows

            samples = wait_for(
                lambda: (s := scrape(metrics.port)).get("pgleap_replay_applied_total") == 30 and s,
                "the metrics to show the applied transactions",
                timeout=60,
            )
            for name in ("lag_transactions", "lag_bytes", "lag_seconds"):
                assert samples[f"pgleap_replay_{name}"] == 0
            assert samples["pgleap_replay_applied_position"] == last
            assert samples["pgleap_replay_running"] == 1 and samples["pgleap_replay_apply_errors_total"] == 0

            notes = [r[0] for r in admin.execute("STOP REPLAY").fetchall()]
            assert notes == [f"database app: stopped at position {last}"]
            app.execute("INSERT INTO items (id, note) VALUES (100, 'after stop')")
            env.drain()
            (row,) = show(admin, "SHOW REPLAY")
            assert row["running"] == "f" and row["lag_transactions"] == "1" and row["last_position"] == str(last + 1)
            assert "after stop" not in env.rows(env.target)

            # Started again, it resumes at the target's applied position: the new row only.
            admin.execute("START REPLAY")
            row = wait_for(lambda: caught_up(admin, last + 1), "replay to resume", timeout=60)
            assert row["applied"] == "1" and row["skipped_in_snapshot"] == "0"
            assert env.rows(env.target) == env.rows(env.source)
            wait_for(
                lambda: scrape(metrics.port).get("pgleap_replay_applied_total") == 31,
                "the applied counter to carry over the restart",
                timeout=60,
            )
    finally:
        metrics.stop()


def test_lag_is_unknown_until_replay_reaches_the_target(tmp_path: Path, pg_old: LabServer) -> None:
    """A target down at START REPLAY: SHOW REPLAY says NULL where it stands, not the whole log as lag."""
    dbname = f"rs_{uuid.uuid4().hex[:10]}"
    pg_old.psql(f"CREATE DATABASE {dbname}")
    pg_old.psql(SCHEMA, dbname=dbname)
    source = ServerConfig(pg_old.host, pg_old.port, dbname, pg_old.superuser, pg_old.password)
    nowhere = ServerConfig("127.0.0.1", free_port(), dbname, "nobody", "secret")
    proxy = start_proxy(tmp_path, {"app": source}, targets={"app": nowhere})  # type: ignore[dict-item]
    try:
        with console(proxy) as admin, psycopg.connect(proxy.dsn(), autocommit=True) as app:
            admin.execute("START CAPTURE")
            record_copy_snapshot(tmp_path / "pgleap-state.db", pg_old.psql("SELECT txid_current_snapshot()"))
            app.execute("INSERT INTO items (id, note) VALUES (1, 'waits for the target')")
            admin.execute("START REPLAY")
            row = wait_for(
                lambda: (r := show(admin, "SHOW REPLAY")[0])["last_transient_error"] and r,
                "replay to fail to reach the target",
                timeout=60,
            )
            assert row["running"] == "t" and row["connected"] == "f" and row["last_position"] == "1"
            assert [row[c] for c in ("applied_position", "lag_transactions", "lag_bytes", "lag_seconds")] == [None] * 4
            admin.execute("STOP REPLAY")
    finally:
        if proxy.proxy is not None:
            proxy.call(quiesce(proxy.proxy))
        proxy.stop()
        pg_old.psql(f"DROP DATABASE IF EXISTS {dbname}")


def test_start_point_comes_from_a_finished_copy(tmp_path: Path) -> None:
    """No store, no S, or a copy still running: refused with what to do; a done run gives S and table snapshots."""
    with pytest.raises(ReplayError, match="run `pgleap copy` first"):
        copy_start_point(None, "app")
    store = StateStore(tmp_path / "state.db")
    try:
        store.start_run("app", "replica", target_oid=16400)
        with pytest.raises(ReplayError, match="run `pgleap copy` first"):
            copy_start_point(store, "app")  # the run has not recorded S yet
        store.set_snapshot("app", "100:105:102", "0/3000000", None)
        with pytest.raises(ReplayError, match="copy run 1 is running, not done"):
            copy_start_point(store, "app")
        chunks = [
            ChunkRecord("c1", "public", "items", "table", None, None, 1, 1),
            ChunkRecord("c2", "public", "scratch", "table", None, None, 1, 1, snapshot="103:103:"),  # unlogged
            ChunkRecord("c3", "public", "events", "table", None, None, 1, 1, snapshot="100:105:102"),
        ]
        store.add_chunks("app", chunks)
        store.finish_run("app")
        start = copy_start_point(store, "app")
        assert (start.snapshot, start.origin) == ("100:105:102", "S of copy run 1")
        assert start.table_snapshots == {"public.scratch": "103:103:"}
        assert start.target_oid == 16400  # replay refuses a target database created again since
    finally:
        store.close()


def test_replay_sessions_switch_off_the_timeouts_their_server_knows(backend: LabServer) -> None:
    """Timeouts a role or database sets must not cut a replayed batch, and the startup packet names only
    settings every supported major knows (a 9.x server refuses a session over one it does not)."""
    import asyncio

    from pgleap.upgrade.replay.wire import SESSION_PARAMS, TargetSession

    from conftest import server_config

    timeouts = ["lock_timeout", "idle_in_transaction_session_timeout"]
    if backend.install.major >= 17:
        timeouts.append("transaction_timeout")
    role = f"replay_{uuid.uuid4().hex[:8]}"
    backend.psql(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD 'pw'")
    try:
        for name in timeouts:
            backend.psql(f"ALTER ROLE {role} SET {name} = '1s'")

        async def shown() -> list[str | None]:
            config = server_config(backend, "postgres")
            config = ServerConfig(config.host, config.port, "postgres", role, "pw")
            session = await TargetSession.open(config)
            try:
                return [(await session.query(f"SHOW {name}"))[0][0] for name in timeouts]
            finally:
                session.close()

        assert asyncio.run(shown()) == ["0"] * len(timeouts)
        assert set(SESSION_PARAMS) <= {"application_name", "client_encoding", "statement_timeout"}
    finally:
        backend.psql(f"DROP ROLE {role}")
