"""Version adapters: rewrite rules for statements sent to another major (renamed functions, columns, settings).

Rules are data (`ADAPTERS`): each names the major where the name changed, the old and new names, and so
works in both directions. `adapt(sql, from_num, to_num)` rewrites a statement written for one major into
the other's names, on pglast's AST. A statement no rule touches comes back byte for byte (the common case,
cached by text). Not wired into the proxy yet: see docs/check.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.stream import RawStream
from pglast.visitors import Visitor

from pgleap.upgrade.compat.facts import PG10, PG92

PG16 = 160000


@dataclass(frozen=True)
class Adapter:
    """One renaming: `old` before major `since`, `new` from it. kind: function, column (of `relation`), setting."""

    name: str
    since: int
    kind: str
    old: str
    new: str
    relation: str | None = None


_XLOG = {
    "pg_current_xlog_location": "pg_current_wal_lsn",
    "pg_current_xlog_insert_location": "pg_current_wal_insert_lsn",
    "pg_current_xlog_flush_location": "pg_current_wal_flush_lsn",
    "pg_last_xlog_receive_location": "pg_last_wal_receive_lsn",
    "pg_last_xlog_replay_location": "pg_last_wal_replay_lsn",
    "pg_xlog_location_diff": "pg_wal_lsn_diff",
    "pg_xlogfile_name": "pg_walfile_name",
    "pg_xlogfile_name_offset": "pg_walfile_name_offset",
    "pg_switch_xlog": "pg_switch_wal",
    "pg_xlog_replay_pause": "pg_wal_replay_pause",
    "pg_xlog_replay_resume": "pg_wal_replay_resume",
    "pg_is_xlog_replay_paused": "pg_is_wal_replay_paused",
}

ADAPTERS: tuple[Adapter, ...] = (
    Adapter("pg_stat_activity_pid", PG92, "column", "procpid", "pid", "pg_stat_activity"),
    Adapter("pg_stat_activity_query", PG92, "column", "current_query", "query", "pg_stat_activity"),
    *(
        Adapter(f"pg_stat_replication_{c}", PG10, "column", f"{c}_location", f"{c}_lsn", "pg_stat_replication")
        for c in ("sent", "write", "flush", "replay")
    ),
    *(Adapter(f"xlog_{old}", PG10, "function", old, new) for old, new in _XLOG.items()),
    Adapter("force_parallel_mode", PG16, "setting", "force_parallel_mode", "debug_parallel_query"),
)


def _crossing(from_num: int, to_num: int) -> dict[tuple[str, str | None, str], str]:
    """(kind, relation, name) -> replacement for the rules between the two majors, in the right direction."""
    table: dict[tuple[str, str | None, str], str] = {}
    for a in ADAPTERS:
        if from_num < a.since <= to_num:
            table[(a.kind, a.relation, a.old)] = a.new
        elif to_num < a.since <= from_num:
            table[(a.kind, a.relation, a.new)] = a.old  # rollback: the target's name back to the source's
    return table


class _Rewriter(Visitor):
    def __init__(self, table: dict[tuple[str, str | None, str], str]) -> None:
        self.table = table
        self.changed = False
        self.aliases: dict[str, str] = {}  # alias or name -> catalog relation, from the statement's FROMs

    def visit_RangeVar(self, _ancestors: object, node: ast.RangeVar) -> None:
        name = (node.relname or "").lower()
        self.aliases[name] = name
        if node.alias is not None and node.alias.aliasname:
            self.aliases[node.alias.aliasname.lower()] = name

    def visit_FuncCall(self, _ancestors: object, node: ast.FuncCall) -> None:
        funcname = node.funcname or ()
        if not funcname:
            return
        new = self.table.get(("function", None, (funcname[-1].sval or "").lower()))
        if new is not None:
            node.funcname = (*funcname[:-1], ast.String(sval=new))
            self.changed = True

    def visit_VariableSetStmt(self, _ancestors: object, node: ast.VariableSetStmt) -> None:
        new = self.table.get(("setting", None, (node.name or "").lower()))
        if new is not None:
            node.name = new
            self.changed = True

    def visit_VariableShowStmt(self, _ancestors: object, node: ast.VariableShowStmt) -> None:
        new = self.table.get(("setting", None, (node.name or "").lower()))
        if new is not None:
            node.name = new
            self.changed = True

    def rename_columns(self, tree: tuple[ast.Node, ...]) -> None:
        relations = set(self.aliases.values())
        for node in _column_refs(tree):
            fields = node.fields
            if not fields or not isinstance(fields[-1], ast.String):
                continue
            column = (fields[-1].sval or "").lower()
            if len(fields) >= 2 and isinstance(fields[-2], ast.String):
                qualifier = (fields[-2].sval or "").lower()
                owners = {self.aliases.get(qualifier, qualifier)}
            else:
                owners = relations  # unqualified: any catalog relation the statement reads
            for owner in owners:
                new = self.table.get(("column", owner, column))
                if new is not None:
                    node.fields = (*fields[:-1], ast.String(sval=new))
                    self.changed = True
                    break


class _ColumnRefs(Visitor):
    def __init__(self) -> None:
        self.found: list[ast.ColumnRef] = []

    def visit_ColumnRef(self, _ancestors: object, node: ast.ColumnRef) -> None:
        self.found.append(node)


def _column_refs(tree: tuple[ast.Node, ...]) -> list[ast.ColumnRef]:
    refs = _ColumnRefs()
    refs(tree)
    return refs.found


@lru_cache(maxsize=4096)
def adapt(sql: str, from_num: int, to_num: int) -> str:
    """`sql`, written for server_version_num from_num, with the names of to_num; unchanged if nothing applies."""
    table = _crossing(from_num, to_num)
    lowered = sql.lower()
    if not table or not any(key[2] in lowered for key in table):
        return sql  # the hot path: no name of any rule occurs in the text
    try:
        tree = parse_sql(sql)
    except ParseError:
        return sql  # the target will say what it thinks of it; nothing we can rewrite safely
    rewriter = _Rewriter(table)
    rewriter(tree)
    rewriter.rename_columns(tree)
    if not rewriter.changed:
        return sql
    return "; ".join(RawStream()(s) for s in tree)
