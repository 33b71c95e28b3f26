"""Bulk copy: schema with the target's pg_dump/pg_restore, parallel COPY at one snapshot S, sequences last."""

from pgleap.upgrade.copy.errors import CopyError, SchemaObjectError, SnapshotLostError, TargetNotEmptyError, ToolError
from pgleap.upgrade.copy.job import CopyJob, CopyReport, format_schema_errors
from pgleap.upgrade.copy.model import CopyOptions
from pgleap.upgrade.copy.progress import copy_gauges, show_upgrade_tables, table_progress, total_progress

__all__ = [
    "CopyError",
    "CopyJob",
    "CopyOptions",
    "CopyReport",
    "SchemaObjectError",
    "SnapshotLostError",
    "TargetNotEmptyError",
    "ToolError",
    "copy_gauges",
    "format_schema_errors",
    "show_upgrade_tables",
    "table_progress",
    "total_progress",
]
