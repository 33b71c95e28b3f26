"""The applied position on the target (`pgleap.applied`), written in the same transaction as the changes.

Because the position commits atomically with what it covers, the target itself says exactly which log
positions it holds: after any crash replay resumes after it, and nothing is lost or applied twice (I4).

One race remains without a guard: a replayer whose connection was cut right after it sent COMMIT leaves
a backend that may still commit after a new connection has read the old position. So every batch
starts with `pgleap.expect_position(database, position)`, which locks the row (waiting for that
backend) and fails when the position is not the one the batch continues from; the batch then rolls
back and replay reads the position again.
"""

from __future__ import annotations

from pgleap.upgrade.compat.facts import Facts
from pgleap.upgrade.replay.errors import TargetRefusedError, TransientApplyError
from pgleap.upgrade.replay.wire import TargetSession

# A DO block rather than CREATE SCHEMA IF NOT EXISTS (9.3+), so the same statement also prepares a 9.x
# source for the reverse log after cutover.
ENSURE_SQL = """
DO $pgleap$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'pgleap') THEN
        CREATE SCHEMA pgleap;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = 'pgleap' AND tablename = 'applied') THEN
        CREATE TABLE pgleap.applied (database text PRIMARY KEY, position bigint NOT NULL, applied_at timestamptz);
    END IF;
END
$pgleap$;
CREATE OR REPLACE FUNCTION pgleap.expect_position(db text, expected bigint) RETURNS void
LANGUAGE plpgsql AS $pgleap$
DECLARE
    current_position bigint;
BEGIN
    -- FOR UPDATE waits for any other transaction still holding the row (a replayer whose connection
    -- was cut after it sent COMMIT) and then reads the row as that transaction left it.
    SELECT position INTO current_position FROM pgleap.applied WHERE database = db FOR UPDATE;
    IF current_position IS DISTINCT FROM expected THEN
        RAISE EXCEPTION USING ERRCODE = 'PGLP1', MESSAGE = 'pgleap: applied position of ' || db || ' is '
            || coalesce(current_position::text, 'missing') || ', not ' || expected;
    END IF;
END
$pgleap$;
"""

# Raised by pgleap.expect_position: the position moved under this replayer (see `guard_sql`).
POSITION_MOVED = "PGLP1"
GUARD_SQL = "SELECT pgleap.expect_position($1, $2)"

TEXT_OID, INT8_OID = 25, 20
ENSURE_LOCK_KEY = 0x70676C70  # "pglp": the advisory lock key taken while creating schema pgleap
POSITION_PARAM_TYPES = (TEXT_OID, INT8_OID)


def store_position_sql(facts: Facts) -> str:
    """Upsert ($1 database, $2 position) into pgleap.applied: ON CONFLICT on 9.5+, a writable CTE before."""
    if facts.has_on_conflict:
        return (
            "INSERT INTO pgleap.applied (database, position, applied_at) VALUES ($1, $2, now()) "
            "ON CONFLICT (database) DO UPDATE SET position = EXCLUDED.position, applied_at = EXCLUDED.applied_at"
        )
    # Only one replayer writes a database's row, so the update-else-insert cannot race.
    return (
        "WITH u AS (UPDATE pgleap.applied SET position = $2, applied_at = now() WHERE database = $1 RETURNING 1) "
        "INSERT INTO pgleap.applied (database, position, applied_at) SELECT $1, $2, now() "
        "WHERE NOT EXISTS (SELECT 1 FROM u)"
    )


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


async def read_position(session: TargetSession, database: str, facts: Facts) -> int:
    """Create pgleap.applied if missing and return the position applied for `database` (0: nothing yet)."""
    name = _literal(database)
    # One implicit transaction (a simple-query string), serialised by an advisory lock: two replayers starting
    # at once would otherwise race to create the schema. The row exists from then on, so the guard of the
    # very first batch has a row to lock.
    lock, unlock = facts.advisory_lock_sql(ENSURE_LOCK_KEY)
    rows = await session.query(
        f"{lock} {ENSURE_SQL}"
        f"INSERT INTO pgleap.applied (database, position) SELECT {name}, 0 "
        f"WHERE NOT EXISTS (SELECT 1 FROM pgleap.applied WHERE database = {name});{unlock}"
        f"SELECT position FROM pgleap.applied WHERE database = {name}"
    )
    return int(rows[-1][0] or 0)


async def move_position(session: TargetSession, database: str, expected: int, new: int) -> None:
    """Set the applied position of `database` from `expected` to `new`, guarded like every batch."""
    name = _literal(database)
    try:
        await session.query(
            f"SELECT pgleap.expect_position({name}, {int(expected)}); "
            f"UPDATE pgleap.applied SET position = {int(new)}, applied_at = now() WHERE database = {name}"
        )
    except TargetRefusedError as exc:
        if exc.sqlstate == POSITION_MOVED:
            # A cut-off connection's COMMIT landed after the position was read: read it again, as a batch does.
            raise TransientApplyError(f"the applied position of {database!r} moved: {exc}") from exc
        raise


async def database_oid(session: TargetSession) -> int:
    """pg_database.oid of the database the session is in: a database dropped and created again has another."""
    rows = await session.query("SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()")
    return int(rows[0][0] or 0)


async def server_version_num(session: TargetSession) -> int:
    """SHOW server_version_num on the target."""
    rows = await session.query("SHOW server_version_num")
    return int(rows[0][0] or 0)
