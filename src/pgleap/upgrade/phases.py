"""The phases of one database's upgrade (DESIGN.md "Phases") and which moves between them are allowed."""

from __future__ import annotations

import enum

from pgleap.errors import PgleapError


class Phase(enum.StrEnum):
    """Where an upgrade stands; persisted in the state store after every transition."""

    INITIALIZING = "initializing"  # capture being switched on
    COPYING = "copying"  # the bulk copy at S runs
    CATCHING_UP = "catching_up"  # replay drains what was logged during the copy
    MIRRORING = "mirroring"  # replay follows; reads are compared, tables verified
    CUTOVER_READY = "cutover_ready"  # every gate holds
    CUT_OVER = "cut_over"
    COMPLETE = "complete"
    ROLLED_BACK = "rolled_back"


# Forward moves; ROLLED_BACK (the upgrade abandoned) is reachable from every phase before cutover and after
# COMPLETE from none; a failing gate moves CUTOVER_READY back to MIRRORING, and ROLLBACK UPGRADE after
# cutover moves clients back to the source and the upgrade back to MIRRORING (it may cut over again).
_NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.INITIALIZING: frozenset({Phase.COPYING}),
    Phase.COPYING: frozenset({Phase.CATCHING_UP}),
    Phase.CATCHING_UP: frozenset({Phase.MIRRORING}),
    Phase.MIRRORING: frozenset({Phase.CUTOVER_READY, Phase.CUT_OVER}),  # the latter by INITIATE CUTOVER FORCE
    Phase.CUTOVER_READY: frozenset({Phase.MIRRORING, Phase.CUT_OVER}),
    Phase.CUT_OVER: frozenset({Phase.MIRRORING, Phase.COMPLETE}),  # back by ROLLBACK UPGRADE: the source again
    Phase.COMPLETE: frozenset(),
    Phase.ROLLED_BACK: frozenset({Phase.INITIALIZING}),
}
RUNNING = frozenset({Phase.INITIALIZING, Phase.COPYING, Phase.CATCHING_UP, Phase.MIRRORING, Phase.CUTOVER_READY})
# Phases in which the target takes replay's writes, or the clients': a copy must not drop it.
TARGET_IN_USE = frozenset({Phase.CATCHING_UP, Phase.MIRRORING, Phase.CUTOVER_READY, Phase.CUT_OVER, Phase.COMPLETE})
RESUMED = RUNNING | {Phase.CUT_OVER}  # what a restart picks up again


class PhaseError(PgleapError):
    """A move between phases that the state machine does not allow."""


def check_move(current: Phase | None, to: Phase) -> None:
    """Raise PhaseError unless an upgrade in `current` (None: never started) may move to `to`."""
    if current is None:
        allowed = frozenset({Phase.INITIALIZING})
    elif to is Phase.ROLLED_BACK:
        allowed = frozenset({to}) if current in RUNNING else frozenset()
    else:
        allowed = _NEXT[current]
    if to not in allowed:
        where = "not started" if current is None else current.value
        raise PhaseError(f"an upgrade that is {where} cannot move to {to.value}")
