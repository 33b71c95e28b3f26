"""Version adapters: rewrite rules for statements sent to another major (renamed functions, columns, settings).

Rules are data (`ADAPTERS`, and the user's from `[auto_upgrade.adapters]`): each names the major where the
name changed, the old and new names, and so works in both directions. `VersionAdapter.adapt(sql, from_num,
to_num)` rewrites a statement written for one major into the other's names, on pglast's AST; `adapter_for`
builds the one an upgrade's config asks for. A statement no rule touches comes back byte for byte (the
common case, cached by text). Used by replay (replay/applier.py, both directions) and, once clients are on
the target, by the capture path for what they send (capture/forwarding.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase
from functools import lru_cache

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.stream import RawStream
from pglast.visitors import Visitor

from pgleap.config.schema import AdapterRule, AdaptersConfig, UpgradeConfig
from pgleap.upgrade.compat.facts import PG10, PG92

PG16 = 160000
KINDS = ("function", "column", "setting")
_CACHE_SIZE = 4096

# The rules' data form is the config's (a user rule and a built-in one are the same record).
Adapter = AdapterRule


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


def builtin_names() -> list[str]:
    """The names of the built-in rules, in table order."""
    return [a.name for a in ADAPTERS]


def select_builtin(enable: Iterable[str], disable: Iterable[str] = ()) -> tuple[Adapter, ...]:
    """The built-in rules matched by a name or glob of `enable` and by none of `disable`."""
    on, off = tuple(enable), tuple(disable)
    for pattern in (*on, *off):
        if not any(fnmatchcase(a.name, pattern) for a in ADAPTERS):
            raise ValueError(f"no built-in rule matches {pattern!r}; the rules are {', '.join(builtin_names())}")
    return tuple(
        a for a in ADAPTERS if any(fnmatchcase(a.name, p) for p in on) and not any(fnmatchcase(a.name, p) for p in off)
    )


def _crossing(rules: Iterable[Adapter], from_num: int, to_num: int) -> dict[tuple[str, str | None, str], str]:
    """(kind, relation, name) -> replacement for the rules between the two majors, in the right direction."""
    table: dict[tuple[str, str | None, str], str] = {}
    for a in rules:
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


class VersionAdapter:
    """A set of rename rules, applied to statements crossing from one major to another (either way)."""

    def __init__(self, rules: Iterable[Adapter]) -> None:
        self.rules = tuple(rules)
        self._tables: dict[tuple[int, int], dict[tuple[str, str | None, str], str]] = {}
        self._cached = lru_cache(maxsize=_CACHE_SIZE)(self._adapt)

    def adapt(self, sql: str, from_num: int, to_num: int) -> str:
        """`sql`, written for server_version_num from_num, with the names of to_num; unchanged if nothing applies."""
        return self._cached(sql, from_num, to_num)

    def _table(self, from_num: int, to_num: int) -> dict[tuple[str, str | None, str], str]:
        table = self._tables.get((from_num, to_num))
        if table is None:
            table = self._tables[(from_num, to_num)] = _crossing(self.rules, from_num, to_num)
        return table

    def _adapt(self, sql: str, from_num: int, to_num: int) -> str:
        table = self._table(from_num, to_num)
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


BUILTIN = VersionAdapter(ADAPTERS)


def adapt(sql: str, from_num: int, to_num: int) -> str:
    """`sql` rewritten by every built-in rule (see VersionAdapter.adapt)."""
    return BUILTIN.adapt(sql, from_num, to_num)


@lru_cache(maxsize=64)
def _adapter_for(config: AdaptersConfig) -> VersionAdapter:
    return VersionAdapter((*select_builtin(config.enable, config.disable), *config.rules))


def adapter_for(upgrade: UpgradeConfig) -> VersionAdapter:
    """The adapter `[auto_upgrade.adapters]` of this upgrade asks for (one per distinct config, so one cache)."""
    return _adapter_for(upgrade.adapters)
