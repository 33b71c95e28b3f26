"""What a sampled read's text says about comparing its result: its fingerprint, order, and determinism.

Decided once per text with pglast (cached): the fingerprint groups a query's samples whatever its
literals; the ORDER BY keys say which output columns must come back in the same sequence; volatile or
environment functions, LIMIT without ORDER BY and catalog reads make the values legitimately differ
between two servers, so only the shape of such results (columns, row count) is compared.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.parser import fingerprint as pg_fingerprint
from pglast.visitors import Visitor

_CACHE_SIZE = 4096

# Functions whose value differs between two servers, or between two calls: the result's values say nothing
# about whether the target answers like the source.
VOLATILE_FUNCTIONS = frozenset(
    """
    random setseed now clock_timestamp statement_timestamp transaction_timestamp timeofday pg_sleep
    gen_random_uuid uuid_generate_v1 uuid_generate_v1mc uuid_generate_v4 txid_current txid_current_snapshot
    txid_current_if_assigned pg_current_xact_id pg_current_snapshot pg_backend_pid version inet_server_addr
    inet_server_port inet_client_addr inet_client_port pg_postmaster_start_time pg_conf_load_time
    pg_current_wal_lsn pg_current_xlog_location current_setting pg_database_size pg_relation_size
    pg_total_relation_size pg_table_size pg_indexes_size pg_size_pretty pg_stat_get_activity
    pg_is_in_recovery pg_last_wal_replay_lsn nextval currval lastval
    """.split()
)
_CATALOG_SCHEMAS = frozenset(["pg_catalog", "information_schema"])
_LITERALS = re.compile(r"'(?:[^']|'')*'|\b\d+(?:\.\d+)?\b")


@dataclass(frozen=True)
class ReadShape:
    """How a sampled read's result is compared."""

    fingerprint: str
    ordered: bool  # the query orders its rows (top-level ORDER BY)
    order_keys: tuple[str | int, ...] | None  # output column names or 1-based positions; None: not resolvable
    values_comparable: bool  # False: only columns and row count are compared
    why_shape_only: str | None  # why the values are not compared
    relations: tuple[str, ...]  # unqualified, lower-case names of the relations it reads
    parseable: bool


def fingerprint(sql: str) -> str:
    """pglast's fingerprint (equal for texts differing only in literals); a literal-free text hash otherwise."""
    return analyse(sql).fingerprint


@lru_cache(maxsize=_CACHE_SIZE)
def analyse(sql: str) -> ReadShape:
    """The comparison shape of one read statement."""
    try:
        fp = pg_fingerprint(sql)
        stmts = parse_sql(sql)
    except ParseError:
        # The target's grammar (PG 17 in pglast) rejects it; the source ran it. Compared as it comes.
        normal = " ".join(_LITERALS.sub("?", sql.lower()).split())
        return ReadShape("t" + hashlib.sha1(normal.encode()).hexdigest()[:15], False, None, True, None, (), False)
    if len(stmts) != 1 or stmts[0].stmt is None:
        return ReadShape(fp, False, None, False, "more than one statement", (), True)
    stmt = stmts[0].stmt
    walker = _Walker()
    walker(stmt)
    ordered = isinstance(stmt, ast.SelectStmt) and bool(stmt.sortClause)
    keys = _order_keys(stmt) if isinstance(stmt, ast.SelectStmt) and ordered else None
    why = None
    if walker.volatile:
        why = f"calls {sorted(walker.volatile)[0]}(), whose value differs between servers or calls"
    elif walker.catalog:
        why = "reads the system catalogs, which differ between majors"
    elif isinstance(stmt, ast.SelectStmt) and (stmt.limitCount or stmt.limitOffset) and not ordered:
        why = "LIMIT/OFFSET without ORDER BY picks any rows"
    return ReadShape(fp, ordered, keys, why is None, why, tuple(sorted(walker.relations)), True)


def _order_keys(stmt: ast.SelectStmt) -> tuple[str | int, ...] | None:
    """The ORDER BY items as output column names or positions; None when one is an expression."""
    keys: list[str | int] = []
    for item in stmt.sortClause or ():
        node = item.node
        if isinstance(node, ast.A_Const) and isinstance(node.val, ast.Integer):
            keys.append(int(node.val.ival or 0))
        elif isinstance(node, ast.ColumnRef) and node.fields and isinstance(node.fields[-1], ast.String):
            keys.append(node.fields[-1].sval or "")
        else:
            return None
    return tuple(keys)


class _Walker(Visitor):
    """Collects the relations read, volatile functions called and whether catalogs are read."""

    def __init__(self) -> None:
        self.relations: set[str] = set()
        self.volatile: set[str] = set()
        self.catalog = False

    def visit_RangeVar(self, _ancestors: object, node: ast.RangeVar) -> None:
        name = (node.relname or "").lower()
        self.relations.add(name)
        if (node.schemaname or "").lower() in _CATALOG_SCHEMAS or name.startswith("pg_"):
            self.catalog = True

    def visit_FuncCall(self, _ancestors: object, node: ast.FuncCall) -> None:
        name = node.funcname[-1].sval.lower() if node.funcname else ""
        if name in VOLATILE_FUNCTIONS:
            self.volatile.add(name)

    def visit_SQLValueFunction(self, _ancestors: object, node: ast.SQLValueFunction) -> None:
        # current_timestamp, localtime, current_user...: the clock or the login, not the data.
        self.volatile.add(node.op.name.removeprefix("SVFOP_").lower() if node.op is not None else "sql_value")
