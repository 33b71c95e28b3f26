"""The captured queries, as texts for the workload check: what the running pgleap has seen the application run.

Two sources, both kept by the running proxy already:

- the reads result comparison sampled (`ResultValidator.queries()`): one full example text per query
  fingerprint (the first sampled), and how many samples were compared;
- the write statements of the change log's committed transactions (INSERT/UPDATE/DELETE/MERGE, SELECTs
  of functions that wrote, SET LOCAL inside them, DDL and COPY, which the check lists as not checked),
  grouped by the same fingerprint, with the first text seen and how many times it ran.

Reads the validator never compared (sample_rate, a read that failed on the source) are not in the first
source; the check sees the sampled ones only. SET and SHOW outside a writing transaction are in neither.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pgleap.upgrade.verify.fingerprint import fingerprint

READ = "read"
WRITE = "write"
PAGE = 500  # change-log records decoded per read (the scan runs off the event loop, page by page)


@dataclass(frozen=True)
class CapturedText:
    """One captured query fingerprint: where it was seen, one full example text, how many times."""

    fingerprint: str
    source: str  # READ (result comparison) or WRITE (the change log)
    database: str | None  # None for reads: the validator groups fingerprints across databases
    count: int
    example: str


def read_texts(validator: Any) -> list[CapturedText]:
    """The sampled reads' fingerprints, each with its full example text and the samples compared."""
    if validator is None:
        return []
    return [
        CapturedText(q.fingerprint, READ, None, sum(q.counts.values()), q.example)
        for q in validator.queries()
        if q.example
    ]


def write_texts(changelog: Any, databases: Iterable[str], page: int = PAGE) -> list[CapturedText]:
    """The write statements of each database's committed transactions, one per fingerprint (blocking: a thread)."""
    found: list[CapturedText] = []
    if changelog is None:
        return found
    for database in databases:
        first: dict[str, str] = {}
        counts: dict[str, int] = {}
        after = 0
        while True:
            records = changelog.read_committed(database, after, page)
            for record in records:
                for statement in record.transaction.statements:
                    fp = fingerprint(statement.sql)
                    first.setdefault(fp, statement.sql)
                    counts[fp] = counts.get(fp, 0) + 1
            if len(records) < page:
                break
            after = max(r.position or after for r in records)
        found += [CapturedText(fp, WRITE, database, counts[fp], sql) for fp, sql in first.items()]
    return found


def texts_for_check(rows: Iterable[CapturedText], database: str | None = None) -> list[tuple[str, int]]:
    """(text, count) pairs to check: every read, and the writes of `database` (all databases when None)."""
    return [(r.example, r.count) for r in rows if database is None or r.database in (None, database)]
