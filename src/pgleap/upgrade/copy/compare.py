"""Type-aware row-by-row comparison of a table on two servers (tests and the bench use it)."""

from __future__ import annotations

import datetime
import decimal
import json
import math
from collections import Counter
from dataclasses import dataclass

import asyncpg

from pgleap.config import ServerConfig
from pgleap.upgrade.copy.connect import connect, qualified, quote_ident


@dataclass(frozen=True)
class TableDiff:
    """Rows only on one side (each with its multiplicity), for one table."""

    table: str
    source_rows: int
    target_rows: int
    only_source: list[tuple[object, ...]]
    only_target: list[tuple[object, ...]]

    @property
    def equal(self) -> bool:
        """No row differs."""
        return not self.only_source and not self.only_target


def normalise(value: object) -> object:
    """A comparable form: floats by value (text output changed in 12), timestamps in UTC, json by text."""
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else value
    if isinstance(value, decimal.Decimal):
        return "NaN" if value.is_nan() else value.normalize()
    if isinstance(value, datetime.datetime) and value.tzinfo is not None:
        return value.astimezone(datetime.UTC)
    if isinstance(value, (list, tuple)):
        return tuple(normalise(v) for v in value)
    if isinstance(value, asyncpg.Record):
        return tuple(normalise(v) for v in value.values())
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def _json_text(value: object) -> object:
    if isinstance(value, str):
        try:
            return json.dumps(json.loads(value), sort_keys=True)
        except ValueError:
            return value
    return value


async def _rows(conn: asyncpg.Connection, schema: str, table: str) -> tuple[Counter[tuple[object, ...]], int]:
    columns = await conn.fetch(
        "SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        qualified(schema, table),
    )
    # Types asyncpg has no codec for come back as text; json compares by parsed value.
    select = ", ".join(
        f"{quote_ident(name)}::text"
        if typ in ("json", "jsonb", "money") or typ.startswith("_json")
        else quote_ident(name)
        for name, typ in columns
    )
    json_cols = {i for i, (_, typ) in enumerate(columns) if typ in ("json", "jsonb")}
    await conn.execute("SET extra_float_digits = 3")
    counter: Counter[tuple[object, ...]] = Counter()
    total = 0
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        async for record in conn.cursor(f"SELECT {select} FROM ONLY {qualified(schema, table)}", prefetch=2000):
            row = tuple(_json_text(v) if i in json_cols else normalise(v) for i, v in enumerate(record.values()))
            counter[row] += 1
            total += 1
    return counter, total


async def compare_table(
    source: asyncpg.Connection, target: asyncpg.Connection, schema: str, table: str, limit: int = 10
) -> TableDiff:
    """Compare one table's rows as multisets (duplicates count)."""
    left, left_total = await _rows(source, schema, table)
    right, right_total = await _rows(target, schema, table)
    only_source = list((left - right).elements())[:limit]
    only_target = list((right - left).elements())[:limit]
    return TableDiff(f"{schema}.{table}", left_total, right_total, only_source, only_target)


async def compare_database(source: asyncpg.Connection, target: asyncpg.Connection) -> list[TableDiff]:
    """Compare every ordinary table of the source (relkind 'r') with the target; pgleap's own schema is not data."""
    names = await source.fetch(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgleap') "
        "AND n.nspname !~ '^pg_toast' ORDER BY 1, 2"
    )
    return [await compare_table(source, target, schema, table) for schema, table in names]


async def database_differences(source: ServerConfig, target: ServerConfig) -> list[str]:
    """One line per table that differs between the two databases (empty when they are equal)."""
    a = await connect(source, role="source")
    b = await connect(target, role="target")
    try:
        return [
            f"{d.table}: {d.source_rows} vs {d.target_rows} rows; only source {d.only_source[:3]}; "
            f"only target {d.only_target[:3]}"
            for d in await compare_database(a, b)
            if not d.equal
        ]
    finally:
        await a.close()
        await b.close()
