"""What a write changes beyond the tables it names: foreign keys' actions, triggers, rules, functions it calls.

Replay flags a transaction's tables for a required re-sync when it cannot apply the transaction exactly: skipped
under `skip_and_resync`, applied without a txid while the copy ran, or stitched across copies taken at
different snapshots. The source ran more than the statements say: `DELETE FROM orders` cascaded to
`order_lines`, an audit trigger inserted into its log, a rule rewrote the write, `UPDATE t SET n = next_no()`
bumped a counter table. Those tables differ on the target too, and cutover must wait for their re-sync.

The target's catalog answers, read at each connect (its schema is the copy of the source's): the tables an
ON DELETE / ON UPDATE action reaches, followed to any depth, are flagged by name; a table with a user
trigger or a rule, or a call of a function that may be volatile, may have written any table, and stands
for every table (`EVERY_TABLE`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from pgleap.upgrade.capture.classify import UNREPEATABLE_FUNCTIONS, WRITES_NO_TABLE
from pgleap.upgrade.compat.catalog import cascading_foreign_keys_sql, non_volatile_functions_sql, ruled_relations_sql
from pgleap.upgrade.replay.journal import EVERY_TABLE
from pgleap.upgrade.replay.recomputed import named_among
from pgleap.upgrade.replay.wire import TargetSession


@dataclass(frozen=True)
class IndirectWrites:
    """What the target's catalog says a write may change besides the tables it names."""

    # "schema.table" -> the tables whose rows a foreign key's action changes when it is written
    cascades: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # "schema.table" of relations with a user trigger or a rule: a write there may change any table
    spreading: frozenset[str] = frozenset()
    # function names no volatile function has (such a function cannot write); empty when not read: every
    # function a write calls may then write
    read_only_functions: frozenset[str] = frozenset()

    def widen(self, tables: Iterable[str], calls: Iterable[str] = ()) -> tuple[str, ...]:
        """`tables` (as statements name them) with what writing them changes too; EVERY_TABLE among them when
        that may be any table."""
        reached = dict.fromkeys(tables)
        if EVERY_TABLE in reached:
            return tuple(reached)
        if any(self._may_write(function) for function in calls):
            return (*reached, EVERY_TABLE)
        todo = list(reached)
        while todo:
            name = todo.pop()
            if named_among((name,), self.spreading):
                return (*reached, EVERY_TABLE)
            for table in self._referencing(name):
                if table not in reached:
                    reached[table] = None
                    todo.append(table)
        return tuple(reached)

    def _may_write(self, function: str) -> bool:
        known = function in WRITES_NO_TABLE or function in UNREPEATABLE_FUNCTIONS
        return not known and function not in self.read_only_functions

    def _referencing(self, name: str) -> frozenset[str]:
        if "." in name:
            return self.cascades.get(name, frozenset())
        # A bare name, as the statement wrote it (its search_path is not known here): every schema's table of it.
        return self._by_bare_name.get(name, frozenset())

    @cached_property
    def _by_bare_name(self) -> dict[str, frozenset[str]]:
        # Built once: _in_copy widens every statement while a table has a copy snapshot of its own.
        index: dict[str, set[str]] = {}
        for table, referencing in self.cascades.items():
            index.setdefault(table.rsplit(".", 1)[-1], set()).update(referencing)
        return {name: frozenset(tables) for name, tables in index.items()}


async def read_indirect_writes(session: TargetSession, triggered: frozenset[str]) -> IndirectWrites:
    """The target's cascading foreign keys, ruled relations and read-only function names; `triggered`: the
    tables with user triggers (recomputed.triggered_tables, read already)."""
    cascades: dict[str, set[str]] = {}
    for referenced, referencing in await session.query(cascading_foreign_keys_sql()):
        cascades.setdefault(str(referenced), set()).add(str(referencing))
    ruled = frozenset(str(row[0]) for row in await session.query(ruled_relations_sql()))
    read_only = frozenset(str(row[0]) for row in await session.query(non_volatile_functions_sql()))
    return IndirectWrites({k: frozenset(v) for k, v in cascades.items()}, triggered | ruled, read_only)
