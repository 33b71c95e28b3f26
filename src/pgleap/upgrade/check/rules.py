"""The rules of `pgleap check`, as data: keyed by the major where the behaviour changed, each with its release note.

A rule applies when the upgrade crosses its major (source < since <= target); rules with since=None
(what the target installation offers) apply to every upgrade. `kind` names the detector in detect.py and
`params` are its arguments, so most rules are one line of data and adding one needs no code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pgleap.upgrade.check.model import Rule, Severity, major_num

E, W, I = Severity.ERROR, Severity.WARNING, Severity.INFO  # noqa: E741


def notes(label: str) -> str:
    """The release notes of a major's first release ('12' -> .../release/12.0/)."""
    return f"https://www.postgresql.org/docs/release/{label}.0/"


def _rule(
    name: str,
    since: str | None,
    severity: Severity,
    title: str,
    kind: str,
    fix: str,
    reference: str | None = None,
    *,
    needs_crossing: bool = True,
    **params: Any,
) -> Rule:
    return Rule(
        name=name,
        since=major_num(since) if since is not None else None,
        severity=severity,
        title=title,
        kind=kind,
        fix=fix,
        reference=reference or (notes(since) if since else "https://www.postgresql.org/docs/current/"),
        params=tuple(sorted(params.items())),
        needs_crossing=needs_crossing,
    )


def _removed_setting(name: str, since: str, replacement: str | None, why: str = "") -> Rule:
    fix = f"use {replacement} instead" if replacement else "remove it: the target has no such setting"
    return _rule(
        f"removed_setting_{name}",
        since,
        W,
        f"setting {name} was removed in {since}{why}",
        "removed_setting",
        f"{fix} (in postgresql.conf of the target, and in ALTER DATABASE/ROLE ... SET, which the target "
        "rejects on restore)",
        setting=name,
    )


def _removed_column(
    name: str, since: str, relation: str, columns: tuple[str, ...], replacement: str, severity: Severity = E
) -> Rule:
    cols = ", ".join(f"{relation}.{c}" for c in columns)
    return _rule(
        name,
        since,
        severity,
        f"{cols} no longer exist{'s' if len(columns) == 1 else ''} from {since}",
        "removed_catalog_column",
        f"rewrite the view or function: {replacement}. A view using it is rejected by the target's restore; "
        "a function fails when called",
        relation=relation,
        columns=columns,
    )


def _removed_extension(name: str, since: str, replacement: str) -> Rule:
    return _rule(
        f"removed_extension_{name.replace('-', '_')}",
        since,
        E,
        f"extension {name} was removed from contrib in {since}",
        "removed_extension",
        f"{replacement}; then DROP EXTENSION {name} on the source (the target cannot CREATE EXTENSION it)",
        extension=name,
    )


RULES: tuple[Rule, ...] = (
    # -- 9.x --------------------------------------------------------------------------------------------
    _rule(
        "changed_default_bytea_output",
        "9.0",
        W,
        "bytea_output is hex by default from 9.0: clients parsing the escape format read garbage",
        "changed_default",
        "fix the client to read hex (any libpq 9.0+ driver does), or set bytea_output = escape on the target",
        setting="bytea_output",
        new="hex",
        needs_crossing=False,
    ),
    _rule(
        "changed_default_standard_conforming_strings",
        "9.1",
        W,
        "standard_conforming_strings is on by default from 9.1: backslashes in '...' literals are literal",
        "changed_default",
        "write E'...' for escapes in the application, or set standard_conforming_strings = off on the target "
        "(ALTER DATABASE ... SET) until it is fixed",
        setting="standard_conforming_strings",
        new="on",
        needs_crossing=False,
    ),
    _removed_column(
        "removed_column_pg_stat_activity_procpid",
        "9.2",
        "pg_stat_activity",
        ("procpid", "current_query"),
        "procpid is pid, current_query is query (and state says whether it is idle)",
    ),
    _removed_setting("silent_mode", "9.2", None, " (run the postmaster in the background yourself)"),
    _removed_setting("wal_sender_delay", "9.2", None),
    _removed_setting("custom_variable_classes", "9.2", None, " (any dotted name is now allowed)"),
    _removed_setting("replication_timeout", "9.3", "wal_sender_timeout"),
    _removed_setting("checkpoint_segments", "9.5", "max_wal_size (about 3 x checkpoint_segments x 16MB)"),
    _removed_setting("ssl_renegotiation_limit", "9.5", None),
    _rule(
        "operator_named_arrow",
        "9.5",
        E,
        "=> is no longer allowed as an operator name (it is the named-argument syntax)",
        "operator_name",
        "rename the operator (e.g. to ~>) on the source and change the queries that use it",
        operator="=>",
    ),
    _removed_column(
        "removed_column_pg_stat_activity_waiting",
        "9.6",
        "pg_stat_activity",
        ("waiting",),
        "use wait_event_type and wait_event",
    ),
    # -- 10 ---------------------------------------------------------------------------------------------
    _rule(
        "unknown_type_columns",
        "10",
        E,
        "columns of type unknown are not allowed from 10 (unknown became a pseudo-type)",
        "column_type",
        "ALTER TABLE ... ALTER COLUMN ... TYPE text on the source (views: cast the literal, e.g. 'x'::text)",
        types=("unknown",),
    ),
    _removed_column(
        "removed_column_pg_stat_replication_location",
        "10",
        "pg_stat_replication",
        ("sent_location", "write_location", "flush_location", "replay_location"),
        "the columns are called sent_lsn, write_lsn, flush_lsn, replay_lsn",
    ),
    _rule(
        "removed_function_xlog",
        "10",
        E,
        "the xlog functions were renamed to wal (and location to lsn) in 10",
        "removed_function",
        "pg_current_xlog_location -> pg_current_wal_lsn, pg_xlog_location_diff -> pg_wal_lsn_diff, "
        "pg_last_xlog_replay_location -> pg_last_wal_replay_lsn, pg_switch_xlog -> pg_switch_wal, ...",
        functions=(
            "pg_current_xlog_location",
            "pg_current_xlog_insert_location",
            "pg_current_xlog_flush_location",
            "pg_last_xlog_receive_location",
            "pg_last_xlog_replay_location",
            "pg_xlog_location_diff",
            "pg_xlogfile_name",
            "pg_xlogfile_name_offset",
            "pg_switch_xlog",
            "pg_xlog_replay_pause",
            "pg_xlog_replay_resume",
            "pg_is_xlog_replay_paused",
        ),
    ),
    _removed_extension("tsearch2", "10", "use the built-in text search (to_tsvector, to_tsquery)"),
    _removed_setting("sql_inheritance", "10", None, " (always on: write ONLY to exclude children)"),
    _removed_setting("min_parallel_relation_size", "10", "min_parallel_table_scan_size"),
    # -- 11 ---------------------------------------------------------------------------------------------
    _removed_column(
        "removed_column_pg_class_relhaspkey",
        "11",
        "pg_class",
        ("relhaspkey",),
        "EXISTS (SELECT 1 FROM pg_index WHERE indrelid = c.oid AND indisprimary)",
    ),
    _removed_column(
        "removed_column_pg_proc_proisagg",
        "11",
        "pg_proc",
        ("proisagg", "proiswindow"),
        "prokind = 'a' / prokind = 'w'",
    ),
    _removed_extension("chkpass", "11", "store a crypt() hash in a text column (pgcrypto) instead of chkpass"),
    _removed_setting("replacement_sort_tuples", "11", None),
    # -- 12 ---------------------------------------------------------------------------------------------
    _rule(
        "tables_with_oids",
        "12",
        E,
        "tables WITH OIDS are not supported from 12: the oid column and its values are lost",
        "with_oids",
        "ALTER TABLE ... SET WITHOUT OIDS on the source; if the application reads oid, first add a column "
        "(ALTER TABLE t ADD COLUMN id bigint; UPDATE t SET id = oid) and use it",
    ),
    _rule(
        "removed_type_abstime",
        "12",
        E,
        "type abstime was removed in 12",
        "column_type",
        "ALTER TABLE ... ALTER COLUMN ... TYPE timestamptz USING c::timestamptz on the source",
        types=("abstime",),
        signatures=True,
    ),
    _rule(
        "removed_type_reltime",
        "12",
        E,
        "type reltime was removed in 12",
        "column_type",
        "ALTER TABLE ... ALTER COLUMN ... TYPE interval USING c::interval on the source",
        types=("reltime",),
        signatures=True,
    ),
    _rule(
        "removed_type_tinterval",
        "12",
        E,
        "type tinterval was removed in 12",
        "column_type",
        "ALTER TABLE ... ALTER COLUMN ... TYPE tstzrange USING tstzrange(tintervalstart(c)::timestamptz, "
        "tintervalend(c)::timestamptz) on the source",
        types=("tinterval",),
        signatures=True,
    ),
    _rule(
        "sql_identifier_columns",
        "12",
        W,
        "information_schema.sql_identifier is a domain over name from 12: values longer than 63 bytes are cut",
        "column_type",
        "ALTER TABLE ... ALTER COLUMN ... TYPE text (or varchar) on the source",
        types=("sql_identifier",),
        type_schema="information_schema",
    ),
    _removed_column(
        "removed_column_pg_class_relhasoids",
        "12",
        "pg_class",
        ("relhasoids",),
        "tables have no OIDs from 12: drop the column from the query",
    ),
    _removed_column(
        "removed_column_pg_constraint_consrc",
        "12",
        "pg_constraint",
        ("consrc",),
        "pg_get_constraintdef(oid)",
    ),
    _removed_column("removed_column_pg_attrdef_adsrc", "12", "pg_attrdef", ("adsrc",), "pg_get_expr(adbin, adrelid)"),
    _removed_extension("timetravel", "12", "use a trigger of your own, or temporal tables in the application"),
    _removed_setting("default_with_oids", "12", None, " (WITH OIDS is gone)"),
    # -- 13 ---------------------------------------------------------------------------------------------
    _removed_setting("wal_keep_segments", "13", "wal_keep_size (wal_keep_segments x 16MB)"),
    # -- 14 ---------------------------------------------------------------------------------------------
    _rule(
        "postfix_operators",
        "14",
        E,
        "postfix (right-unary) operators are not supported from 14",
        "postfix_operator",
        "drop the operator on the source and call its function instead (e.g. factorial(n) for n !)",
    ),
    _rule(
        "polymorphic_anyarray",
        "14",
        E,
        "aggregates and operators built on array_append, array_cat, ... (anyarray signatures) fail to restore on "
        "14+ (those functions take anycompatiblearray)",
        "polymorphic_functions",
        "DROP the aggregate/operator on the source and recreate it on the target with anycompatible/"
        "anycompatiblearray in place of anyelement/anyarray",
        functions=(
            "array_append(anyarray,anyelement)",
            "array_cat(anyarray,anyarray)",
            "array_prepend(anyelement,anyarray)",
            "array_remove(anyarray,anyelement)",
            "array_replace(anyarray,anyelement,anyelement)",
            "array_position(anyarray,anyelement)",
            "array_position(anyarray,anyelement,integer)",
            "array_positions(anyarray,anyelement)",
            "width_bucket(anyelement,anyarray)",
        ),
    ),
    _rule(
        "md5_passwords",
        "14",
        W,
        "roles with md5 password hashes: password_encryption is scram-sha-256 by default from 14, and 18 "
        "deprecates md5",
        "md5_password",
        "ALTER ROLE ... PASSWORD again with password_encryption = 'scram-sha-256' (on the source, or on the "
        "target after the copy); keep md5 in the target's pg_hba.conf until then",
    ),
    _rule(
        "changed_default_password_encryption",
        "14",
        I,
        "password_encryption is scram-sha-256 by default from 14: passwords set on the target are SCRAM hashes",
        "changed_default",
        "check that every client library speaks SCRAM (libpq 10+, JDBC 42.2+), or set password_encryption = "
        "md5 on the target",
        setting="password_encryption",
        new="scram-sha-256",
        needs_crossing=False,
    ),
    _removed_setting("operator_precedence_warning", "14", None, " (the 9.5 precedence change is long settled)"),
    # -- 15 ---------------------------------------------------------------------------------------------
    _removed_column(
        "removed_column_pg_database_datlastsysoid",
        "15",
        "pg_database",
        ("datlastsysoid",),
        "objects with oid >= 16384 are user objects",
    ),
    _rule(
        "removed_function_exclusive_backup",
        "15",
        E,
        "pg_start_backup/pg_stop_backup (exclusive backup mode) were removed in 15",
        "removed_function",
        "use pg_backup_start(label, fast) / pg_backup_stop() in one session (non-exclusive mode)",
        functions=("pg_start_backup", "pg_stop_backup", "pg_is_in_backup", "pg_backup_start_time"),
    ),
    _removed_extension("plpython2u", "15", "port the functions to plpython3u"),
    _removed_extension("plpythonu", "15", "port the functions to plpython3u"),
    _removed_setting("stats_temp_directory", "15", None, " (statistics live in shared memory)"),
    # -- 16 ---------------------------------------------------------------------------------------------
    _rule(
        "createrole_roles",
        "16",
        W,
        "from 16, a CREATEROLE role administers only the roles it created (and cannot grant what it lacks)",
        "createrole",
        "after the copy, GRANT role TO manager WITH ADMIN OPTION for the roles each CREATEROLE role manages",
    ),
    _removed_setting("force_parallel_mode", "16", "debug_parallel_query"),
    _removed_setting("vacuum_defer_cleanup_age", "16", "hot_standby_feedback or a replication slot"),
    _removed_setting("promote_trigger_file", "16", "pg_ctl promote or pg_promote()"),
    # -- 17 ---------------------------------------------------------------------------------------------
    _removed_column(
        "removed_column_pg_stat_bgwriter_checkpoints",
        "17",
        "pg_stat_bgwriter",
        (
            "checkpoints_timed",
            "checkpoints_req",
            "checkpoint_write_time",
            "checkpoint_sync_time",
            "buffers_checkpoint",
            "buffers_backend",
            "buffers_backend_fsync",
        ),
        "checkpoint columns moved to pg_stat_checkpointer (num_timed, num_requested, write_time, sync_time, "
        "buffers_written); backend writes are in pg_stat_io",
    ),
    _rule(
        "maintenance_search_path",
        "17",
        W,
        "from 17, ANALYZE, CREATE INDEX, REINDEX, REFRESH MATERIALIZED VIEW and VACUUM run functions with "
        "search_path = pg_catalog, pg_temp: index and materialized view functions that name objects "
        "unqualified fail",
        "maintenance_search_path",
        "ALTER FUNCTION ... SET search_path = <schema> on the source (or qualify the names in its body)",
    ),
    _removed_extension("adminpack", "17", "use pg_read_file/pg_write_file-free tooling (pgAdmin no longer needs it)"),
    _removed_setting("old_snapshot_threshold", "17", None),
    _removed_setting("db_user_namespace", "17", None),
    _removed_setting("trace_recovery_messages", "17", None),
    # -- 18 ---------------------------------------------------------------------------------------------
    _rule(
        "inheritance_vacuum",
        "18",
        I,
        "from 18, VACUUM and ANALYZE of an inheritance parent also process its children",
        "inheritance_parents",
        "write VACUUM ONLY / ANALYZE ONLY where maintenance jobs must touch the parent alone",
    ),
    _rule(
        "unlogged_partitioned",
        "18",
        I,
        "unlogged partitioned tables are not allowed from 18: the parent is created logged",
        "unlogged_partitioned",
        "nothing to restore differently (pg_dump drops UNLOGGED from the parent); create new partitions "
        "UNLOGGED explicitly, the parent's persistence is no longer inherited",
    ),
    # -- any upgrade: what the target installation offers ---------------------------------------------
    _rule(
        "extension_unavailable",
        None,
        E,
        "extensions installed on the source that the target cannot install",
        "extension_unavailable",
        "install the extension's package for the target's major (e.g. postgresql-18-<name> or contrib), or "
        "drop it on the source",
    ),
    _rule(
        "extension_version",
        None,
        I,
        "extensions whose installed version the target does not have: the target installs its own version",
        "extension_version",
        "read the extension's changelog between the two versions; run ALTER EXTENSION ... UPDATE where you "
        "need the same version on both sides",
    ),
    _rule(
        "reg_type_columns",
        None,
        W,
        "columns of reg* types store OIDs of catalog objects, which differ on the target",
        "column_type",
        "store the name (text) instead, or check that every referenced object exists on the target (text COPY "
        "carries names, and fails on a name the target lacks)",
        "https://www.postgresql.org/docs/current/datatype-oid.html",
        types=("regproc", "regprocedure", "regoper", "regoperator", "regconfig", "regdictionary", "regnamespace"),
    ),
    _rule(
        "unknown_setting",
        None,
        W,
        "settings set on the source that the target does not know",
        "unknown_setting",
        "remove or rename them in the target's configuration and in ALTER DATABASE/ROLE ... SET",
    ),
)

_BY_NAME = {r.name: r for r in RULES}
assert len(_BY_NAME) == len(RULES), "rule names must be unique"


def rule(name: str) -> Rule:
    """One rule by name."""
    return _BY_NAME[name]


def rules_for(source_num: int, target_num: int, rules: Iterable[Rule] = RULES) -> list[Rule]:
    """The rules an upgrade from source_num to target_num crosses."""
    return [r for r in rules if r.applies(source_num, target_num)]


def by_major(rules: Iterable[Rule] = RULES) -> dict[str, list[Rule]]:
    """The table keyed by the major where the behaviour changed ('any' last)."""
    table: dict[str, list[Rule]] = {}
    for r in sorted(rules, key=lambda r: r.since if r.since is not None else 1 << 30):
        table.setdefault(r.since_label, []).append(r)
    return table


def removed_settings(rules: Iterable[Rule] = RULES) -> set[str]:
    """Names of the settings a removed_setting rule covers (the unknown_setting rule leaves them to it)."""
    return {r.param("setting") for r in rules if r.kind == "removed_setting"}
