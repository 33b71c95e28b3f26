"""Apply errors: their classification by SQLSTATE, what is transient, and the records kept of them."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pgleap.errors import PgleapError


class ErrorKind(enum.StrEnum):
    """What kind of failure an apply error is, for the DBA deciding what to do about it."""

    SYNTAX = "syntax"  # 42601: the target's grammar rejects the text
    FEATURE_INCOMPATIBILITY = "feature_incompatibility"  # 0A000, or a name/type the target lacks (42xxx)
    CONSTRAINT_VIOLATION = "constraint_violation"  # 23xxx: the target's data differs from the source's
    OTHER = "other"


# SQLSTATEs that mean "try again on a new connection": the server went away, is shutting down or starting
# up, or refused the connection for now. Nothing about the transaction itself is wrong.
_TRANSIENT_STATES = frozenset(["57P01", "57P02", "57P03", "53300", "40001", "40P01"])


def classify_sqlstate(sqlstate: str) -> ErrorKind:
    """The kind of an apply error from its SQLSTATE (the statement had worked on the source)."""
    if sqlstate == "42601":
        return ErrorKind.SYNTAX
    # Every replayed statement committed on the source, so an unknown function, table, column or type on
    # the target (42883, 42P01, 42703, 42704, ...) is an incompatibility between the two, like 0A000.
    # 42501 (insufficient_privilege) is class 42 too but is about the login, not the versions.
    if sqlstate == "0A000" or (sqlstate.startswith("42") and sqlstate != "42501"):
        return ErrorKind.FEATURE_INCOMPATIBILITY
    if sqlstate.startswith("23"):
        return ErrorKind.CONSTRAINT_VIOLATION
    return ErrorKind.OTHER


# Classes that blame the target, not the transaction: insufficient resources (a full disk: 53100), operator
# intervention (a cancelled replay statement: 57014), system and internal errors; and a lock it could not get.
_TARGET_CLASSES = frozenset(["53", "57", "58", "XX"])


def blames_target(sqlstate: str) -> bool:
    """Whether an apply error says the target is in trouble (then replay pauses, never skips)."""
    return sqlstate[:2] in _TARGET_CLASSES or sqlstate == "55P03"


def is_transient(sqlstate: str) -> bool:
    """Whether an error with this SQLSTATE is retried after reconnecting rather than reported."""
    return sqlstate.startswith("08") or sqlstate in _TRANSIENT_STATES


@dataclass(frozen=True)
class ApplyError:
    """A transaction the target refused: kept until a DBA acts on it (I1: reported, never dropped)."""

    database: str
    position: int
    txid: int | None
    statement_index: int  # index in the transaction's statements; -1 for pgleap's own (settings, COMMIT)
    statement: str
    sqlstate: str
    message: str
    kind: ErrorKind
    action: str  # "paused" or "skipped"
    resync_tables: tuple[str, ...] = ()
    recorded_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Divergence:
    """A replayed statement whose command tag differs from the source's (e.g. it touched other rows)."""

    database: str
    position: int
    txid: int | None
    statement_index: int
    statement: str
    source_tag: str
    target_tag: str
    recorded_at: float = field(default_factory=time.time)


class ReplayError(PgleapError):
    """Replay cannot continue; the message says why and what to do."""


class TransientApplyError(ReplayError):
    """The target connection failed in a way a reconnect may cure (dropped, restarting, shutting down)."""


class TargetRefusedError(ReplayError):
    """The target answered one of pgleap's own statements with an error that is not transient."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate  # the target's, when it answered with an ErrorResponse
