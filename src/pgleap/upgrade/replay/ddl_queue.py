"""`ddl = "queue"`: replay stops in front of each schema change until an operator decides.

Replaying DDL written for the old major on the new one is the risky part of an upgrade (the plan's
option B). In queue mode the source runs the DDL as usual and capture logs it; replay applies every
transaction before it, then holds. `APPLY QUEUED DDL` replays the held transaction as logged;
`SKIP QUEUED DDL` applies it without its schema changes, for DDL the operator has already run on the
target by hand (adapted to the new major). Nothing is dropped: the held transaction stays first in
line until one of the two is chosen, and capture keeps logging meanwhile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import Enum

from pgleap.store.records import CapturedStatement, LoggedTransaction
from pgleap.upgrade.capture.classify import classify

log = logging.getLogger(__name__)


class Decision(Enum):
    """What the operator chose for a held transaction."""

    APPLY = "apply"
    SKIP_DDL = "skip_ddl"


@dataclass(frozen=True)
class HeldDDL:
    """The transaction replay is holding in front of, and its schema changes."""

    database: str
    position: int
    txid: int | None
    statements: tuple[str, ...]
    since: float

    def describe(self) -> str:
        """One line for status output."""
        shown = "; ".join(self.statements)
        return f"position {self.position} (txid {self.txid}): {shown[:200]}{'…' if len(shown) > 200 else ''}"


def changes_schema(statement: CapturedStatement) -> bool:
    """Whether a captured statement is DDL the `ddl` setting governs."""
    return any(info.changes_schema for info in classify(statement.sql))


class DDLQueue:
    """Holds replay at schema changes (queue mode) and remembers the operator's decision."""

    def __init__(self, database: str, enabled: bool) -> None:
        self.database = database
        self.enabled = enabled
        self.held: HeldDDL | None = None
        self._decided: dict[int, Decision] = {}

    def cut(self, records: list[LoggedTransaction]) -> list[LoggedTransaction]:
        """The records replay may apply now: those before the first undecided schema change (maybe none)."""
        if not self.enabled:
            return records
        for i, record in enumerate(records):
            assert record.position is not None
            if record.position in self._decided:
                continue
            ddl = tuple(s.sql for s in record.transaction.statements if changes_schema(s))
            if not ddl:
                continue
            if i == 0:
                self._hold(record, ddl)
            return records[:i]
        return records

    def skips_ddl_of(self, position: int | None) -> bool:
        """Whether the operator chose to apply this transaction without its schema changes."""
        return position is not None and self._decided.get(position) is Decision.SKIP_DDL

    def decide(self, decision: Decision) -> HeldDDL | None:
        """Release the held transaction with `decision`; the one released, None when nothing was held."""
        held, self.held = self.held, None
        if held is not None:
            self._decided[held.position] = decision
            log.warning(
                "replay of %s: queued DDL at position %d released (%s)", self.database, held.position, decision.value
            )
        return held

    def applied_through(self, position: int) -> None:
        """Forget decisions for positions replay has passed."""
        for done in [p for p in self._decided if p <= position]:
            del self._decided[done]

    def _hold(self, record: LoggedTransaction, ddl: tuple[str, ...]) -> None:
        if self.held is not None and self.held.position == record.position:
            return
        assert record.position is not None
        self.held = HeldDDL(self.database, record.position, record.transaction.txid, ddl, time.time())
        log.warning(
            "replay of %s holds at queued DDL, position %d (txid %s): %s; run APPLY QUEUED DDL or SKIP QUEUED DDL",
            self.database,
            record.position,
            record.transaction.txid,
            "; ".join(ddl),
        )
