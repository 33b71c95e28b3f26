"""What `pgleap check` works on and produces: the source's inventory, the target, rules, findings, the report."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]


class Severity(enum.StrEnum):
    """How bad a finding is for the upgrade."""

    ERROR = "error"  # the target rejects the object, or data or behaviour is lost: fix before the copy
    WARNING = "warning"  # restores, but fails or behaves differently when used: fix or accept knowingly
    INFO = "info"  # a behaviour change worth reading; nothing fails

    @property
    def rank(self) -> int:
        """0 for error, 2 for info: sort key, worst first."""
        return {"error": 0, "warning": 1, "info": 2}[self.value]


def major_label(version_num: int) -> str:
    """'9.2' for 90200, '12' for 120000."""
    if version_num >= 100000:
        return str(version_num // 10000)
    return f"{version_num // 10000}.{version_num // 100 % 100}"


def major_num(label: str | int) -> int:
    """90200 for '9.2', 120000 for '12' or 12."""
    text = str(label)
    if "." in text:
        major, minor = text.split(".", 1)
        return int(major) * 10000 + int(minor) * 100
    return int(text) * 10000


@dataclass
class Inventory:
    """Catalog rows of the source database, one list per query of compat/check_queries.py."""

    version_num: int
    database: Row = field(default_factory=dict)
    relations: list[Row] = field(default_factory=list)
    columns: list[Row] = field(default_factory=list)
    functions: list[Row] = field(default_factory=list)
    views: list[Row] = field(default_factory=list)
    operators: list[Row] = field(default_factory=list)
    aggregates: list[Row] = field(default_factory=list)
    extensions: list[Row] = field(default_factory=list)
    roles: list[Row] = field(default_factory=list)
    settings: list[Row] = field(default_factory=list)
    db_role_settings: list[Row] = field(default_factory=list)
    inheritance_parents: list[Row] = field(default_factory=list)
    maintenance_functions: list[Row] = field(default_factory=list)
    passwords_read: bool = True  # False: not a superuser, pg_authid unreadable, password kinds unknown
    notes: list[str] = field(default_factory=list)  # what could not be inspected, and why


@dataclass
class TargetInfo:
    """The target: its major, and what a live connection to it tells (None when only the major is known)."""

    version_num: int
    server_version: str | None = None
    available_extensions: dict[str, list[str]] | None = None  # name -> versions it can install
    default_extension_versions: dict[str, str] | None = None
    settings: dict[str, Row] | None = None  # name -> pg_settings row (reset_val is what a new session gets)

    @property
    def live(self) -> bool:
        """A live target was inspected (not only its major)."""
        return self.settings is not None

    @property
    def label(self) -> str:
        """'18.6' for a live target, '18' otherwise."""
        return self.server_version or major_label(self.version_num)


Detector = Callable[["Rule", Inventory, TargetInfo], list[str]]


@dataclass(frozen=True)
class Rule:
    """One incompatibility: where it changed, how bad it is, how it is found, how it is fixed, where it is written."""

    name: str
    since: int | None  # server_version_num of the first major that behaves differently; None: any upgrade
    severity: Severity
    title: str
    kind: str  # which detector of detect.py finds it
    fix: str
    reference: str  # release note (or documentation) URL
    params: tuple[tuple[str, Any], ...] = ()  # the detector's arguments, as data
    # False: applies to every target from `since` on, whatever the source (a changed default matters
    # whenever the source runs with the old value, since the copy carries no server or database settings).
    needs_crossing: bool = True

    def param(self, key: str, default: Any = None) -> Any:
        """One detector argument."""
        return dict(self.params).get(key, default)

    @property
    def since_label(self) -> str:
        """'9.2', '12', or 'any' for rules not tied to a major."""
        return major_label(self.since) if self.since is not None else "any"

    def applies(self, source_num: int, target_num: int) -> bool:
        """The upgrade crosses the major where this changed (rules without a major always apply)."""
        if self.since is None:
            return True
        if not self.needs_crossing:
            return self.since <= target_num
        return source_num < self.since <= target_num


@dataclass(frozen=True)
class Finding:
    """A rule that fired, with the objects it found."""

    rule: Rule
    objects: tuple[str, ...]

    @property
    def severity(self) -> Severity:
        """The rule's severity."""
        return self.rule.severity

    def as_dict(self) -> Row:
        """JSON-ready."""
        r = self.rule
        return {
            "rule": r.name,
            "severity": r.severity.value,
            "since": r.since_label,
            "title": r.title,
            "objects": list(self.objects),
            "fix": r.fix,
            "reference": r.reference,
        }


@dataclass(frozen=True)
class QueryResult:
    """One workload query on the target (and on the source, to tell upgrade breakage from old breakage)."""

    sql: str
    status: str  # ok, fails, fails_on_source_too, skipped
    how: str  # explain, explain_generic, prepare, execute, skipped
    sqlstate: str | None = None
    error: str | None = None
    source_error: str | None = None
    count: int = 1  # texts with this fingerprint in the workload

    def as_dict(self) -> Row:
        """JSON-ready."""
        return {
            "sql": self.sql,
            "status": self.status,
            "how": self.how,
            "sqlstate": self.sqlstate,
            "error": self.error,
            "source_error": self.source_error,
            "count": self.count,
        }


@dataclass(frozen=True)
class RestoreRejection:
    """An object of the source's schema that the target rejected in the trial restore."""

    object: str
    error: str


@dataclass
class CheckReport:
    """Everything `pgleap check` found."""

    source_version: str
    source_version_num: int
    database: str
    target: TargetInfo
    findings: list[Finding]
    rules_checked: int
    notes: list[str] = field(default_factory=list)
    workload: list[QueryResult] | None = None  # None: no workload check was asked for
    rejected: list[RestoreRejection] | None = None  # the trial restore of the schema (workload check)
    generated_at: str = ""

    def counts(self) -> dict[str, int]:
        """Findings per severity."""
        counts = {s.value: 0 for s in Severity}
        for f in self.findings:
            counts[f.severity.value] += 1
        return counts

    @property
    def failing_queries(self) -> list[QueryResult]:
        """Workload queries that work on the source and fail on the target."""
        return [q for q in self.workload or [] if q.status == "fails"]

    @property
    def clean(self) -> bool:
        """Nothing to report: no finding, no failing query, nothing rejected."""
        return not self.findings and not self.failing_queries and not self.rejected

    def as_dict(self) -> Row:
        """JSON-ready."""
        return {
            "source": {
                "version": self.source_version,
                "version_num": self.source_version_num,
                "database": self.database,
            },
            "target": {"version": self.target.label, "version_num": self.target.version_num, "live": self.target.live},
            "generated_at": self.generated_at,
            "rules_checked": self.rules_checked,
            "counts": self.counts(),
            "findings": [f.as_dict() for f in self.findings],
            "notes": self.notes,
            "workload": None if self.workload is None else [q.as_dict() for q in self.workload],
            "rejected": None
            if self.rejected is None
            else [{"object": r.object, "error": r.error} for r in self.rejected],
        }
