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
        raise SnapshotFormatError(f"snapshot {text!r} is not of the form xmin:xmax:xip,...; it must be the text "
                                  f"of txid_current_snapshot() taken for the copy")
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
