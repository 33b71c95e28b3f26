"""The copy's cut and its crash safety: S is exact, kill -9 resumes without duplicates, a lost S restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from pgleap.config import UpgradeConfig
from pgleap.lab import Lab, LabServer, wait_for_replay
from pgleap.store import StateStore
from pgleap.upgrade.copy import CopyJob, CopyOptions
from pgleap.upgrade.copy.connect import connect
from test_copy import check_rows_equal, server_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair(lab: Lab) -> Iterator[tuple[LabServer, LabServer]]:
    """A PG 10 primary with a `big` table (enough chunks to be killed mid-copy) and its replica."""
    primary = lab.primary(10, auth="md5")
    primary.psql("CREATE DATABASE app")
    primary.psql(
        "CREATE TABLE big (id int PRIMARY KEY, v text, f float8);"
        "INSERT INTO big SELECT i, repeat('x', 100) || i, i / 7.0 FROM generate_series(1, 150000) i;"
        "CREATE TABLE marks (id serial PRIMARY KEY, note text, tx bigint DEFAULT txid_current());",
        dbname="app",
    )
    replica = lab.replica(primary)
    yield primary, replica
    replica.stop()
    primary.stop()


def _upgrade(primary: LabServer, replica: LabServer, target: LabServer) -> UpgradeConfig:
    return UpgradeConfig(
        database="app", source=server_config(primary), replica=server_config(replica), target=server_config(target)
    )


def test_snapshot_is_exact(lab: Lab, pair: tuple[LabServer, LabServer], tmp_path: Path) -> None:
    """Rows committed before S are copied; rows committed after S (even by a transaction open at S) are not."""
    primary, replica = pair
    target = lab.target(18)
    source_cfg = server_config(primary)

    async def scenario() -> tuple[str, list[asyncpg.Record], set[int]]:
        alice = await connect(source_cfg, role="source")
        open_tx = await connect(source_cfg, role="source")
        try:
            await alice.execute("TRUNCATE marks")
            await alice.execute("INSERT INTO marks (note) SELECT 'before' FROM generate_series(1, 5)")
            await open_tx.execute("BEGIN")
            await open_tx.execute("INSERT INTO marks (note) VALUES ('open at S')")
            await asyncio.to_thread(wait_for_replay, primary, replica)

            async def after_snapshot(snapshot: str) -> None:
                await open_tx.execute("COMMIT")
                await alice.execute("INSERT INTO marks (note) SELECT 'after' FROM generate_series(1, 5)")
                await asyncio.sleep(0.3)  # let the replica receive (not replay: it is paused) that WAL

            store = StateStore(tmp_path / "state.db")
            report = await CopyJob(
                _upgrade(primary, replica, target),
                store,
                CopyOptions(parallel_workers=2, copy_roles=False),
                on_snapshot=after_snapshot,
            ).run()
            store.close()
            rows = await alice.fetch(
                "SELECT id, note, txid_visible_in_snapshot(tx, $1::text::txid_snapshot) "
                "AS visible FROM marks ORDER BY id",
                report.snapshot,
            )
            charles = await connect(server_config(target), role="target")
            copied = {r[0] for r in await charles.fetch("SELECT id FROM marks")}
            await charles.close()
            return report.snapshot, rows, copied
        finally:
            await alice.close()
            await open_tx.close()

    try:
        snapshot, rows, copied = asyncio.run(scenario())
        assert len(rows) == 11
        for row in rows:
            assert (row["id"] in copied) == row["visible"], f"{dict(row)} vs S = {snapshot}"
            assert row["visible"] == (row["note"] == "before"), dict(row)
    finally:
        target.stop()


def _config(path: Path, primary: LabServer, replica: LabServer, target: LabServer) -> Path:
    def server(prefix: str, s: LabServer) -> str:
        return (
            f'{prefix}_host = "{s.host}"\n{prefix}_port = {s.port}\n{prefix}_database = "app"\n'
            f'{prefix}_user = "{s.superuser}"\n{prefix}_password = "{s.password}"\n'
        )

    path.write_text(
        '[pgleap]\nadmin_user = "admin"\nadmin_password = "x"\n'
        '[[users]]\nname = "app"\npassword = "x"\n'
        '[[auto_upgrade]]\ndatabase = "app"\n'
        + server("source", primary)
        + server("replica", replica)
        + server("target", target)
    )
    return path


def _copy_cmd(config: Path, state: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pgleap.cli.main",
        "copy",
        "-c",
        str(config),
        "--state",
        str(state),
        "--workers",
        "2",
        "--split-threshold-mb",
        "0.2",
        "--chunk-mb",
        "0.2",
        "--no-progress",
        "--no-roles",
    ]


def test_kill9_resumes_without_duplicates(lab: Lab, pair: tuple[LabServer, LabServer], tmp_path: Path) -> None:
    primary, replica = pair
    target = lab.target(18)
    config = _config(tmp_path / "pgleap.toml", primary, replica, target)
    state = tmp_path / "state.db"
    try:
        proc = subprocess.Popen(
            _copy_cmd(config, state),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).parent.parent,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        done_before: dict[str, float | None] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            if state.exists():
                store = StateStore(state)
                chunks = store.chunks("app")
                store.close()
                done = [c for c in chunks if c.status == "done"]
                if len(done) >= 3 and any(c.status == "inflight" for c in chunks):
                    os.kill(proc.pid, signal.SIGKILL)
                    done_before = {c.chunk_id: c.finished_at for c in done}
                    break
            time.sleep(0.02)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"copy ended before it could be killed: {proc.stderr.read()!r}"
        assert replica.psql("SELECT pg_is_wal_replay_paused()") == "t"

        rerun = subprocess.run(
            _copy_cmd(config, state), capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent
        )
        assert rerun.returncode == 0, rerun.stderr
        assert "resumed" in rerun.stdout, rerun.stdout
        store = StateStore(state)
        after = {c.chunk_id: c for c in store.chunks("app")}
        store.close()
        # Chunks finished before the kill were kept, not copied again.
        for chunk_id, finished_at in done_before.items():
            assert after[chunk_id].finished_at == finished_at
        assert all(c.status == "done" for c in after.values())
        check_rows_equal(primary, target)
        assert target.psql("SELECT count(*), count(DISTINCT id) FROM big", dbname="app") == "150000|150000"
        assert replica.psql("SELECT pg_is_wal_replay_paused()") == "f"
    finally:
        target.stop()


def test_lost_snapshot_starts_over(lab: Lab, pair: tuple[LabServer, LabServer], tmp_path: Path) -> None:
    """A failed copy keeps replay paused; once replay is resumed, S is gone and the rerun starts over."""
    primary, replica = pair
    target = lab.target(18)
    upgrade = _upgrade(primary, replica, target)

    async def fail(snapshot: str) -> None:
        raise RuntimeError("injected failure after S")

    try:
        store = StateStore(tmp_path / "state.db")
        with pytest.raises(RuntimeError, match="injected"):
            asyncio.run(CopyJob(upgrade, store, CopyOptions(copy_roles=False), on_snapshot=fail).run())
        assert replica.psql("SELECT pg_is_wal_replay_paused()") == "t"
        replica.psql("SELECT pg_wal_replay_resume()")
        report = asyncio.run(CopyJob(upgrade, store, CopyOptions(copy_roles=False)).run())
        store.close()
        assert report.run_id == 2 and not report.resumed
        assert report.restart_reason and "resumed" in report.restart_reason
        check_rows_equal(primary, target)
    finally:
        target.stop()


def test_rerun_after_a_rejected_key_keeps_the_data(lab: Lab, pair: tuple[LabServer, LabServer], tmp_path: Path) -> None:
    """A key the target rejects stops the copy after the data; once fixed, the rerun builds it at the same S."""
    from pgleap.upgrade.copy import SchemaObjectError

    primary, replica = pair
    target = lab.target(18)
    upgrade = _upgrade(primary, replica, target)
    options = CopyOptions(copy_roles=False, parallel_workers=2, split_threshold_bytes=200_000, chunk_bytes=200_000)

    async def clash(snapshot: str) -> None:
        # A relation named like big's primary key: ALTER TABLE ... ADD CONSTRAINT big_pkey fails.
        conn = await connect(server_config(target), role="target")
        try:
            await conn.execute("CREATE SEQUENCE big_pkey")
        finally:
            await conn.close()

    try:
        store = StateStore(tmp_path / "state.db")
        with pytest.raises(SchemaObjectError, match="big_pkey"):
            asyncio.run(CopyJob(upgrade, store, options, on_snapshot=clash).run())
        assert replica.psql("SELECT pg_is_wal_replay_paused()") == "t"
        done_before = {c.chunk_id: c.finished_at for c in store.chunks("app")}
        assert all(done_before.values()), "every chunk is copied before the copy stops"
        target.psql("DROP SEQUENCE big_pkey", dbname="app")
        report = asyncio.run(CopyJob(upgrade, store, options).run())
        # (The store keeps the run's rejections, so the report still lists the one the DBA fixed.)
        assert report.resumed
        # The data was kept, and the key built on the rerun.
        assert {c.chunk_id: c.finished_at for c in store.chunks("app")} == done_before
        store.close()
        assert target.psql("SELECT count(*) FROM pg_constraint WHERE conname = 'big_pkey'", dbname="app") == "1"
        check_rows_equal(primary, target)
        assert replica.psql("SELECT pg_is_wal_replay_paused()") == "f"
    finally:
        target.stop()
