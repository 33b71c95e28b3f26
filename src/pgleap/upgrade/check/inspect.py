"""Read the source's inventory and the target's facts over asyncpg, and evaluate the rules on them."""

from __future__ import annotations

import datetime as _dt
from typing import Any

import asyncpg

from pgleap.upgrade.check.detect import detect
from pgleap.upgrade.check.model import CheckReport, Finding, Inventory, Row, TargetInfo
from pgleap.upgrade.check.rules import RULES, rules_for
from pgleap.upgrade.compat import check_queries as q
from pgleap.upgrade.compat.facts import Facts, facts_for


async def _rows(conn: asyncpg.Connection, sql: str) -> list[Row]:
    return [dict(r) for r in await conn.fetch(sql)]


async def inspect_source(conn: asyncpg.Connection) -> Inventory:
    """Every catalog row the rules read, from the database `conn` is connected to."""
    facts: Facts = facts_for(int(await conn.fetchval("SHOW server_version_num")))
    inv = Inventory(version_num=facts.version_num)
    inv.database = (await _rows(conn, q.database_sql()))[0]
    inv.relations = await _rows(conn, q.relations_sql(facts))
    inv.columns = await _rows(conn, q.columns_sql(facts))
    inv.functions = await _rows(conn, q.functions_sql(facts))
    inv.views = await _rows(conn, q.views_sql(facts))
    inv.operators = await _rows(conn, q.operators_sql(facts))
    inv.aggregates = await _rows(conn, q.aggregates_sql(facts))
    extensions = q.extensions_sql(facts)
    inv.extensions = await _rows(conn, extensions) if extensions else []
    superuser = bool(await conn.fetchval(q.is_superuser_sql()))
    inv.passwords_read = superuser
    if not superuser:
        inv.notes.append("not a superuser: password hashes (pg_authid) were not read, md5 passwords are not checked")
    inv.roles = await _rows(conn, q.roles_sql(facts, read_passwords=superuser))
    inv.settings = await _rows(conn, q.settings_sql())
    inv.db_role_settings = await _rows(conn, q.db_role_settings_sql())
    inv.inheritance_parents = await _rows(conn, q.inheritance_parents_sql())
    inv.maintenance_functions = await _rows(conn, q.maintenance_functions_sql())
    return inv


async def inspect_target(conn: asyncpg.Connection) -> TargetInfo:
    """The target's major, the extensions it can install and its settings."""
    num = int(await conn.fetchval("SHOW server_version_num"))
    version = str(await conn.fetchval("SHOW server_version")).split()[0]
    available: dict[str, list[str]] = {}
    for r in await conn.fetch(q.available_extensions_sql()):
        available[r["name"]] = list(r["versions"])
    defaults = {r["name"]: r["default_version"] for r in await conn.fetch(q.default_extension_versions_sql())}
    settings = {r["name"].lower(): dict(r) for r in await conn.fetch(q.settings_sql())}
    return TargetInfo(num, version, available, defaults, settings)


def evaluate(inventory: Inventory, target: TargetInfo) -> tuple[list[Finding], int]:
    """The findings of every rule the upgrade crosses, worst first; and how many rules were checked."""
    rules = rules_for(inventory.version_num, target.version_num, RULES)
    findings = []
    for rule in rules:
        objects = detect(rule, inventory, target)
        if objects:
            findings.append(Finding(rule, tuple(objects)))
    findings.sort(key=lambda f: (f.severity.rank, f.rule.since or 0, f.rule.name))
    return findings, len(rules)


def report(inventory: Inventory, target: TargetInfo, source_version: str, **extra: Any) -> CheckReport:
    """Evaluate the rules and wrap the result in a report."""
    findings, checked = evaluate(inventory, target)
    notes = list(inventory.notes)
    if not target.live:
        notes.append(
            "the target was given by its major only: extension availability and the target's settings were not "
            "checked (give a target connection for those)"
        )
    return CheckReport(
        source_version=source_version,
        source_version_num=inventory.version_num,
        database=str(inventory.database.get("name", "")),
        target=target,
        findings=findings,
        rules_checked=checked,
        notes=notes,
        generated_at=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        **extra,
    )
