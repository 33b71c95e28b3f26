"""Admin commands of result comparison: SHOW UPGRADE QUERIES."""

from __future__ import annotations

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
