"""Version facts, binary-COPY safety, pg_restore error parsing and role script adaptation (no servers)."""

from __future__ import annotations

import pytest

from pgleap.upgrade.compat import UnsupportedVersionError, binary_safe, facts_for
from pgleap.upgrade.compat.activity import writing_sessions_sql
from pgleap.upgrade.copy.roles import adapt, split_statements
from pgleap.upgrade.copy.schema import parse_restore_errors


@pytest.mark.parametrize(
    ("version", "pause", "lsn"),
    [
        (90100, "pg_xlog_replay_pause()", "pg_last_xlog_replay_location()"),
        (90624, "pg_xlog_replay_pause()", "pg_last_xlog_replay_location()"),
        (100023, "pg_wal_replay_pause()", "pg_last_wal_replay_lsn()"),
        (180001, "pg_wal_replay_pause()", "pg_last_wal_replay_lsn()"),
    ],
)
def test_replay_functions_by_version(version: int, pause: str, lsn: str) -> None:
    facts = facts_for(version)
    assert pause in facts.replay_pause_sql() and lsn in facts.replay_lsn_sql()
    assert (facts.pause_state_sql() is not None) == (version >= 140000)


def test_capability_gates() -> None:
    assert not facts_for(90000).can_export_snapshot and facts_for(90200).can_export_snapshot
    assert not facts_for(130000).has_tid_range_scan and facts_for(140000).has_tid_range_scan
    with pytest.raises(UnsupportedVersionError, match=r"9\.1"):
        facts_for(90000).replay_pause_sql()
    with pytest.raises(UnsupportedVersionError):
        facts_for(80400)
    assert "FORCE" in facts_for(170000).drop_database_sql('"x"')
    assert "FORCE" not in facts_for(120000).drop_database_sql('"x"')


def test_version_gated_snapshot_and_lock_sql() -> None:
    # A standby's S gets its running txids from txid_status (10+); before, none can be listed.
    assert facts_for(90624).standby_snapshot_sql() is None
    standby = facts_for(100023).standby_snapshot_sql()
    assert standby is not None and "txid_status(x) = 'in progress'" in standby
    # pg_advisory_xact_lock is 9.1+: 9.0 takes a session lock and gives it back in the same string.
    assert facts_for(90023).advisory_lock_sql(7) == ("SELECT pg_advisory_lock(7);", "SELECT pg_advisory_unlock(7);")
    assert facts_for(90100).advisory_lock_sql(7) == ("SELECT pg_advisory_xact_lock(7);", "")


def test_binary_safety() -> None:
    assert binary_safe("int4", "pg_catalog", None, integer_datetimes=True)
    assert binary_safe("_int4", "pg_catalog", "int4", integer_datetimes=True)
    assert not binary_safe("mood", "public", None, integer_datetimes=True)
    assert not binary_safe("money", "pg_catalog", None, integer_datetimes=True)
    assert not binary_safe("timestamptz", "pg_catalog", None, integer_datetimes=False)


def test_parse_restore_errors() -> None:
    stderr = (
        'pg_restore: error: could not execute query: ERROR:  function "clash" already exists\n'
        "Command was: CREATE FUNCTION public.clash() RETURNS integer\n    LANGUAGE sql;\n\n\n"
        "pg_restore: while PROCESSING TOC:\n"
        "pg_restore: from TOC entry 215; 1259 16386 TABLE t postgres\n"
        'pg_restore: error: could not execute query: ERROR:  type "abstime" does not exist\n'
        "LINE 1: CREATE TABLE t (a abstime);\n"
        "Command was: CREATE TABLE public.t (a abstime);\n"
        "pg_restore: warning: errors ignored on restore: 2\n"
    )
    records, fatal = parse_restore_errors(stderr, "pre-data")
    assert not fatal and len(records) == 2
    assert records[0].object.startswith("CREATE FUNCTION public.clash()")
    assert records[0].definition.endswith("LANGUAGE sql;")
    assert records[1].object == "215; 1259 16386 TABLE t postgres"
    assert "abstime" in records[1].error and "LINE 1" in records[1].error
    assert parse_restore_errors("pg_restore: error: connection to server failed\n", "x")[1]


def test_roles_script_adapted() -> None:
    script = (
        "\\restrict abc\nSET default_transaction_read_only = off;\n--\n-- Roles\n--\n\n"
        "CREATE ROLE postgres;\nALTER ROLE postgres WITH SUPERUSER PASSWORD 'md5x';\n"
        'CREATE ROLE "app owner";\nALTER ROLE "app owner" WITH LOGIN;\n'
        "COMMENT ON ROLE \"app owner\" IS 'two\nlines';\n\\unrestrict abc\n"
    )
    kept = adapt(split_statements(script), {"postgres"})
    assert kept == [
        'CREATE ROLE "app owner";',
        'ALTER ROLE "app owner" WITH LOGIN;',
        "COMMENT ON ROLE \"app owner\" IS 'two\nlines';",
    ]


@pytest.mark.parametrize(
    ("version", "pid", "client_filter"),
    [
        (90100, "a.procpid", "a.current_query"),  # 9.0/9.1: procpid, current_query
        (90400, "a.pid", "a.query"),
        (100023, "a.pid", "a.backend_type = 'client backend'"),
        (180001, "a.pid", "a.backend_type = 'client backend'"),
    ],
)
def test_writing_sessions_query_by_version(version: int, pid: str, client_filter: str) -> None:
    """Writers are found by their transactionid lock (backend_xid is 9.4+), with the columns each major has."""
    sql = writing_sessions_sql(facts_for(version))
    assert f"JOIN pg_stat_activity a ON {pid} = l.pid" in sql and client_filter in sql
    assert "l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted" in sql
    assert "backend_xid" not in sql and (version >= 100000) == ("backend_type" in sql)
