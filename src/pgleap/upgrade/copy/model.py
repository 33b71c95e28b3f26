"""Records the copy works with: tables, columns and the copy's options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pgleap.config import SyncConfig
from pgleap.upgrade.copy.connect import qualified

INTEGER_KEY_TYPES = frozenset({"int2", "int4", "int8"})
SPLIT_POLICIES = ("makespan", "always")


@dataclass(frozen=True)
class Column:
    """A column COPY carries."""

    name: str
    type_name: str
    type_schema: str
    element_name: str | None


@dataclass(frozen=True)
class Table:
    """A source table with rows of its own (partitioned parents have none; their leaves are tables here)."""

    schema: str
    name: str
    oid: int
    persistence: str
    pages: int
    reltuples: float
    is_partition: bool
    has_children: bool
    columns: tuple[Column, ...] = ()
    key: tuple[str, ...] = ()
    key_types: tuple[str, ...] = ()
    binary: bool = True

    @property
    def qualified(self) -> str:
        """ "schema"."name"."""
        return qualified(self.schema, self.name)

    @property
    def label(self) -> str:
        """schema.name, unquoted, for humans."""
        return f"{self.schema}.{self.name}"

    @property
    def unlogged(self) -> bool:
        """Unlogged tables are empty on a standby and unreadable there; they are read on the primary."""
        return self.persistence == "u"

    @property
    def integer_key(self) -> str | None:
        """The single integer primary-key column, which splits into value ranges; else None."""
        if len(self.key) == 1 and self.key_types[0] in INTEGER_KEY_TYPES:
            return self.key[0]
        return None


@dataclass(frozen=True)
class CopyOptions:
    """Knobs of one copy (config keys proposed under [auto_upgrade.sync])."""

    parallel_workers: int = 4
    split_threshold_bytes: int = 256 * 1024 * 1024  # tables above this are split into ranges
    chunk_bytes: int = 128 * 1024 * 1024  # target size of one range
    # "makespan": split a table above the threshold only when that shortens the estimated copy (plan.py);
    # "always": split every table above the threshold.
    split_policy: str = "makespan"
    on_schema_error: str = "stop"  # or "skip"
    copy_roles: bool = True
    binary: bool = True  # False forces text COPY everywhere
    resume_replay: bool = True  # resume replay on the replica once the copy is done
    analyze: bool = True  # ANALYZE the target at the end (statistics do not travel)
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.on_schema_error not in ("stop", "skip"):
            raise ValueError(f"on_schema_error must be 'stop' or 'skip', got {self.on_schema_error!r}")
        if self.split_policy not in SPLIT_POLICIES:
            raise ValueError(f"split_policy must be 'makespan' or 'always', got {self.split_policy!r}")
        if self.parallel_workers < 1:
            raise ValueError("parallel_workers must be at least 1")


def copy_options(sync: SyncConfig, **overrides: Any) -> CopyOptions:
    """The copy's options from an [auto_upgrade.sync] table, with `overrides` (from the command line) on top."""
    options: dict[str, Any] = {
        "parallel_workers": sync.parallel_workers,
        "split_threshold_bytes": int(sync.split_threshold_mb * 1024 * 1024),
        "chunk_bytes": max(1, int(sync.chunk_mb * 1024 * 1024)),
        "split_policy": sync.split_policy,
        "on_schema_error": sync.on_schema_error,
        "copy_roles": sync.copy_roles,
        "binary": sync.copy_binary,
    }
    options.update({k: v for k, v in overrides.items() if v is not None})
    return CopyOptions(**options)
