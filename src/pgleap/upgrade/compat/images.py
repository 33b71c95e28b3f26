"""Catalog queries behind row images: which tables capture may add a RETURNING clause to, per major."""

from __future__ import annotations

from pgleap.upgrade.compat.facts import PG10, PG12, PG95, Facts

_USER_TABLES = (
    "c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp_'"
)


def image_columns_sql(facts: Facts) -> str:
    """Every column of every user table, in attnum order, with what a row image needs to know of it.

    Columns: schema, table, has rules, row security, column, generated, identity always, base type name,
    base type's typtype, element type name (arrays), part of the primary key.
    """
    rls = "c.relrowsecurity" if facts.version_num >= PG95 else "false"
    generated = "a.attgenerated <> ''" if facts.version_num >= PG12 else "false"
    identity = "a.attidentity = 'a'" if facts.version_num >= PG10 else "false"
    return (
        f"SELECT n.nspname::text, c.relname::text, c.relhasrules, {rls}, a.attname::text, {generated}, "
        f"{identity}, coalesce(bt.typname, t.typname)::text, coalesce(bt.typtype, t.typtype)::text, "
        f"et.typname::text, coalesce(a.attnum = ANY (i.indkey), false) "
        f"FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        f"JOIN pg_type t ON t.oid = a.atttypid "
        f"LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype "
        f"LEFT JOIN pg_type et ON et.oid = coalesce(bt.typelem, t.typelem) "
        f"AND coalesce(bt.typlen, t.typlen) = -1 AND coalesce(bt.typelem, t.typelem) <> 0 "
        f"LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary "
        f"WHERE {_USER_TABLES} ORDER BY 1, 2, a.attnum"
    )


def image_readers_sql() -> str:
    """(schema, table, role) for every login role that may SELECT the table: RETURNING needs that privilege."""
    return (
        "SELECT n.nspname::text, c.relname::text, r.rolname::text "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace CROSS JOIN pg_roles r "
        f"WHERE r.rolcanlogin AND {_USER_TABLES} AND has_table_privilege(r.oid, c.oid, 'SELECT')"
    )


def image_inherits_sql() -> str:
    """(parent table name, child table name) for every inheritance or partition link between user tables."""
    return (
        "SELECT p.relname::text, c.relname::text FROM pg_inherits i "
        "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_class c ON c.oid = i.inhrelid"
    )
