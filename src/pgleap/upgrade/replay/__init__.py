"""Replay: apply the change log on the target in commit order, exactly once, stitched to the copy by S."""

from pgleap.upgrade.replay.applier import OnApplyError, Replayer, ReplayStatus
from pgleap.upgrade.replay.errors import (
    ApplyError,
    Divergence,
    ErrorKind,
    ReplayError,
    TargetRefusedError,
    TransientApplyError,
    classify_sqlstate,
    is_transient,
)
from pgleap.upgrade.replay.journal import ApplyJournal
from pgleap.upgrade.replay.lag import ReplayLag
from pgleap.upgrade.replay.snapshot import Snapshot, SnapshotFormatError, Stitch, make_stitch, parse_snapshot, visible

__all__ = [
    "ApplyError",
    "ApplyJournal",
    "Divergence",
    "ErrorKind",
    "OnApplyError",
    "ReplayError",
    "ReplayLag",
    "ReplayStatus",
    "Replayer",
    "Snapshot",
    "SnapshotFormatError",
    "Stitch",
    "TargetRefusedError",
    "TransientApplyError",
    "classify_sqlstate",
    "is_transient",
    "make_stitch",
    "parse_snapshot",
    "visible",
]
