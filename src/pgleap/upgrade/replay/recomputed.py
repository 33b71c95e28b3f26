"""What the target computes again as replay writes: triggers, column defaults, users' volatile functions.

Replay applies the source's statements (and row images for INSERTs) with the target's triggers enabled:
disabling them (`session_replication_role = replica`) would lose what an audit trigger writes to other
tables, which capture never sees. But what a trigger computes on the target (`now()`, a key from its
sequence, `NEW.x := ...` over a row image) may differ from the source's, and no command tag shows it.
So every table such a trigger sits on is flagged for re-sync when replay writes it (I3: found and repaired,
never silently different).

Defaults are the same story for writes replayed as statements (an INSERT without row images, COPY FROM
STDIN, `SET x = DEFAULT`): a `now()` or `nextval()` default is computed again on the target, at another
time and in another order. An INSERT with row images carries the values the source computed, and is exact.
And a statement calling a user's volatile function (an order number from a table of counters, say) runs
it again there.
"""

from __future__ import annotations

from functools import lru_cache

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.visitors import Visitor

from pgleap.upgrade.compat import Facts
from pgleap.upgrade.compat.catalog import defaults_sql, volatile_functions_sql
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


async def defaulted_tables(session: TargetSession, facts: Facts) -> frozenset[str]:
    """ "schema.table" of every table with a default the target computes (a function, an identity column)."""
    rows = await session.query(defaults_sql(facts))
    return frozenset(str(table) for table, default in rows if default is None or computes(str(default)))


async def volatile_functions(session: TargetSession) -> frozenset[str]:
    """Names of the target's volatile functions outside pg_catalog."""
    return frozenset(str(row[0]) for row in await session.query(volatile_functions_sql()))


@lru_cache(maxsize=1024)
def computes(default: str) -> bool:
    """Whether a default expression calls anything (`now()`, `nextval(...)`, CURRENT_TIMESTAMP, a user's
    function, a cast of a cast); a constant, cast or not, does not. What cannot be parsed counts as computing."""
    try:
        (statement,) = parse_sql(f"SELECT ({default})")
    except (ParseError, ValueError):
        return True
    if statement.stmt is None:
        return True
    calls = _Calls()
    calls(statement.stmt)
    return calls.found


class _Calls(Visitor):
    def __init__(self) -> None:
        self.found = False

    def visit_FuncCall(self, _ancestors: object, _node: ast.FuncCall) -> None:
        self.found = True

    def visit_SQLValueFunction(self, _ancestors: object, _node: ast.Node) -> None:
        self.found = True

    def visit_TypeCast(self, _ancestors: object, node: ast.TypeCast) -> None:
        # A cast of a cast, as in `('now'::text)::timestamptz`: the outer one runs at each insert (the trick
        # for a default of the time of the insert that is not now()). A cast of a constant is folded once.
        if isinstance(node.arg, ast.TypeCast):
            self.found = True


def named_among(relations: tuple[str, ...], tables: frozenset[str]) -> tuple[str, ...]:
    """Those of `relations` (as written: qualified or not) that may be tables in `tables` ("schema.table")."""
    if not tables:
        return ()
    bare = _bare_names(tables)
    # An unqualified name is matched by table name: the session's search_path is not known here.
    return tuple(r for r in relations if r in tables or ("." not in r and r in bare))


@lru_cache(maxsize=8)
def _bare_names(tables: frozenset[str]) -> frozenset[str]:
    return frozenset(name.rsplit(".", 1)[-1] for name in tables)
