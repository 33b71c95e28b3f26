"""Admin commands of verification: VERIFY TABLE, VERIFY ALL TABLES, FORCE RESYNC TABLE and SHOW UPGRADE ERRORS.

A table is named 'schema.table' or 'table', optionally prefixed by its database and a colon
('app:public.accounts'); without one, the only database whose replay runs is meant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pgleap.admin.commands import AdminCommandError, Result, _ts, command, command_with_argument
from pgleap.errors import PgleapError

if TYPE_CHECKING:
    from pgleap.proxy.server import Proxy
    from pgleap.proxy.session import Session
    from pgleap.upgrade.verify.service import TableReport

VERIFY_COLUMNS = (
    "database",
    "table",
    "keyed",
    "source_rows",
    "target_rows",
    "chunks",
    "differing_chunks",
    "missing_on_target",
    "extra_on_target",
    "different",
    "whole_table_differs",
    "repairs",
    "rows_recopied",
    "clean",
    "seconds",
    "points",
    "example_keys",
)
_EXAMPLES = 5


@command_with_argument("VERIFY TABLE")
async def verify_table(proxy: Proxy, _session: Session, name: str) -> Result:
    """Compare one table at the same point on source and target; re-sync what differs (resync_on_error)."""
    database, table = _database_and_table(proxy, name, "VERIFY TABLE")
    return await _verify(proxy, database, [table])


@command("VERIFY ALL TABLES")
async def verify_all_tables(proxy: Proxy, _session: Session) -> Result:
    """Verify every table of every database whose replay runs."""
    rows: list[Sequence[Any]] = []
    for database in _replaying(proxy):
        rows += (await _verify(proxy, database, None)).rows
    return Result(f"VERIFY {len(rows)}", VERIFY_COLUMNS, rows)


@command_with_argument("FORCE RESYNC TABLE")
async def force_resync_table(proxy: Proxy, _session: Session, name: str) -> Result:
    """Copy one whole table (with its partitions and inheritors) again from the source at a point of the change
    stream, replay going on."""
    database, table = _database_and_table(proxy, name, "FORCE RESYNC TABLE")
    try:
        results = await proxy.verifier().force_resync(database, table)
    except PgleapError as exc:
        raise AdminCommandError(f"FORCE RESYNC TABLE failed: {exc}") from exc
    columns = ["database", "table", "rows_removed", "rows_copied", "triggers_disabled", "seconds"]
    rows = [[database, r.table, r.deleted, r.copied, r.triggers_disabled, round(r.seconds, 3)] for r in results]
    return Result(f"RESYNC {len(rows)}", columns, rows)


async def _verify(proxy: Proxy, database: str, tables: list[str] | None) -> Result:
    try:
        reports = await proxy.verifier().verify(database, tables)
    except PgleapError as exc:
        raise AdminCommandError(f"VERIFY failed: {exc}") from exc
    rows = [_report_row(r) for r in reports]
    return Result(f"VERIFY {len(rows)}", VERIFY_COLUMNS, rows)


def _report_row(report: TableReport) -> list[Any]:
    v = report.verification
    return [
        v.database,
        v.table,
        v.keyed,
        v.source_rows,
        v.target_rows,
        v.chunks,
        v.differing_chunks,
        v.count("missing_on_target"),
        v.count("extra_on_target"),
        v.count("different"),
        v.whole_table_differs,
        len(report.repairs),
        sum(r.copied for r in report.repairs),
        report.clean,
        round(v.seconds, 3),
        v.points,
        "; ".join(",".join(d.key) for d in v.differences[:_EXAMPLES]) or None,
    ]


def _replaying(proxy: Proxy) -> list[str]:
    return [name for name in sorted(proxy.databases) if proxy.replay is not None and proxy.replay.running(name)]


def _database_and_table(proxy: Proxy, name: str, tag: str) -> tuple[str, str]:
    if ":" in name:
        database, table = name.split(":", 1)
        if database not in proxy.databases:
            raise AdminCommandError(f"{tag}: no database {database!r} is configured")
        return database, table
    running = _replaying(proxy)
    if len(running) != 1:
        which = "no database is replaying (START REPLAY)" if not running else f"several are: {', '.join(running)}"
        raise AdminCommandError(f"{tag}: name the database as 'database:schema.table'; {which}")
    return running[0], name


@command("SHOW UPGRADE ERRORS")
async def show_upgrade_errors(proxy: Proxy, _session: Session) -> Result:
    """What is wrong now: apply errors, tables verification found different, failed query comparisons."""
    columns = ["database", "kind", "at", "object", "detail"]
    rows: list[Sequence[Any]] = []
    if proxy.replay is not None:
        for name in sorted(proxy.databases):
            for error in proxy.replay.journal.errors(name):
                detail = f"{error.sqlstate} {error.message} in {error.statement[:200]!r} ({error.action})"
                rows.append([name, f"apply_{error.kind.value}", _ts(error.recorded_at), f"txid {error.txid}", detail])
    for (database, table), report in sorted(proxy.verifier().last_reports().items()):
        if report.clean:
            continue
        left = report.remaining if report.repairs else report.verification.differences
        whole = report.remaining_whole_table if report.repairs else report.verification.whole_table_differs
        what = (
            "the whole table (no primary key)"
            if whole
            else f"{len(left)} rows, e.g. " + "; ".join(",".join(d.key) for d in left[:_EXAMPLES])
        )
        state = f"still different after {len(report.repairs)} re-syncs" if report.repairs else "not repaired"
        rows.append([database, "table_differs", _ts(report.finished_at), table, f"{what} ({state})"])
    validator = getattr(proxy, "validator", None)
    if validator is not None:
        for failure in validator.recent_failures(100):
            rows.append(
                [None, f"query_{failure.classification}", _ts(failure.last_seen), failure.example, failure.detail]
            )
    return Result(f"SHOW {len(rows)}", columns, rows)
