"""Version adapters: each rule's rewrite runs on the majors that have the new names, the original does not;
the reverse rewrite (for rollback) gives back the original. 9.x servers cannot be had here: the old-name side
of rules older than 10 is checked as text only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgleap.lab import Lab, LabError, LabServer
from pgleap.upgrade.compat.adapters import ADAPTERS, adapt

pytestmark = pytest.mark.integration

PG96, PG10 = 90624, 100023

# (statement on the old major, its old major's version_num, the rules it exercises)
CASES = [
    ("SELECT a.procpid, a.current_query FROM pg_stat_activity a", 90125, {"pg_stat_activity_pid"}),
    ("SELECT count(*) FROM pg_stat_activity WHERE current_query <> ''", 90125, {"pg_stat_activity_query"}),
    (
        "SELECT application_name, sent_location, write_location, flush_location, replay_location "
        "FROM pg_stat_replication",
        PG96,
        {f"pg_stat_replication_{c}" for c in ("sent", "write", "flush", "replay")},
    ),
    ("SELECT pg_xlog_location_diff(pg_current_xlog_location(), '0/0')", PG96, {"xlog_pg_xlog_location_diff"}),
    ("SELECT pg_is_xlog_replay_paused() FROM pg_stat_activity LIMIT 0", PG96, {"xlog_pg_is_xlog_replay_paused"}),
    ("SET force_parallel_mode = on", PG10, {"force_parallel_mode"}),
    ("SHOW force_parallel_mode", PG10, {"force_parallel_mode"}),
]


@pytest.fixture(scope="module")
def servers(lab: Lab) -> Iterator[dict[int, LabServer]]:
    """PG 10, 17 and 18."""
    started = {major: lab.primary(major) for major in (10, 17, 18)}
    yield started
    for server in started.values():
        server.stop()


def runs(server: LabServer, sql: str) -> bool:
    """Whether the server accepts the statement (in a transaction that is rolled back)."""
    try:
        server.psql(f"BEGIN; {sql}; ROLLBACK")
        return True
    except LabError:
        return False


@pytest.mark.parametrize(("sql", "old_num", "rules"), CASES, ids=[c[0][:40] for c in CASES])
def test_rewrite_runs_where_the_original_does_not(
    servers: dict[int, LabServer], sql: str, old_num: int, rules: set[str]
) -> None:
    for major, server in servers.items():
        num = server.server_version_num()
        if num <= old_num:
            assert runs(server, sql), f"the original should run on {major}"
            continue
        adapted = adapt(sql, old_num, num)
        assert adapted != sql
        assert runs(server, adapted), f"{adapted!r} fails on {major}"
        assert not runs(server, sql), f"{sql!r} should fail on {major} (else the rule is not needed)"
        # Rollback direction: the new major's text back to the old one's names.
        back = adapt(adapted, num, old_num)
        assert adapt(back, old_num, num) == adapted
        if old_num >= PG10:
            assert runs(servers[10], back)
    assert rules <= {a.name for a in ADAPTERS}


def test_untouched_statements_come_back_byte_for_byte() -> None:
    for sql in ("SELECT procpid FROM my_table", "select  1", "UPDATE t SET a = 1 -- current_query", "SELECT 5 !"):
        assert adapt(sql, 90125, 180000) is sql or adapt(sql, 90125, 180000) == sql
    assert adapt("SELECT pid FROM pg_stat_activity", 100000, 180000) == "SELECT pid FROM pg_stat_activity"
