"""Admin commands of result comparison: SHOW UPGRADE QUERIES, and SHOW UPGRADE QUERY TEXTS for `pgleap check`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pgleap.admin.commands import Result, _ts, command
from pgleap.upgrade.verify.results import Classification

if TYPE_CHECKING:
    from pgleap.proxy.server import Proxy
    from pgleap.proxy.session import Session

SHOW_UPGRADE_QUERIES_COLUMNS = (
    "fingerprint",
    "example",
    "compared",
    "mismatches",
    "matching",
    "data_mismatches",
    "syntax_errors",
    "feature_incompatibilities",
    "timeouts",
    "target_errors",
    "inconclusive",
    "first_seen",
    "last_seen",
    "source_avg_ms",
    "target_avg_ms",
    "last_detail",
)
_EXAMPLE_CHARS = 200


@command("SHOW UPGRADE QUERIES")
async def show_upgrade_queries(proxy: Proxy, _session: Session) -> Result:
    """Per query fingerprint: counts of each comparison outcome, most mismatches first."""
    validator = proxy.validator
    rows: list[Sequence[Any]] = []
    for q in validator.queries() if validator is not None else []:
        c = q.counts
        timed = q.compared or 1
        rows.append(
            [
                q.fingerprint,
                q.example[:_EXAMPLE_CHARS],
                q.compared,
                q.mismatches,
                c.get(Classification.MATCH, 0),
                c.get(Classification.DATA_MISMATCH, 0),
                c.get(Classification.SYNTAX_ERROR, 0),
                c.get(Classification.FEATURE_INCOMPATIBILITY, 0),
                c.get(Classification.TIMEOUT, 0),
                c.get(Classification.TARGET_ERROR, 0),
                c.get(Classification.INCONCLUSIVE, 0),
                _ts(q.first_seen),
                _ts(q.last_seen),
                round(q.source_seconds / timed * 1000, 3),
                round(q.target_seconds / timed * 1000, 3),
                q.last_detail or None,
            ]
        )
    return Result(f"SHOW {len(rows)}", SHOW_UPGRADE_QUERIES_COLUMNS, rows)


SHOW_UPGRADE_QUERY_TEXTS_COLUMNS = ("fingerprint", "source", "database", "count", "example")
_FLUSH_WAIT = 10.0  # seconds


@command("SHOW UPGRADE QUERY TEXTS")
async def show_upgrade_query_texts(proxy: Proxy, _session: Session) -> Result:
    """Every captured query fingerprint with one full example text and its count: sampled reads, logged writes."""
    from pgleap.upgrade.check.captured import read_texts, write_texts

    reads = read_texts(proxy.validator)
    databases = [u.database for u in proxy.config.upgrades]
    changelog = proxy.changelog
    if changelog is not None:
        # A COMMIT answered just before this command is settled (and positioned) by the log's writer thread
        # a moment later: wait for what was asked of the log so far. A log that fails is read as it stands.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(changelog.flush(), _FLUSH_WAIT)
    # Decoding the whole change log takes a while: off the event loop, so clients are not held meanwhile.
    writes = await asyncio.to_thread(write_texts, changelog, databases)
    rows: list[Sequence[Any]] = [[t.fingerprint, t.source, t.database, t.count, t.example] for t in reads + writes]
    return Result(f"SHOW {len(rows)}", SHOW_UPGRADE_QUERY_TEXTS_COLUMNS, rows)
