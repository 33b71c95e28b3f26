"""Catalog queries the copy needs, written per major (gates on Facts.version_num)."""

from __future__ import annotations

from pgleap.upgrade.compat.facts import PG10, PG12, PG91, PG93, Facts

# Schema pgleap holds replay's bookkeeping (the applied position), on the target and, after a cutover, on
# the source: never user data, so never copied, verified or compared.
_SYSTEM_SCHEMAS = (
    "nspname NOT IN ('pg_catalog', 'information_schema', 'pgleap') AND nspname !~ '^pg_toast' "
    "AND nspname !~ '^pg_temp_'"
)


def _not_extension_member(facts: Facts, alias: str = "c") -> str:
    # Tables created by an extension come back with CREATE EXTENSION, except its configuration
    # tables (extconfig), whose rows pg_dump copies too; pg_extension exists from 9.1.
    if facts.version_num < PG91:
        return "true"
    return (
        f"(NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass "
        f"AND d.objid = {alias}.oid AND d.deptype = 'e') "
        f"OR EXISTS (SELECT 1 FROM pg_extension e WHERE {alias}.oid = ANY (e.extconfig)))"
    )


def tables_sql(facts: Facts) -> str:
    """Tables holding rows: schema, name, oid, persistence, pages, reltuples, is_partition, has_children."""
    partition = "c.relispartition" if facts.version_num >= PG10 else "false"
    persistence = "c.relpersistence" if facts.version_num >= PG91 else "'p'::\"char\""
    return (
        f"SELECT n.nspname, c.relname, c.oid::bigint, {persistence}::text, c.relpages::bigint, "
        f"greatest(c.reltuples, 0)::float8, {partition}, "
        f"EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = c.oid) "
        f"FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        # relkind 'p' (partitioned parents) have no rows of their own; their leaves are copied.
        f"WHERE c.relkind = 'r' AND {_SYSTEM_SCHEMAS} AND {_not_extension_member(facts)} "
        f"ORDER BY c.relpages DESC, n.nspname, c.relname"
    )


def columns_sql(facts: Facts) -> str:
    """Columns of table oid $1 that COPY carries: name, type, type schema, element type (arrays)."""
    generated = "AND a.attgenerated = ''" if facts.version_num >= PG12 else ""
    return (
        "SELECT a.attname, t.typname, tn.nspname, et.typname "
        "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "JOIN pg_namespace tn ON tn.oid = t.typnamespace "
        "LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typlen = -1 AND t.typcategory = 'A' "
        f"WHERE a.attrelid = $1::bigint::oid AND a.attnum > 0 AND NOT a.attisdropped {generated} "
        "ORDER BY a.attnum"
    )


def defaults_sql(facts: Facts) -> str:
    """Column defaults a write may have the server compute: "schema.table", the default's text (a domain's
    too; NULL for an identity column). Generated columns are left out: immutable, computed from the row."""
    generated = "AND a.attgenerated = '' " if facts.version_num >= PG12 else ""
    sql = (
        "SELECT n.nspname || '.' || c.relname, pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d "
        "JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum "
        "JOIN pg_class c ON c.oid = d.adrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE NOT a.attisdropped {generated}AND {_SYSTEM_SCHEMAS}"
    )
    # A domain's default, for a column of that domain without one of its own.
    sql += (
        " UNION ALL SELECT n.nspname || '.' || c.relname, t.typdefault FROM pg_attribute a "
        "JOIN pg_type t ON t.oid = a.atttypid JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE t.typtype = 'd' AND t.typdefault IS NOT NULL AND a.attnum > 0 AND NOT a.attisdropped "
        "AND NOT a.atthasdef AND c.relkind IN ('r', 'p') "
        f"AND {_SYSTEM_SCHEMAS}"
    )
    if facts.version_num >= PG10:  # identity columns
        sql += (
            " UNION ALL SELECT n.nspname || '.' || c.relname, NULL FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE a.attidentity <> '' AND NOT a.attisdropped AND {_SYSTEM_SCHEMAS}"
        )
    return sql


def volatile_functions_sql() -> str:
    """Names of the volatile functions outside pg_catalog (users' and extensions'), the same in every version."""
    return (
        "SELECT DISTINCT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE p.provolatile = 'v' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
    )


def cascading_foreign_keys_sql() -> str:
    """Foreign keys whose action changes the referencing table when the referenced one is written (ON DELETE or
    ON UPDATE CASCADE, SET NULL, SET DEFAULT): "schema.table" referenced, "schema.table" referencing. The same
    in every version."""
    return (
        "SELECT DISTINCT pn.nspname || '.' || p.relname, rn.nspname || '.' || r.relname FROM pg_constraint k "
        "JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace "
        "JOIN pg_class r ON r.oid = k.conrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace "
        "WHERE k.contype = 'f' AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))"
    )


def ruled_relations_sql() -> str:
    """ "schema.table" of every relation with an enabled rule of its own (a view's _RETURN rule is not one),
    the same in every version."""
    return (
        "SELECT DISTINCT n.nspname || '.' || c.relname FROM pg_rewrite r "
        "JOIN pg_class c ON c.oid = r.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE r.rulename <> '_RETURN' AND r.ev_enabled <> 'D'"
    )


def non_volatile_functions_sql() -> str:
    """Names of functions with no volatile overload in any schema (such a function cannot write), the same in
    every version."""
    return "SELECT proname FROM pg_proc GROUP BY proname HAVING bool_and(provolatile <> 'v')"


def inheritors_sql() -> str:
    """The relations named $1 ("schema.name", or a bare name in any schema; temporary ones left out) and every
    table inheriting from them or one of their partitions, at any depth: oid, relkind, whether $1 names it
    itself. The same in every version."""
    return (
        "WITH RECURSIVE tree(oid, named) AS (SELECT c.oid, true FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE (c.relname = $1::text OR n.nspname || '.' || c.relname = $1::text) "
        "AND n.nspname !~ '^pg_(toast_)?temp_' AND c.relkind IN ('r', 'p', 'v', 'f', 'm') "
        "UNION SELECT i.inhrelid, false FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid) "
        "SELECT t.oid::bigint, c.relkind::text, t.named FROM tree t JOIN pg_class c ON c.oid = t.oid"
    )


def primary_key_sql(facts: Facts) -> str:
    """Primary key columns of table oid $1 (name, type name), in key order."""
    del facts  # pg_index.indkey / indisprimary are the same from 9.0 on; no LATERAL/ORDINALITY (9.3/9.4)
    return (
        "SELECT a.attname, t.typname FROM pg_index i, generate_series(0, i.indnatts - 1) AS s(n), "
        "pg_attribute a, pg_type t WHERE i.indrelid = $1::bigint::oid AND i.indisprimary "
        "AND a.attrelid = i.indrelid AND a.attnum = i.indkey[s.n] AND t.oid = a.atttypid ORDER BY s.n"
    )


def sequences_sql(facts: Facts) -> str:
    """Sequences: schema, name."""
    return (
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE c.relkind = 'S' AND {_SYSTEM_SCHEMAS} AND {_not_extension_member(facts)} "
        "ORDER BY 1, 2"
    )


def sequence_value_sql(qualified_name: str) -> str:
    """last_value and is_called of one sequence; the relation itself answers on every major."""
    return f"SELECT last_value, is_called FROM {qualified_name}"


def matviews_sql(facts: Facts) -> str | None:
    """Populated materialized views (schema, name), or None before 9.3."""
    if facts.version_num < PG93:
        return None
    return (
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE c.relkind = 'm' AND c.relispopulated AND {_SYSTEM_SCHEMAS} ORDER BY 1, 2"
    )


def large_objects_sql(facts: Facts) -> str:
    """Large objects: oid and owner name."""
    del facts  # pg_largeobject_metadata exists from 9.0, the oldest source we support
    return (
        "SELECT m.oid::bigint, r.rolname FROM pg_largeobject_metadata m "
        "JOIN pg_roles r ON r.oid = m.lomowner ORDER BY m.oid"
    )


def large_object_data_sql(facts: Facts) -> str:
    """The bytes of large object $1 (server-side functions, so it works inside the snapshot)."""
    del facts
    # lo_get is 9.4+; the page table is readable by superusers on every major and stays in the snapshot.
    return (
        "SELECT coalesce(string_agg(data, ''::bytea ORDER BY pageno), ''::bytea)"
        " FROM pg_largeobject WHERE loid = $1::bigint::oid"
    )


def key_bounds_sql(qualified_name: str, column: str) -> str:
    """min and max of an integer key column."""
    return f"SELECT min({column})::bigint, max({column})::bigint FROM ONLY {qualified_name}"


def session_settings(facts: Facts) -> dict[str, str]:
    """Settings for reading sessions so text output round-trips exactly into the target."""
    settings = {"DateStyle": "ISO", "extra_float_digits": "3", "TimeZone": "UTC"}
    if facts.version_num >= 80400:
        settings["IntervalStyle"] = "postgres"
    if facts.has_hex_bytea:
        settings["bytea_output"] = "hex"
    return settings


def is_superuser_sql() -> str:
    """Whether the logged-in role is a superuser."""
    return "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"


def in_recovery_sql() -> str:
    """Whether the server is a standby."""
    return "SELECT pg_is_in_recovery()"


def postmaster_start_sql() -> str:
    """When the server started (text), to notice a restart between two runs."""
    return "SELECT pg_postmaster_start_time()::text"
