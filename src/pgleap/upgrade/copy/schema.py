"""Schema transfer with the target's pg_dump/pg_restore: dump at S, restore pre-data and post-data."""

from __future__ import annotations

import logging
from pathlib import Path

from pgleap.clientenv import client_env
from pgleap.config import ServerConfig
from pgleap.store import SchemaErrorRecord
from pgleap.upgrade.copy.errors import ToolError
from pgleap.upgrade.copy.tools import conninfo, run_tool, tool_env

log = logging.getLogger(__name__)

# Errors that only mean "a previous, interrupted run already created this" when a step is rerun.
_ALREADY_THERE = ("already exists", "multiple primary keys")


async def dump_schema(pg_dump: Path, server: ServerConfig, path: Path, extra: list[str]) -> None:
    """pg_dump -Fc --schema-only of the read side into `path` (written to a temp name, then renamed)."""
    partial = path.with_suffix(".partial")
    # Schema pgleap is replay's bookkeeping (compat/catalog.py): the target gets its own.
    argv = [
        str(pg_dump),
        "-Fc",
        "--schema-only",
        "-N",
        "pgleap",
        "-w",
        "-f",
        str(partial),
        "-d",
        conninfo(server),
        *extra,
    ]
    result = await run_tool(argv, tool_env(server))
    if result.returncode != 0:
        raise ToolError(f"pg_dump --schema-only of {server.describe()} failed: {result.stderr.strip()}")
    partial.replace(path)


def parse_restore_errors(stderr: str, section: str) -> tuple[list[SchemaErrorRecord], list[str]]:
    """Split pg_restore's stderr into rejected objects (object, error, definition) and other fatal errors."""
    records: list[SchemaErrorRecord] = []
    fatal: list[str] = []
    current_object = ""
    error_lines: list[str] | None = None
    definition: list[str] | None = None

    def flush() -> None:
        nonlocal error_lines, definition
        if error_lines is not None:
            text = "\n".join(definition or []).strip()
            # Without --verbose pg_restore names no TOC entry: the statement's first line names the object.
            obj = current_object or text.split("\n", 1)[0][:120]
            records.append(
                SchemaErrorRecord(
                    section=section,
                    object=obj,
                    error="\n".join(error_lines).strip(),
                    definition="\n".join(definition or []).strip(),
                )
            )
        error_lines, definition = None, None

    for line in stderr.splitlines():
        if line.startswith("pg_restore:"):
            flush()
            body = line[len("pg_restore:") :].strip()
            if body.startswith("from TOC entry "):
                current_object = body[len("from TOC entry ") :].strip()
            elif body.startswith("error: could not execute query:"):
                error_lines = [body[len("error: could not execute query:") :].strip()]
            elif body.startswith("error:"):
                fatal.append(body)
            continue
        if error_lines is None:
            continue
        if definition is None and line.startswith("Command was: "):
            definition = [line[len("Command was: ") :]]
        elif definition is not None:
            definition.append(line)
        else:
            error_lines.append(line)
    flush()
    return records, fatal


async def restore_section(
    pg_restore: Path, target: ServerConfig, dump: Path, section: str, *, jobs: int, stop_on_error: bool, rerun: bool
) -> list[SchemaErrorRecord]:
    """pg_restore one section; returns the objects the target rejected (after filtering rerun noise)."""
    argv = [str(pg_restore), "-w", "-d", conninfo(target), f"--section={section}"]
    if stop_on_error:
        argv.append("--exit-on-error")
        # pre-data in one transaction: a rejected object leaves the target as it was, so the copy
        # can be rerun after the DBA fixed the cause. post-data runs in parallel sessions instead.
        if jobs <= 1:
            argv.append("--single-transaction")
    if jobs > 1:
        argv.append(f"--jobs={jobs}")
    argv.append(str(dump))
    return await _run_restore(argv, target, section, f"--section={section}", rerun)


async def list_section(pg_restore: Path, dump: Path, section: str) -> str:
    """`pg_restore -l` of one section of the dump: one line per entry, what `-L` selects by."""
    result = await run_tool([str(pg_restore), "-l", f"--section={section}", str(dump)], client_env())
    if result.returncode != 0:
        raise ToolError(f"pg_restore -l --section={section} of {dump} failed: {result.stderr.strip()}")
    return result.stdout


async def restore_entries(
    pg_restore: Path,
    target: ServerConfig,
    dump: Path,
    lines: list[str],
    list_file: Path,
    *,
    section: str,
    what: str,
    jobs: int,
    stop_on_error: bool,
    rerun: bool,
) -> list[SchemaErrorRecord]:
    """pg_restore only the TOC entries `lines` (via a -L list file); returns the objects the target rejected."""
    list_file.write_text("\n".join(lines) + "\n")
    argv = [str(pg_restore), "-w", "-d", conninfo(target), "-L", str(list_file)]
    # On a rerun the entries created before the interruption fail with "already exists": with
    # --exit-on-error the first of them would stop pg_restore before the entries still missing.
    if stop_on_error and not rerun:
        argv.append("--exit-on-error")
    if jobs > 1:
        argv.append(f"--jobs={jobs}")
    argv.append(str(dump))
    try:
        return await _run_restore(argv, target, section, what, rerun)
    finally:
        list_file.unlink(missing_ok=True)


async def _run_restore(
    argv: list[str], target: ServerConfig, section: str, what: str, rerun: bool
) -> list[SchemaErrorRecord]:
    result = await run_tool(argv, tool_env(target))
    records, fatal = parse_restore_errors(result.stderr, section)
    if fatal and not records:
        raise ToolError(f"pg_restore {what} into {target.describe()} failed: " + "; ".join(fatal))
    if rerun:
        records = [r for r in records if not any(marker in r.error for marker in _ALREADY_THERE)]
    if result.returncode != 0 and not records and not rerun:
        raise ToolError(
            f"pg_restore {what} into {target.describe()} exited {result.returncode}: {result.stderr.strip()[-2000:]}"
        )
    for record in records:
        log.warning("target rejected %s (%s): %s", record.object, section, record.error)
    return records
