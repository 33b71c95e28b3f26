"""Catalog queries of `pgleap check` (the pre-flight inventory), written per major (gates on Facts.version_num).

Each function returns one SELECT whose columns are named: upgrade/check/inspect.py keeps the rows as
dicts under those names, and the rules read nothing else, so a rule can be tested on hand-written rows
of a 9.x catalog (tests/test_check_rules.py) without a 9.x server.
"""

from __future__ import annotations

from pgleap.upgrade.compat.catalog import _SYSTEM_SCHEMAS, _not_extension_member
from pgleap.upgrade.compat.facts import PG10, PG11, PG12, PG91, PG94, Facts

_USER_NSP = _SYSTEM_SCHEMAS.replace("nspname", "n.nspname")


def _not_member(facts: Facts, alias: str, catalog: str) -> str:
    """The object `alias`.oid (in `catalog`) does not belong to an extension (pg_extension is 9.1+)."""
    if facts.version_num < PG91:
        return "true"
    return (
        f"NOT EXISTS (SELECT 1 FROM pg_depend dx WHERE dx.classid = '{catalog}'::regclass "
        f"AND dx.objid = {alias}.oid AND dx.deptype = 'e')"
    )


def relations_sql(facts: Facts) -> str:
    """User relations: schema, name, relkind, persistence, has_oids, owner."""
    # relhasoids went away in 12 together with WITH OIDS; relpersistence came in 9.1 (unlogged tables).
    has_oids = "c.relhasoids" if facts.version_num < PG12 else "false"
    persistence = "c.relpersistence::text" if facts.version_num >= PG91 else "'p'"
    return (
        f"SELECT n.nspname AS schema, c.relname AS name, c.relkind::text AS relkind, {persistence} AS persistence, "
        f"{has_oids} AS has_oids, pg_get_userbyid(c.relowner)::text AS owner "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c', 'S') AND {_USER_NSP} "
        f"AND {_not_extension_member(facts)} ORDER BY 1, 2"
    )


def columns_sql(facts: Facts) -> str:
    """Columns of user relations and composite types: where, the type, its element type and domain base type."""
    return (
        "SELECT n.nspname AS schema, c.relname AS relation, c.relkind::text AS relkind, a.attname AS column, "
        "t.typname AS type, tn.nspname AS type_schema, et.typname AS element_type, bt.typname AS base_type, "
        "format_type(a.atttypid, a.atttypmod) AS type_text "
        "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace tn ON tn.oid = t.typnamespace "
        "LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typlen = -1 "
        "LEFT JOIN pg_type bt ON bt.oid = t.typbasetype AND t.typtype = 'd' "
        "WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c') "
        f"AND {_USER_NSP} AND {_not_extension_member(facts)} ORDER BY 1, 2, a.attnum"
    )


def functions_sql(facts: Facts) -> str:
    """User functions: schema, name, identity arguments, result, kind (f/a/w/p), language, body, proconfig."""
    # prokind replaced proisagg/proiswindow in 11.
    if facts.version_num >= PG11:
        kind = "p.prokind::text"
    else:
        kind = "CASE WHEN p.proisagg THEN 'a' WHEN p.proiswindow THEN 'w' ELSE 'f' END"
    return (
        "SELECT n.nspname AS schema, p.proname AS name, pg_get_function_identity_arguments(p.oid) AS args, "
        f"pg_get_function_result(p.oid) AS result, {kind} AS kind, l.lanname AS language, p.prosrc AS body, "
        "p.proconfig::text[] AS config "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang "
        f"WHERE {_USER_NSP} AND {_not_member(facts, 'p', 'pg_proc')} ORDER BY 1, 2, 3"
    )


def views_sql(facts: Facts) -> str:
    """Views and materialized views: schema, name, relkind, definition."""
    return (
        "SELECT n.nspname AS schema, c.relname AS name, c.relkind::text AS relkind, "
        "pg_get_viewdef(c.oid) AS definition "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE c.relkind IN ('v', 'm') AND {_USER_NSP} AND {_not_extension_member(facts)} ORDER BY 1, 2"
    )


def operators_sql(facts: Facts) -> str:
    """User operators: schema, name, kind (b/l/r), left and right types (NULL when none), implementing function."""
    return (
        "SELECT n.nspname AS schema, o.oprname AS name, o.oprkind::text AS kind, "
        "CASE WHEN o.oprleft = 0 THEN NULL ELSE format_type(o.oprleft, NULL) END AS left_type, "
        "CASE WHEN o.oprright = 0 THEN NULL ELSE format_type(o.oprright, NULL) END AS right_type, "
        "o.oprcode::regprocedure::text AS function "
        "FROM pg_operator o JOIN pg_namespace n ON n.oid = o.oprnamespace "
        f"WHERE {_USER_NSP} AND {_not_member(facts, 'o', 'pg_operator')} ORDER BY 1, 2"
    )


def aggregates_sql(facts: Facts) -> str:
    """User aggregates: schema, name, args, and the support functions as regprocedure text ('-' for none)."""
    support = ["a.aggtransfn", "a.aggfinalfn"]
    if facts.version_num >= PG94:  # moving-aggregate support functions came in 9.4
        support += ["a.aggmtransfn", "a.aggminvtransfn", "a.aggmfinalfn"]
    functions = ", ".join(f"{f}::regprocedure::text" for f in support)
    return (
        "SELECT n.nspname AS schema, p.proname AS name, pg_get_function_identity_arguments(p.oid) AS args, "
        f"ARRAY[{functions}] AS functions "
        "FROM pg_aggregate a JOIN pg_proc p ON p.oid = a.aggfnoid JOIN pg_namespace n ON n.oid = p.pronamespace "
        f"WHERE {_USER_NSP} AND {_not_member(facts, 'p', 'pg_proc')} ORDER BY 1, 2"
    )


def extensions_sql(facts: Facts) -> str | None:
    """Installed extensions: name, version, schema; None before 9.1 (no extensions)."""
    if facts.version_num < PG91:
        return None
    return (
        "SELECT e.extname AS name, e.extversion AS version, n.nspname AS schema "
        "FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace ORDER BY 1"
    )


def available_extensions_sql() -> str:
    """Extensions a server can install (its share/extension): name, versions (text[]); 9.1+."""
    return "SELECT name, array_agg(version::text) AS versions FROM pg_available_extension_versions GROUP BY name"


def roles_sql(facts: Facts, *, read_passwords: bool) -> str:
    """Roles: name, superuser, createrole, login, password kind (md5, scram-sha-256, plain, none; NULL: unknown)."""
    # Built-in roles (pg_monitor, ... from 10) are not the DBA's; pg_authid needs a superuser.
    builtin = "rolname !~ '^pg_'" if facts.version_num >= PG10 else "true"
    if read_passwords:
        kind = (
            "CASE WHEN rolpassword IS NULL THEN 'none' WHEN rolpassword LIKE 'md5%' THEN 'md5' "
            "WHEN rolpassword LIKE 'SCRAM-SHA-256$%' THEN 'scram-sha-256' ELSE 'plain' END"
        )
        source = "pg_authid"
    else:
        kind, source = "NULL::text", "pg_roles"
    return (
        f"SELECT rolname AS name, rolsuper AS superuser, rolcreaterole AS createrole, rolcanlogin AS login, "
        f"{kind} AS password FROM {source} WHERE {builtin} ORDER BY 1"
    )


def settings_sql() -> str:
    """Every setting as this session sees it: name, setting, boot_val, reset_val, source (pg_settings, 8.4+)."""
    return "SELECT name, setting, boot_val, reset_val, source FROM pg_settings ORDER BY 1"


def db_role_settings_sql() -> str:
    """ALTER DATABASE/ROLE ... SET of this database or of every database: database, role, settings (9.0+)."""
    return (
        "SELECT d.datname AS database, r.rolname AS role, s.setconfig::text[] AS settings "
        "FROM pg_db_role_setting s LEFT JOIN pg_database d ON d.oid = s.setdatabase "
        "LEFT JOIN pg_roles r ON r.oid = s.setrole "
        "WHERE s.setdatabase = 0 OR d.datname = current_database() ORDER BY 1, 2"
    )


def inheritance_parents_sql() -> str:
    """Tables with inheritance children (not partitioned tables): schema, name, number of children."""
    return (
        "SELECT n.nspname AS schema, c.relname AS name, count(*)::int AS children "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE c.relkind = 'r' AND {_USER_NSP} GROUP BY 1, 2 ORDER BY 1, 2"
    )


def maintenance_functions_sql() -> str:
    """User SQL-level functions that indexes and materialized views call: the object, the function, its body."""
    # An index depends on its expression's functions directly; a materialized view through its _RETURN rule.
    return (
        "SELECT DISTINCT cn.nspname AS schema, c.relname AS name, c.relkind::text AS relkind, "
        "pn.nspname AS function_schema, p.proname AS function, l.lanname AS language, p.prosrc AS body, "
        "p.proconfig::text[] AS config "
        "FROM pg_depend d LEFT JOIN pg_rewrite rw ON d.classid = 'pg_rewrite'::regclass AND rw.oid = d.objid "
        "JOIN pg_class c ON c.oid = CASE WHEN d.classid = 'pg_class'::regclass THEN d.objid ELSE rw.ev_class END "
        "JOIN pg_namespace cn ON cn.oid = c.relnamespace "
        "JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND p.oid = d.refobjid "
        "JOIN pg_namespace pn ON pn.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang "
        "WHERE d.classid IN ('pg_class'::regclass, 'pg_rewrite'::regclass) AND c.relkind IN ('i', 'm') "
        "AND pn.nspname NOT IN ('pg_catalog', 'information_schema') AND l.lanname NOT IN ('c', 'internal') "
        "ORDER BY 1, 2, 4, 5"
    )


def database_sql() -> str:
    """The checked database: name, encoding, collate, ctype, owner."""
    return (
        "SELECT datname AS name, pg_encoding_to_char(encoding) AS encoding, datcollate::text AS collate, "
        "datctype::text AS ctype, pg_get_userbyid(datdba)::text AS owner "
        "FROM pg_database WHERE datname = current_database()"
    )


def is_superuser_sql() -> str:
    """Whether the logged-in role may read pg_authid."""
    return "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"


def default_extension_versions_sql() -> str:
    """The version CREATE EXTENSION installs, per available extension: name, default_version (9.1+)."""
    return "SELECT name, default_version FROM pg_available_extensions"
