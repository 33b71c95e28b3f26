"""The copy snapshot S and the visibility rule that stitches the copy to the change log.

A transaction whose txid is visible in S is already in the copied data and must not be replayed;
every other committed transaction must be. The rule is PostgreSQL's own `txid_visible_in_snapshot`
(and PgQ's): below xmin visible, at or above xmax not, in between visible unless in progress (xip).
"""

from __future__ import annotations

from dataclasses import dataclass

from pgleap.errors import PgleapError


class SnapshotFormatError(PgleapError):
    """A snapshot text is not what txid_current_snapshot() returns ("xmin:xmax:xip,...")."""


@dataclass(frozen=True)
class Snapshot:
    """A parsed txid_current_snapshot(): 64-bit (epoch-extended) txids."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    def visible(self, txid: int) -> bool:
        """Whether `txid`'s effects are visible in this snapshot (as txid_visible_in_snapshot)."""
        if txid < self.xmin:
            return True
        if txid >= self.xmax:
            return False
        return txid not in self.xip

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(str(x) for x in sorted(self.xip))}"


def parse_snapshot(text: str) -> Snapshot:
    """Parse "xmin:xmax:xip1,xip2,..." (the txid_snapshot text form)."""
    parts = text.strip().split(":")
    if len(parts) != 3:
        raise SnapshotFormatError(
            f"snapshot {text!r} is not of the form xmin:xmax:xip,...; it must be the text "
            f"of txid_current_snapshot() taken for the copy"
        )
    try:
        xmin, xmax = int(parts[0]), int(parts[1])
        xip = frozenset(int(x) for x in parts[2].split(",") if x.strip())
    except ValueError:
        raise SnapshotFormatError(f"snapshot {text!r} holds something other than txids") from None
    if not 0 < xmin <= xmax:
        raise SnapshotFormatError(f"snapshot {text!r}: xmin must be positive and not above xmax")
    outside = sorted(x for x in xip if not xmin <= x < xmax)
    if outside:
        raise SnapshotFormatError(f"snapshot {text!r}: in-progress txids {outside} lie outside [xmin, xmax)")
    return Snapshot(xmin, xmax, xip)


def visible(txid: int, snapshot: Snapshot | str) -> bool:
    """txid_visible_in_snapshot(txid, S), for a parsed snapshot or its text."""
    parsed = parse_snapshot(snapshot) if isinstance(snapshot, str) else snapshot
    return parsed.visible(txid)


@dataclass(frozen=True)
class Stitch:
    """Which copy snapshot decides a statement: S, or the snapshot a table was read with apart from S.

    Unlogged tables cannot be read on a standby, so the copy reads them on the primary with a snapshot of
    their own (docs/copy.md); a write to such a table is in the copy iff its txid is visible in *that*
    snapshot. Tables are keyed "schema.table"; a name written without a schema matches when exactly one
    key has that table name (the session's search_path is not consulted).
    """

    default: Snapshot
    tables: dict[str, Snapshot]

    def for_relations(self, relations: tuple[str, ...]) -> Snapshot | None:
        """The snapshot for a statement writing `relations`; None when they need different snapshots."""
        found = self.all_for(relations)
        return next(iter(found)) if len(found) == 1 else None

    def all_for(self, relations: tuple[str, ...]) -> set[Snapshot]:
        """Every snapshot the tables `relations` were copied at."""
        return {self._lookup(name) for name in relations} if self.tables and relations else {self.default}

    def _lookup(self, name: str) -> Snapshot:
        if "." in name:
            return self.tables.get(name, self.default)
        matches = [snap for key, snap in self.tables.items() if key.rsplit(".", 1)[-1] == name]
        return matches[0] if len(matches) == 1 else self.default


def make_stitch(snapshot: str, table_snapshots: dict[str, str] | None = None) -> Stitch:
    """A Stitch from S and the per-table snapshots of tables copied apart (text forms)."""
    default = parse_snapshot(snapshot)
    return Stitch(default, {name: parse_snapshot(text) for name, text in (table_snapshots or {}).items()})
