"""The version adapters in the data path: replayed statements reach the target in its names, clients on the
target after cutover are rewritten too (simple and extended protocol), and the reverse log reaches the
source in the source's names.

A user rule renames a function at PG 12 (`old_fn` on the PG 10 source, `new_fn` on the PG 18 target), and
the built-in `force_parallel_mode` rule (renamed in 16) covers a setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgleap.lab import LabServer
from pgleap.testing import ProxyProcess

from conftest import console as open_console
from conftest import pgbench_database, server_config, show, wait_for

SCHEMA = "CREATE FUNCTION old_fn() RETURNS int LANGUAGE sql AS 'SELECT 7'; CREATE TABLE marks (v int, note text)"
UPGRADE = (
    '[auto_upgrade.validation]\nvalidation_duration = "2s"\ncompare_results = false\n'
    "[auto_upgrade.sync]\nparallel_workers = 2\n"
    "[auto_upgrade.adapters]\n"
    'rules = [{ name = "renamed_fn", since = 12, kind = "function", old = "old_fn", new = "new_fn" }]'
)


@pytest.fixture
def source_db(pg_old: LabServer) -> Iterator[str]:
    """A small PG 10 pgbench database with `old_fn` and a table to write through it."""
    yield from pgbench_database(pg_old, "ad", 1, SCHEMA)


def marks(server: LabServer, dbname: str) -> list[str]:
    """The notes in `marks`, sorted."""
    out = server.psql("SELECT coalesce(string_agg(note || '=' || v, ',' ORDER BY note), '') FROM marks", dbname=dbname)
    return [m for m in out.split(",") if m]


@pytest.mark.integration
def test_adapters_rewrite_replay_clients_on_the_target_and_the_reverse_log(
    tmp_path: Path, pg_old: LabServer, source_db: str, target: LabServer
) -> None:
    """`old_fn()` written on the source replays as `new_fn()`; after cutover clients calling `old_fn()` and
    setting force_parallel_mode work on PG 18; their writes go back to the source as `old_fn()`."""
    source, target_config = server_config(pg_old, source_db), server_config(target, source_db)
    extra = f'state_path = "{tmp_path / "state.db"}"\nchangelog_path = "{tmp_path / "changes.db"}"'
    pgleap = ProxyProcess(tmp_path, {"app": source}, extra=extra, targets={"app": target_config}, upgrade_extra=UPGRADE)
    try:
        pgleap.wait_accepting()
        with open_console(pgleap) as console, psycopg.connect(pgleap.dsn(), autocommit=True) as app:
            console.execute("START UPGRADE")
            wait_for(lambda: show(console, "SHOW UPGRADE STATUS")[0]["phase"] == "cutover_ready", "cutover_ready", 180)
            # The target has the function under its new name only, as a PG 18 application would.
            target.psql(
                "CREATE FUNCTION new_fn() RETURNS int LANGUAGE sql AS 'SELECT 7'; DROP FUNCTION old_fn()",
                dbname=source_db,
            )

            app.execute("INSERT INTO marks SELECT old_fn(), 'replayed'")
            wait_for(lambda: marks(target, source_db) == ["replayed=7"], "the replayed INSERT on the target", 60)
            (replay,) = [r for r in show(console, "SHOW REPLAY") if r["database"] == "app"]
            assert replay["apply_errors"] == "0" and replay["paused_error"] is None, replay

            console.execute("INITIATE CUTOVER FORCE")
            assert app.execute("SELECT current_setting('port')::int").fetchone() == (target.port,)
            assert app.execute("SELECT old_fn()").fetchone() == (7,)  # simple protocol, rewritten
            assert app.execute("SELECT old_fn() + %s", (1,)).fetchone() == (8,)  # extended protocol
            app.execute("SET force_parallel_mode = off")  # a built-in rule: PG 18 calls it debug_parallel_query
            assert app.execute("SHOW debug_parallel_query").fetchone() == ("off",)
            app.execute("INSERT INTO marks SELECT old_fn() + 1, 'on the target'")

            # The reverse log holds new_fn(), as the target ran it; the source gets old_fn() back.
            wait_for(
                lambda: marks(pg_old, source_db) == ["on the target=8", "replayed=7"],
                "the reverse log's INSERT on the source",
                60,
            )
            reverse = [r for r in show(console, "SHOW REPLAY") if r["database"] == "app@reverse"]
            assert reverse and reverse[0]["apply_errors"] == "0" and reverse[0]["paused_error"] is None, reverse
    finally:
        pgleap.stop()
