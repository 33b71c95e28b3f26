"""The gradual shift: while the upgrade mirrors, read-only sessions read from the target (here 100% of
them), never write there, stay there through a cutover, and go back to the source when the shift ends.

PG 10 source, a fresh PG 18 target; the upgrade reaches cutover_ready by itself first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgleap.lab import LabServer
from pgleap.proxy.read_shift import chosen, read_only_session
from pgleap.testing import ProxyProcess

from conftest import console as open_console
from conftest import pgbench_database, server_config, show, wait_for

UPGRADE = (
    '[auto_upgrade.validation]\nvalidation_duration = "2s"\ncompare_results = false\n'
    "[auto_upgrade.sync]\nparallel_workers = 2\n"
    "[auto_upgrade.cutover]\nread_shift_percent = 100"
)
READ_ONLY = "-c default_transaction_read_only=on"


def test_read_only_sessions_are_told_by_their_startup_parameters() -> None:
    """default_transaction_read_only as a parameter or in options (the last one wins); anything else is not."""
    assert read_only_session({"default_transaction_read_only": "on"})
    assert read_only_session({"options": "-c statement_timeout=5s -c default_transaction_read_only=true"})
    assert read_only_session({"options": "--default_transaction_read_only=on"})
    assert not read_only_session(
        {"options": "-c default_transaction_read_only=on -c default_transaction_read_only=off"}
    )
    assert not read_only_session({"default_transaction_read_only": "off"})
    assert not read_only_session({"options": "-c search_path=app"})
    assert not chosen(0) and chosen(100)


@pytest.fixture
def source_db(pg_old: LabServer) -> Iterator[str]:
    """A small PG 10 pgbench database."""
    yield from pgbench_database(pg_old, "rs", 1)


def where(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """(port, backend pid) of the server answering this client connection."""
    row = conn.execute("SELECT current_setting('port')::int, pg_backend_pid()").fetchone()
    assert row is not None
    return row[0], row[1]


def shifted(console: psycopg.Connection[Any]) -> int:
    """SHOW UPGRADE STATUS's count of sessions reading from the target."""
    return int(show(console, "SHOW UPGRADE STATUS")[0]["read_shift_sessions"])


@pytest.mark.integration
def test_read_only_sessions_read_from_the_target_while_mirroring(
    tmp_path: Path, pg_old: LabServer, source_db: str, target: LabServer
) -> None:
    """Shifted while mirroring; refused as read-write; kept through cutover; back on the source after a
    rollback and after abandoning the upgrade."""
    source, target_config = server_config(pg_old, source_db), server_config(target, source_db)
    extra = f'state_path = "{tmp_path / "state.db"}"\nchangelog_path = "{tmp_path / "changes.db"}"'
    pgleap = ProxyProcess(tmp_path, {"app": source}, extra=extra, targets={"app": target_config}, upgrade_extra=UPGRADE)
    try:
        pgleap.wait_accepting()
        with (
            open_console(pgleap) as console,
            psycopg.connect(pgleap.dsn(), autocommit=True, options=READ_ONLY) as early,
            psycopg.connect(pgleap.dsn(), autocommit=True) as writer,
        ):
            assert where(early)[0] == pg_old.port  # no upgrade yet: no shift
            console.execute("START UPGRADE")
            wait_for(lambda: show(console, "SHOW UPGRADE STATUS")[0]["phase"] == "cutover_ready", "cutover_ready", 180)
            writer.execute("UPDATE pgbench_branches SET bbalance = bbalance + 1")
            assert where(writer)[0] == pg_old.port

            with psycopg.connect(pgleap.dsn(), autocommit=True, options=READ_ONLY) as reader:
                port, pid = where(reader)
                assert port == target.port and shifted(console) == 1
                # It reads the target's copy of the data; PostgreSQL itself refuses its writes there.
                wait_for(lambda: show(console, "SHOW REPLAY")[0]["lag_transactions"] == "0", "lag 0", 60)
                expected = writer.execute("SELECT sum(bbalance) FROM pgbench_branches").fetchone()
                assert reader.execute("SELECT sum(bbalance) FROM pgbench_branches").fetchone() == expected
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                    reader.execute("UPDATE pgbench_branches SET bbalance = 0")
                # State it makes on the target moves with it when it goes back: a SET, a prepared statement.
                reader.execute("SET work_mem = '7MB'")
                total = "SELECT sum(bbalance) FROM pgbench_branches WHERE bid > %s"
                assert reader.execute(total, (0,), prepare=True).fetchone() == expected

                with psycopg.connect(pgleap.dsn(), autocommit=True, options=READ_ONLY) as rogue:
                    assert where(rogue)[0] == target.port
                    with pytest.raises(psycopg.errors.FeatureNotSupported, match="may not turn read-write"):
                        rogue.execute("SET default_transaction_read_only = off")
                    assert rogue.closed or rogue.broken  # FATAL: closed before it could write

                console.execute("INITIATE CUTOVER FORCE")
                assert where(reader) == (target.port, pid)  # already there: not reconnected
                assert where(writer)[0] == target.port

                console.execute("ROLLBACK UPGRADE")  # after cutover: back to the source, mirroring again
                assert where(reader)[0] == pg_old.port and where(writer)[0] == pg_old.port
                assert reader.execute("SHOW work_mem").fetchone() == ("7MB",)
                # Bound by name only: the source knows the statement prepared on the target.
                assert reader.execute(total, (0,), prepare=True).fetchone() == expected
                named = reader.execute("SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql").fetchone()
                assert named is not None and named[0] >= 1

            with psycopg.connect(pgleap.dsn(), autocommit=True, options=READ_ONLY) as again:
                assert where(again)[0] == target.port  # mirroring again: shifted again
                console.execute("ROLLBACK UPGRADE")  # before cutover: the upgrade is abandoned, the shift ends
                # An idle shifted session goes back at once, before it sends anything.
                wait_for(lambda: shifted(console) == 0, "the shifted session to go back", 10)
                assert where(again)[0] == pg_old.port
            assert where(early)[0] == pg_old.port
    finally:
        pgleap.stop()
