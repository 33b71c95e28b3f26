"""Roles: pg_dumpall --roles-only of the source, adapted and applied on the target statement by statement."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import asyncpg

from pgleap.config import ServerConfig
from pgleap.store import SchemaErrorRecord
from pgleap.upgrade.copy.connect import connect
from pgleap.upgrade.copy.errors import ToolError
from pgleap.upgrade.copy.tools import conninfo, run_tool, tool_env

_ROLE_OF = re.compile(r'^(?:CREATE|ALTER|COMMENT ON) ROLE ("(?:[^"]|"")+"|[^\s;]+)', re.IGNORECASE)


def split_statements(script: str) -> list[str]:
    """Statements of a pg_dumpall script (one per line, or several lines inside a quoted literal)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines():
        if not pending and (not line.strip() or line.startswith("--") or line.startswith("\\")):
            continue  # blank, comment, or a psql meta-command (\restrict / \unrestrict in newer dumps)
        pending = f"{pending}\n{line}" if pending else line
        if pending.rstrip().endswith(";") and pending.count("'") % 2 == 0:
            statements.append(pending.strip())
            pending = ""
    return statements


def _unquote(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


def adapt(statements: list[str], skip_roles: set[str]) -> list[str]:
    """Drop session SETs and every statement about a role the target already runs the copy as."""
    kept = []
    for statement in statements:
        if statement.upper().startswith("SET "):
            continue  # session settings of the dump script, not role definitions
        match = _ROLE_OF.match(statement)
        if match and _unquote(match.group(1)) in skip_roles:
            continue  # never redefine (or re-password) the login the copy uses on the target
        kept.append(statement)
    return kept


async def dump_roles(pg_dumpall: Path, source: ServerConfig, with_passwords: bool) -> str:
    """The source's roles as SQL (pg_dumpall --roles-only)."""
    argv = [str(pg_dumpall), "--roles-only", "-w", "-d", conninfo(source)]
    if not with_passwords:
        argv.append("--no-role-passwords")  # pg_authid needs a superuser; pg_roles does not
    result = await run_tool(argv, tool_env(source))
    if result.returncode != 0:
        raise ToolError(f"pg_dumpall --roles-only of {source.describe()} failed: {result.stderr.strip()}")
    return result.stdout


async def apply_roles(target: ServerConfig, statements: list[str]) -> list[SchemaErrorRecord]:
    """Run each statement on its own; an existing role is fine, anything else is reported."""
    conn = await connect(replace(target, database="postgres"), role="target")
    errors: list[SchemaErrorRecord] = []
    try:
        for statement in statements:
            try:
                await conn.execute(statement)
            except asyncpg.DuplicateObjectError:
                continue  # CREATE ROLE of a role the target has; the ALTER ROLE after it applies the options
            except asyncpg.PostgresError as exc:
                match = _ROLE_OF.match(statement)
                obj = f"ROLE {_unquote(match.group(1))}" if match else statement.split("\n")[0][:80]
                errors.append(SchemaErrorRecord(section="roles", object=obj, error=str(exc), definition=statement))
    finally:
        await conn.close()
    return errors
