"""`pgleap check` end to end: inspect the source, inspect the target (or take its major), evaluate, workload."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import asyncpg

from pgleap.config import ServerConfig
from pgleap.errors import PgleapError
from pgleap.upgrade.check.inspect import inspect_source, inspect_target, report
from pgleap.upgrade.check.model import CheckReport, TargetInfo, major_num
from pgleap.upgrade.check.workload import check_workload, drop_trial, trial_schema

CONNECT_TIMEOUT = 10.0


class CheckError(PgleapError):
    """The check could not run (a server unreachable, no target given)."""


async def _connect(server: ServerConfig, role: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(
            host=server.host,
            port=server.port,
            user=server.user,
            password=server.password,
            database=server.database,
            timeout=CONNECT_TIMEOUT,
            statement_cache_size=0,  # one-off catalog queries; prepared workload queries are closed with it
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise CheckError(f"cannot connect to the {role} ({server.describe()}): {exc}") from exc


async def run_check(
    source: ServerConfig,
    target: ServerConfig | None = None,
    *,
    target_major: int | None = None,
    queries: Sequence[str | tuple[str, int]] | None = None,
    trial: bool = True,
    bindir: Path | None = None,
) -> CheckReport:
    """Check `source` against a live `target` (or only its major); with `queries`, the workload check too.

    A query is a text, or (text, how many times it ran), as the running pgleap's console counts them.

    With `trial`, the workload runs in a scratch database on the target holding the source's schema
    (nothing copied yet); without, it runs in the target's own database (which must have the schema).
    """
    if target is None and target_major is None:
        raise CheckError("give a target server, or the target's major (--target-major)")
    src = await _connect(source, "source")
    try:
        inventory = await inspect_source(src)
        source_version = str(await src.fetchval("SHOW server_version")).split()[0]
        if target is None:
            assert target_major is not None
            info = TargetInfo(major_num(target_major))
            return report(inventory, info, source_version)
        tgt = await _connect(target, "target")
        try:
            info = await inspect_target(tgt)
        finally:
            await tgt.close()
        if not queries:
            return report(inventory, info, source_version)
        rejected = None
        where = target
        if trial:
            schema = await trial_schema(source, target, bindir)
            where, rejected = schema.target, schema.rejected
        try:
            conn = await _connect(where, "target")
            try:
                results = await check_workload(src, conn, queries)
            finally:
                await conn.close()
        finally:
            if trial:
                await drop_trial(where, target)
        return report(inventory, info, source_version, workload=results, rejected=rejected)
    finally:
        await src.close()
