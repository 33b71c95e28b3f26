"""The workload check: each distinct query, planned on the target (and on the source), never executed.

Every query runs in its own READ ONLY transaction that is always rolled back: statements without
parameters are EXPLAINed (parsed, analysed and planned), statements with $n parameters are prepared
(Parse: parsed and analysed, as a driver would). SET/SHOW/RESET run as they are, inside that transaction.
Other utility statements (DDL, COPY, VACUUM, transaction control) are listed as not checked: running them
would change something. The same is done on the source, so that a query that already fails there is
reported apart from those the upgrade breaks.

Writes (INSERT/UPDATE/DELETE/MERGE) take the same path: PostgreSQL checks read-only-ness in the executor
and skips it for EXPLAIN without ANALYZE, so they are planned there too. READ ONLY is kept on purpose: the
planner folds IMMUTABLE functions with constant arguments, i.e. runs user code, and a rollback would not
undo what such a function does to a sequence; read-only makes it fail instead (docs/check.md).

Before any data is copied, the target has no schema yet: `trial_schema` restores the source's schema
(the target's pg_dump, --schema-only, no owners or privileges) into a scratch database on the target,
whose rejected objects are themselves reported; the queries run there; the scratch database is dropped.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
from pglast import ast, parse_sql
from pglast.parser import ParseError, split
from pglast.visitors import Visitor

from pgleap.config import ServerConfig
from pgleap.upgrade.check.model import QueryResult, RestoreRejection
from pgleap.upgrade.compat.facts import facts_for
from pgleap.upgrade.verify.fingerprint import fingerprint

STATEMENT_TIMEOUT_MS = 5000
_PARAM = re.compile(r"\$\d+")
_EXPLAINABLE = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
_SESSION = (ast.VariableSetStmt, ast.VariableShowStmt)


def read_queries(path: Path) -> list[str]:
    """Statements of a file: a SQL script (split on ';' by the scanner, so old syntax splits too)."""
    text = path.read_text()
    return [s.strip() for s in split(text, with_parser=False) if s.strip()]


Queries = Iterable[str | tuple[str, int]]  # texts, or (text, how many times it ran) as the console counts them


def distinct(queries: Queries) -> list[tuple[str, int]]:
    """One text per fingerprint (the first seen) and how many texts it stands for, in first-seen order."""
    first: dict[str, str] = {}
    counts: dict[str, int] = {}
    for item in queries:
        sql, n = (item, 1) if isinstance(item, str) else item
        fp = fingerprint(sql)
        first.setdefault(fp, sql)
        counts[fp] = counts.get(fp, 0) + n
    return [(sql, counts[fp]) for fp, sql in first.items()]


class _Params(Visitor):
    def __init__(self) -> None:
        self.found = False

    def visit_ParamRef(self, _ancestors: object, node: ast.ParamRef) -> None:
        self.found = True


@dataclass(frozen=True)
class _Plan:
    how: str  # explain, prepare, execute, skipped
    why: str = ""


def plan(sql: str) -> _Plan:
    """How to check one statement without changing anything."""
    try:
        statements = parse_sql(sql)
    except ParseError:
        # Our grammar (pglast's) rejects it, yet the source ran it: old syntax. EXPLAIN it anyway: the
        # target gives the authoritative answer, the source says whether it ever worked.
        return _Plan("prepare" if _PARAM.search(sql) else "explain")
    if len(statements) != 1 or statements[0].stmt is None:
        return _Plan("skipped", "more than one statement")
    stmt = statements[0].stmt
    if isinstance(stmt, _EXPLAINABLE):
        params = _Params()
        params(stmt)
        return _Plan("prepare" if params.found else "explain")
    if isinstance(stmt, _SESSION):
        return _Plan("execute")
    if isinstance(stmt, ast.TransactionStmt):
        return _Plan("skipped", "transaction control")
    return _Plan("skipped", f"utility statement ({type(stmt).__name__}); running it would change something")


async def _try(conn: asyncpg.Connection, sql: str, how: str) -> asyncpg.PostgresError | None:
    """Run one check in a rolled-back READ ONLY transaction; the error, or None."""
    await conn.execute("BEGIN READ ONLY")
    try:
        await conn.execute(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
        if how == "explain":
            await conn.execute(f"EXPLAIN {sql}")
        elif how == "prepare":
            await conn.prepare(sql)
        else:
            await conn.execute(sql)
        return None
    except asyncpg.PostgresError as exc:
        return exc
    finally:
        await conn.execute("ROLLBACK")


def _message(exc: asyncpg.PostgresError) -> str:
    return str(getattr(exc, "message", None) or exc)


async def check_workload(source: asyncpg.Connection, target: asyncpg.Connection, queries: Queries) -> list[QueryResult]:
    """Every distinct query's result: ok, fails (on the target only), fails_on_source_too, skipped."""
    results = []
    for sql, count in distinct(queries):
        p = plan(sql)
        if p.how == "skipped":
            results.append(QueryResult(sql, "skipped", "skipped", error=p.why, count=count))
            continue
        on_target = await _try(target, sql, p.how)
        if on_target is None:
            results.append(QueryResult(sql, "ok", p.how, count=count))
            continue
        on_source = await _try(source, sql, p.how)
        status = "fails_on_source_too" if on_source is not None else "fails"
        results.append(
            QueryResult(
                sql,
                status,
                p.how,
                sqlstate=on_target.sqlstate,
                error=_message(on_target),
                source_error=_message(on_source) if on_source is not None else None,
                count=count,
            )
        )
    return results


@dataclass
class TrialSchema:
    """A scratch database on the target holding the source's schema (no data)."""

    target: ServerConfig  # pointing at the scratch database
    rejected: list[RestoreRejection]


async def trial_schema(source: ServerConfig, target: ServerConfig, bindir: Path | None = None) -> TrialSchema:
    """Restore the source's schema into a new scratch database on the target; its rejected objects."""
    import tempfile

    from pgleap.upgrade.copy.schema import dump_schema, parse_restore_errors
    from pgleap.upgrade.copy.tools import conninfo, find_tool, run_tool, tool_env

    admin = await asyncpg.connect(
        host=target.host, port=target.port, user=target.user, password=target.password, database=target.database
    )
    try:
        target_major = int(await admin.fetchval("SHOW server_version_num")) // 10000
        name = f"pgleap_check_{uuid.uuid4().hex[:12]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    scratch = replace(target, database=name)
    try:
        pg_dump = find_tool("pg_dump", target_major, bindir)
        pg_restore = find_tool("pg_restore", target_major, bindir)
        with tempfile.TemporaryDirectory(prefix="pgleap-check-") as tmp:
            dump = Path(tmp) / "schema.dump"
            await dump_schema(pg_dump, source, dump, [])
            # Owners and grants name roles the target may not have yet: not what this trial is about.
            argv = [str(pg_restore), "-w", "--no-owner", "--no-privileges", "-d", conninfo(scratch), str(dump)]
            result = await run_tool(argv, tool_env(scratch))
        records, _fatal = parse_restore_errors(result.stderr, "schema")
    except BaseException:
        await drop_trial(scratch, target)
        raise
    # The ERROR line says it; LINE/caret/HINT lines are in the definition the DBA has anyway.
    rejected = [RestoreRejection(r.object, r.error.split("\n", 1)[0]) for r in records]
    return TrialSchema(scratch, rejected)


async def drop_trial(scratch: ServerConfig, target: ServerConfig) -> None:
    """Drop the scratch database."""
    admin = await asyncpg.connect(
        host=target.host, port=target.port, user=target.user, password=target.password, database=target.database
    )
    try:
        facts = facts_for(int(await admin.fetchval("SHOW server_version_num")))
        await admin.execute(facts.drop_database_sql(f'"{scratch.database}"'))
    finally:
        await admin.close()
