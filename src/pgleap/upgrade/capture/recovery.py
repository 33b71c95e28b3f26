"""Settling the change-log records a crash left pending, from what the source says became of them.

A record is written as pending before its COMMIT goes to the source. If pgleap dies before the
answer is settled, the record stays pending and holds back every later record of its database.
On the next start, the source tells (`txid_status`, 10+) whether each of those transactions
committed. 9.x cannot tell: those records become `unresolved`, are kept and reported (I1), and
verification re-syncs the tables they touched.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import asyncpg

from pgleap.config import ServerConfig
from pgleap.store.changelog import ChangeLog
from pgleap.store.records import CapturedTransaction, LogState
from pgleap.upgrade.compat import facts_for
from pgleap.upgrade.copy.connect import connect, version_num

log = logging.getLogger(__name__)

# A transaction of a connection that died with pgleap is rolled back by its backend within moments;
# while txid_status still says "in progress", ask again, for at most this long.
IN_PROGRESS_WAIT = 30.0
_STATES = {"committed": LogState.COMMITTED, "aborted": LogState.ABORTED}


@dataclass
class RecoveryReport:
    """What recovery decided for each pending record of one database."""

    database: str
    settled: dict[LogState, int] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the log and the console."""
        parts = ", ".join(f"{n} {state.value}" for state, n in sorted(self.settled.items())) or "none pending"
        return f"database {self.database}: change-log records left pending (by a crash, or a client gone): {parts}"


async def settle_pending(
    changelog: ChangeLog, source: ServerConfig, pending: list[tuple[int, CapturedTransaction]], database: str
) -> RecoveryReport:
    """Resolve `pending` (records of `database` left by an earlier run) from the source's txid_status."""
    report = RecoveryReport(database)
    if not pending:
        return report
    conn = await connect(source, role="source")
    try:
        facts = facts_for(await version_num(conn))
        first_of: dict[int, int] = {}
        for log_id, tx in pending:
            state = LogState.UNRESOLVED
            if tx.txid is not None and tx.txid in first_of:
                # One transaction, two records (an earlier run logged it again): the first holds its place in
                # commit order; applying the second too would run the transaction twice.
                log.warning(
                    "database %s: change-log record %s repeats txid %s of record %s; aborted, the first is kept",
                    database,
                    log_id,
                    tx.txid,
                    first_of[tx.txid],
                )
                state = LogState.ABORTED
            elif tx.txid is not None and facts.has_txid_status:
                state = await _status(conn, facts.txid_status_sql(), tx.txid)
            if tx.txid is not None:
                first_of.setdefault(tx.txid, log_id)
            await changelog.resolve(log_id, state)
            report.settled[state] = report.settled.get(state, 0) + 1
            if state is LogState.UNRESOLVED:
                log.warning(
                    "database %s: change-log record %s (txid %s) was pending at a crash and the source cannot say "
                    "whether it committed; it is kept as unresolved, and its tables need verification",
                    database,
                    log_id,
                    tx.txid,
                )
    finally:
        await conn.close()
    log.info("%s", report.describe())
    return report


async def _status(conn: asyncpg.Connection, sql: str, txid: int) -> LogState:
    deadline = asyncio.get_running_loop().time() + IN_PROGRESS_WAIT
    while True:
        status = await conn.fetchval(sql, txid)
        if status in _STATES:
            return _STATES[status]
        if status is None or asyncio.get_running_loop().time() > deadline:
            return LogState.UNRESOLVED  # too old for the commit log, or never finished: cannot be known
        await asyncio.sleep(0.2)
