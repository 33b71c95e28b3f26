"""The copy's exception types; each message says what happened and what the DBA can do."""

from __future__ import annotations

from pgleap.errors import PgleapError


class CopyError(PgleapError):
    """The bulk copy cannot go on."""


class SchemaObjectError(CopyError):
    """The target rejected schema objects and on_schema_error = "stop"."""


class SnapshotLostError(CopyError):
    """The snapshot S of an interrupted copy can no longer be honoured; the copy must start over."""


class TargetNotEmptyError(CopyError):
    """The target database holds objects pgleap did not create; it refuses to overwrite them."""


class ToolError(CopyError):
    """A PostgreSQL client program (pg_dump, pg_restore, pg_dumpall, pg_basebackup) failed or is missing."""
