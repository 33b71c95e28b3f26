"""The check's report as text (rich) and as JSON."""

from __future__ import annotations

import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pgleap.upgrade.check.model import CheckReport

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def to_json(report: CheckReport) -> str:
    """The report as indented JSON."""
    return json.dumps(report.as_dict(), indent=2, sort_keys=False)


def print_text(report: CheckReport, console: Console) -> None:
    """The report for a terminal: a summary line, then each finding with its objects and fix."""
    counts = report.counts()
    console.print(
        f"[bold]pgleap check[/bold]: database {escape(report.database)} on PostgreSQL {report.source_version} "
        f"-> {report.target.label}{'' if report.target.live else ' (major only)'}: "
        f"{report.rules_checked} rules checked, "
        + ", ".join(f"[{_STYLE[k]}]{n} {k}{'s' if n != 1 else ''}[/{_STYLE[k]}]" for k, n in counts.items()),
        highlight=False,
    )
    for note in report.notes:
        console.print(f"  note: {escape(note)}", highlight=False)
    for f in report.findings:
        style = _STYLE[f.severity.value]
        console.print(
            f"\n[{style}]{f.severity.value.upper()}[/{style}] [bold]{f.rule.name}[/bold] (since {f.rule.since_label}): "
            f"{escape(f.rule.title)}",
            highlight=False,
        )
        for obj in f.objects:
            console.print(f"    - {escape(obj)}", highlight=False)
        console.print(f"  fix: {escape(f.rule.fix)}", highlight=False)
        console.print(f"  see: {f.rule.reference}", highlight=False)
    if report.rejected:
        console.print(f"\n[bold red]trial restore[/bold red]: the target rejected {len(report.rejected)} object(s)")
        for r in report.rejected:
            console.print(f"    - {escape(r.object)}: {escape(r.error)}", highlight=False)
    if report.workload is not None:
        _print_workload(report, console)
    if report.clean:
        console.print("\n[green]nothing found: the target should take this database as it is[/green]")


def _print_workload(report: CheckReport, console: Console) -> None:
    workload = report.workload or []
    failing = report.failing_queries
    console.print(
        f"\n[bold]workload[/bold]: {len(workload)} distinct queries, [red]{len(failing)} fail on the target[/red], "
        f"{sum(q.status == 'fails_on_source_too' for q in workload)} fail on the source too, "
        f"{sum(q.status == 'skipped' for q in workload)} not checked",
        highlight=False,
    )
    if not failing:
        return
    table = Table("query", "sqlstate", "error on the target", show_lines=True)
    for q in failing:
        table.add_row(escape(q.sql), q.sqlstate or "", escape(q.error or ""))
    console.print(table)
