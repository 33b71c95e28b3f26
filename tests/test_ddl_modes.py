"""The three `ddl` modes while an upgrade captures (PG 10 source, PG 18 target), through the admin console.

- block: the source refuses the DDL with an error naming the setting, inside a transaction block too (the
  transaction is aborted, exactly as a failed statement leaves it); temporary tables and TRUNCATE pass.
- replay: the DDL runs on the source and is replayed on the target in commit order, and the INSERTs after
  it carry row images of the new shape.
- queue: replay applies everything before the DDL and holds; APPLY QUEUED DDL replays it, SKIP QUEUED DDL
  goes on without it (for DDL run on the target by hand). Nothing after it is applied while it is held.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgleap.config import ServerConfig
from pgleap.lab import LabServer
from pgleap.testing import ProxyThread

from conftest import console, quiesce, record_copy_snapshot, show, start_proxy, wait_for

pytestmark = pytest.mark.integration

SCHEMA = "CREATE TABLE items (id serial PRIMARY KEY, note text NOT NULL)"


@dataclass
class Env:
    """A PG 10 database behind a capturing proxy in one `ddl` mode, targeting the same schema on PG 18."""

    source: LabServer
    target: LabServer
    dbname: str
    proxy: ProxyThread

    def app(self) -> psycopg.Connection[Any]:
        """An application connection through pgleap."""
        return psycopg.connect(self.proxy.dsn(), autocommit=True)

    def admin(self) -> psycopg.Connection[Any]:
        """An autocommit connection to the admin console."""
        return console(self.proxy)

    def table(self, server: LabServer) -> str:
        """items as psql prints it, with whatever columns it has now."""
        return server.psql("SELECT * FROM items ORDER BY id", dbname=self.dbname)


def make_env(tmp_path: Path, source: LabServer, target: LabServer, mode: str) -> Iterator[Env]:
    dbname = f"dd_{uuid.uuid4().hex[:10]}"
    for server in (source, target):
        server.psql(f"CREATE DATABASE {dbname}")
        server.psql(SCHEMA, dbname=dbname)
    config = ServerConfig(source.host, source.port, dbname, source.superuser, source.password)
    proxy = start_proxy(tmp_path, {"app": config}, targets={"app": target}, extra=f'ddl = "{mode}"')  # type: ignore[dict-item]
    env = Env(source, target, dbname, proxy)
    try:
        with env.admin() as admin:
            admin.execute("START CAPTURE")
            snapshot = source.psql("SELECT txid_current_snapshot()", dbname=dbname)
            record_copy_snapshot(tmp_path / "pgleap-state.db", snapshot)  # the (empty) copy is at S
            admin.execute("START REPLAY")
        yield env
    finally:
        if proxy.proxy is not None:
            proxy.call(quiesce(proxy.proxy))
        proxy.stop()
        source.psql(f"DROP DATABASE IF EXISTS {dbname}")
        target.psql(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


@pytest.fixture(params=["block", "replay", "queue"])
def env(request: pytest.FixtureRequest, tmp_path: Path, pg_old: LabServer, pg_new: LabServer) -> Iterator[Env]:
    """One environment per mode; a test asks for the mode it is about with `mode`."""
    yield from make_env(tmp_path, pg_old, pg_new, request.param)


def replay_row(env: Env) -> dict[str, Any]:
    with env.admin() as admin:
        (row,) = show(admin, "SHOW REPLAY")
    return row


def caught_up(env: Env) -> bool:
    row = replay_row(env)
    return row["lag_transactions"] == "0" and row["applied_position"] == row["last_position"]


@pytest.mark.parametrize("env", ["block"], indirect=True)
def test_block_refuses_ddl_naming_the_setting(env: Env) -> None:
    with env.app() as app:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match='ddl = "block"') as refused:
            app.execute("ALTER TABLE items ADD COLUMN qty int", prepare=False)
        assert refused.value.diag.message_hint is not None and "RELOAD" in refused.value.diag.message_hint
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            app.execute("CREATE INDEX ON items (note)")  # extended protocol
        # Inside a block the transaction is aborted, as by any failed statement: COMMIT rolls back.
        app.execute("BEGIN")
        app.execute("INSERT INTO items (note) VALUES ('before the DDL')")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            app.execute("DROP TABLE items")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            app.execute("SELECT 1")
        app.execute("COMMIT")
        # Session state and data changes that are not schema changes pass.
        app.execute("CREATE TEMP TABLE scratch (x int)")
        app.execute("INSERT INTO items (note) VALUES ('kept')")
        app.execute("TRUNCATE scratch")
    assert env.source.psql("SELECT note FROM items", dbname=env.dbname) == "kept"
    assert (
        env.source.psql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'items'", dbname=env.dbname)
        == "2"
    )
    wait_for(lambda: caught_up(env) and env.table(env.target) == env.table(env.source), "replay of the kept row")


@pytest.mark.parametrize("env", ["replay"], indirect=True)
def test_replay_applies_ddl_in_commit_order(env: Env) -> None:
    with env.app() as app:
        app.execute("INSERT INTO items (note) VALUES ('one')")
        app.execute("ALTER TABLE items ADD COLUMN added timestamptz NOT NULL DEFAULT now()")
        app.execute("INSERT INTO items (note) VALUES ('two')")  # its image carries the new column
        with app.transaction():
            app.execute("ALTER TABLE items ADD COLUMN qty int")
            app.execute("UPDATE items SET qty = 2 WHERE note = 'two'")
        app.execute("INSERT INTO items (note, qty) VALUES ('three', 3)")
    wait_for(lambda: caught_up(env) and env.table(env.target) == env.table(env.source), "the target to match")
    assert env.table(env.target).count("|") == 3 * 3  # four columns on the target too


@pytest.mark.parametrize("env", ["queue"], indirect=True)
def test_queue_holds_until_applied_or_skipped(env: Env) -> None:
    with env.app() as app:
        app.execute("INSERT INTO items (note) VALUES ('before')")
        app.execute("ALTER TABLE items ADD COLUMN qty int NOT NULL DEFAULT 7")
        app.execute("INSERT INTO items (note, qty) VALUES ('after', 8)")
    held = wait_for(lambda: (r := replay_row(env))["held_ddl"] and r, "replay to hold at the DDL")
    assert "ADD COLUMN qty" in held["held_ddl"]
    assert int(held["applied_position"]) == 1 and int(held["lag_transactions"]) == 2
    assert env.target.psql("SELECT note FROM items", dbname=env.dbname) == "before"
    with env.admin() as admin:
        (note,) = show(admin, "APPLY QUEUED DDL")
        assert "applying position 2" in note["note"]
    wait_for(lambda: caught_up(env) and env.table(env.target) == env.table(env.source), "the target to match")

    # The operator runs an adapted DDL on the target by hand, then skips the logged one.
    with env.app() as app:
        app.execute("ALTER TABLE items ADD COLUMN flag boolean")
        app.execute("INSERT INTO items (note, qty, flag) VALUES ('flagged', 9, true)")
    wait_for(lambda: replay_row(env)["held_ddl"], "replay to hold at the second DDL")
    env.target.psql("ALTER TABLE items ADD COLUMN flag boolean", dbname=env.dbname)
    with env.admin() as admin:
        show(admin, "SKIP QUEUED DDL")
        (none,) = show(admin, "SKIP QUEUED DDL")
        assert none["note"] == "no replay holds queued DDL"
    wait_for(lambda: caught_up(env) and env.table(env.target) == env.table(env.source), "the target to match")

    # A schema change that runs outside a transaction block, skipped: it never runs on the target.
    with env.app() as app:
        app.execute("CREATE INDEX CONCURRENTLY items_note ON items (note)")
        app.execute("INSERT INTO items (note, qty, flag) VALUES ('after the index', 10, false)")
    held = wait_for(lambda: (r := replay_row(env))["held_ddl"] and r, "replay to hold at the index")
    assert "CONCURRENTLY" in held["held_ddl"]
    with env.admin() as admin:
        show(admin, "SKIP QUEUED DDL")
    wait_for(lambda: caught_up(env) and env.table(env.target) == env.table(env.source), "the target to match")
    indexes = "SELECT count(*) FROM pg_indexes WHERE indexname = 'items_note'"
    assert (env.source.psql(indexes, dbname=env.dbname), env.target.psql(indexes, dbname=env.dbname)) == ("1", "0")
