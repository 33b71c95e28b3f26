"""Tables whose triggers fire again on the target as replay writes them.

Replay applies the source's statements (and row images for INSERTs) with the target's triggers enabled:
disabling them (`session_replication_role = replica`) would lose what an audit trigger writes to other
tables, which capture never sees. But what a trigger computes on the target (`now()`, a key from its
sequence, `NEW.x := ...` over a row image) may differ from the source's, and no command tag shows it.
So every table such a trigger sits on is flagged for re-sync when replay writes it (I3: found and repaired,
never silently different).
"""

from __future__ import annotations

from functools import lru_cache

from pgleap.upgrade.replay.wire import TargetSession

# Enabled for an ordinary session ('O' origin, 'A' always; replay's session_replication_role is origin);
# internal ones are foreign keys and the like, which compute nothing.
TRIGGERED_SQL = (
    "SELECT DISTINCT n.nspname || '.' || c.relname FROM pg_catalog.pg_trigger t "
    "JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE NOT t.tgisinternal AND t.tgenabled IN ('O', 'A') ORDER BY 1"
)


async def triggered_tables(session: TargetSession) -> frozenset[str]:
    """ "schema.table" of every table with a user trigger that fires for replay's writes."""
    return frozenset(str(row[0]) for row in await session.query(TRIGGERED_SQL))


def fired_on(relations: tuple[str, ...], triggered: frozenset[str]) -> tuple[str, ...]:
    """Those of `relations` (as written: qualified or not) that may be tables in `triggered`."""
    if not triggered:
        return ()
    bare = _bare_names(triggered)
    # An unqualified name is matched by table name: the session's search_path is not known here.
    return tuple(r for r in relations if r in triggered or ("." not in r and r in bare))


@lru_cache(maxsize=4)
def _bare_names(triggered: frozenset[str]) -> frozenset[str]:
    return frozenset(name.rsplit(".", 1)[-1] for name in triggered)
