"""The admin console's commands, each answering with a table."""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgleap import __version__
from pgleap.errors import PgleapError

if TYPE_CHECKING:
    from pgleap.proxy.server import Proxy
    from pgleap.proxy.session import Session


@dataclass
class Result:
    """What a command answers: optional columns and rows, and a command tag."""

    tag: str
    columns: Sequence[str] = ()
    rows: Sequence[Sequence[Any]] = field(default_factory=list)


def notes_result(tag: str, notes: Sequence[str]) -> Result:
    """A command's answer as one `note` column, a row per note."""
    return Result(tag, ["note"], [[n] for n in notes])


class AdminCommandError(Exception):
    """A command that is unknown or cannot run now."""

    def __init__(self, message: str, *, syntax: bool = False, hint: str | None = None) -> None:
        super().__init__(message)
        self.syntax = syntax
        self.hint = hint


Handler = Callable[["Proxy", "Session"], Awaitable[Result]]
ArgumentHandler = Callable[["Proxy", "Session", str], Awaitable[Result]]
_COMMANDS: dict[str, Handler] = {}
_ARGUMENT_COMMANDS: dict[str, tuple[re.Pattern[str], ArgumentHandler]] = {}

_SECRET_KEYS = ("password", "scram_verifier", "md5_hash")


def command(name: str) -> Callable[[Handler], Handler]:
    """Register an admin command under its normalised text."""

    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = handler
        return handler

    return register


def command_with_argument(name: str) -> Callable[[ArgumentHandler], ArgumentHandler]:
    """Register a command that takes one string literal after its name: VERIFY TABLE 'public.accounts'."""
    pattern = re.compile(r"\s*" + r"\s+".join(name.split()) + r"\s+'((?:[^']|'')*)'\s*", re.IGNORECASE)

    def register(handler: ArgumentHandler) -> ArgumentHandler:
        _ARGUMENT_COMMANDS[name] = (pattern, handler)
        return handler

    return register


def valid_commands() -> list[str]:
    """Every command the console understands."""
    return sorted([*_COMMANDS, *(f"{name} '...'" for name in _ARGUMENT_COMMANDS)])


async def run_command(proxy: Proxy, session: Session, statement: str) -> Result:
    """Run one admin statement."""
    normalised = " ".join(statement.upper().split())
    handler = _COMMANDS.get(normalised)
    if handler is None:
        for pattern, with_argument in _ARGUMENT_COMMANDS.values():
            found = pattern.fullmatch(statement)
            if found is not None:
                return await with_argument(proxy, session, found.group(1).replace("''", "'"))
        raise AdminCommandError(
            f"unknown admin command: {statement}",
            syntax=True,
            hint="valid commands: " + ", ".join(valid_commands()),
        )
    return await handler(proxy, session)


def _ts(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S+00")


@command("SHOW CLIENTS")
async def show_clients(proxy: Proxy, _session: Session) -> Result:
    """One row per client connection."""
    columns = [
        "id",
        "user",
        "database",
        "addr",
        "port",
        "tls",
        "state",
        "server_role",
        "application_name",
        "connected_at",
    ]
    rows = [
        [
            s.id,
            s.user,
            s.client_params.get("database") or s.user,
            s.client_addr,
            s.client_port,
            s.tls,
            s.state,
            s.server_role,
            s.client_params.get("application_name", ""),
            _ts(s.connected_at),
        ]
        for s in sorted(proxy.sessions.values(), key=lambda s: s.id)
    ]
    return Result(f"SHOW {len(rows)}", columns, rows)


@command("SHOW SERVERS")
async def show_servers(proxy: Proxy, _session: Session) -> Result:
    """One row per server connection pgleap holds for a client."""
    columns = ["client_id", "role", "host", "port", "database", "user", "backend_pid", "server_version", "state"]
    rows = []
    for s in sorted(proxy.sessions.values(), key=lambda s: s.id):
        f = s.forwarder
        if f is None or f.closed.done():
            continue
        b = f.backend
        rows.append(
            [
                s.id,
                s.server_role,
                b.server.host,
                b.server.port,
                b.server.database,
                b.server.user,
                b.pid,
                b.server_version,
                s.state,
            ]
        )
    return Result(f"SHOW {len(rows)}", columns, rows)


def _flatten(prefix: str, value: Any, out: list[list[str]]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _flatten(f"{prefix}.{f.name}" if prefix else f.name, getattr(value, f.name), out)
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            _flatten(f"{prefix}[{i}]", item, out)
    else:
        secret = prefix.rsplit(".", 1)[-1] in _SECRET_KEYS and value is not None
        out.append([prefix, "********" if secret else ("" if value is None else str(value))])


@command("SHOW CONFIG")
async def show_config(proxy: Proxy, _session: Session) -> Result:
    """The running configuration, secrets masked."""
    rows: list[list[str]] = []
    config = proxy.config
    _flatten("pgleap", config.proxy, rows)
    rows.append(["pgleap.admin_user", config.admin.user])
    _flatten("users", config.users, rows)
    _flatten("auto_upgrade", config.upgrades, rows)
    return Result(f"SHOW {len(rows)}", ["key", "value"], rows)


@command("SHOW VERSION")
async def show_version(_proxy: Proxy, _session: Session) -> Result:
    """pgleap's version."""
    return Result("SHOW 1", ["version"], [[f"pgleap {__version__} (Python {platform.python_version()})"]])


@command("SHOW STATS")
async def show_stats(proxy: Proxy, _session: Session) -> Result:
    """Totals per database."""
    columns = [
        "database",
        "route",
        "clients",
        "total_xact_count",
        "total_query_count",
        "total_errors",
        "total_received",
        "total_sent",
        "avg_query_time_us",
    ]
    rows = []
    for name, db in sorted(proxy.databases.items()):
        st = db.stats
        count = st.latency.count
        avg = int(st.latency.total / count * 1e6) if count else 0
        clients = sum(1 for s in proxy.sessions.values() if s.database is db)
        rows.append(
            [name, db.route.role, clients, st.transactions, st.queries, st.errors, st.bytes_in, st.bytes_out, avg]
        )
    return Result(f"SHOW {len(rows)}", columns, rows)


@command("SHOW UPGRADE TABLES")
async def show_upgrade_tables(proxy: Proxy, _session: Session) -> Result:
    """Copy progress per table: chunks, rows, bytes, rate, ETA and flags (e.g. no_key)."""
    from pgleap.upgrade.copy.progress import SHOW_UPGRADE_TABLES_COLUMNS, show_upgrade_tables

    store = proxy.state_store()
    rows: list[Sequence[Any]] = []
    if store is not None:
        for name in sorted(proxy.databases):
            rows.extend((name, *row) for row in show_upgrade_tables(store, name))
    return Result(f"SHOW {len(rows)}", ["database", *SHOW_UPGRADE_TABLES_COLUMNS], rows)


@command("SHOW CAPTURE")
async def show_capture(proxy: Proxy, _session: Session) -> Result:
    """Per database: whether writes are captured, how many reached the change log, and what went wrong."""
    columns = [
        "database",
        "capturing",
        "sessions_capturing",
        "transactions",
        "statements",
        "log_failures",
        "commits_held",
        "commit_hold_avg_ms",
        "unreplayable",
        "inserts_without_image",
        "row_images_ready",
        "log_healthy",
        "log_pending",
        "log_error",
        "bypass_writers",
        "bypass_addresses",
    ]
    rows: list[Sequence[Any]] = []
    for name, db in sorted(proxy.databases.items()):
        capture = db.capture
        sessions = sum(1 for s in proxy.sessions.values() if s.forwarder is not None and s.forwarder.capture is capture)
        # Writers seen bypassing pgleap stay a risk after capture stops: their writes never reached the log.
        monitor = proxy.bypass_monitors.get(name)
        bypass = [len(monitor.writers), monitor.addresses()] if monitor is not None else [0, ""]
        if capture is None:
            rows.append([name, False, 0, 0, 0, 0, 0, None, 0, 0, None, None, None, None, *bypass])
            continue
        stats = capture.changelog.stats()
        hold = capture.commit_hold
        rows.append(
            [
                name,
                True,
                sessions,
                capture.transactions,
                capture.statements,
                capture.log_failures,
                hold.count,
                round(hold.total / hold.count * 1000, 3) if hold.count else None,
                len(capture.problems),
                capture.inserts_without_image,
                capture.catalog is not None and capture.catalog.loaded,
                stats.healthy,
                stats.pending,
                stats.last_error,
                *bypass,
            ]
        )
    return Result(f"SHOW {len(rows)}", columns, rows)


@command("START CAPTURE")
async def start_capture(proxy: Proxy, _session: Session) -> Result:
    """Start capturing committed writes of every database into the change log."""
    try:
        notes = proxy.start_capture()
    except PgleapError as exc:
        raise AdminCommandError(f"START CAPTURE failed: {exc}") from exc
    notes += await proxy.row_images_ready()
    return notes_result("START CAPTURE", notes)


@command("STOP CAPTURE")
async def stop_capture(proxy: Proxy, _session: Session) -> Result:
    """Stop capturing; returns once what was captured is in the log."""
    notes = await proxy.stop_capture()
    return notes_result("STOP CAPTURE", notes)


@command("PAUSE")
async def pause(proxy: Proxy, _session: Session) -> Result:
    """Hold new transactions and wait until running ones have finished."""
    await proxy.pause()
    return Result("PAUSE")


@command("RESUME")
async def resume(proxy: Proxy, _session: Session) -> Result:
    """Release held transactions."""
    proxy.resume()
    return Result("RESUME")


@command("RELOAD")
async def reload(proxy: Proxy, _session: Session) -> Result:
    """Re-read the config file."""
    try:
        notes = proxy.reload()
    except Exception as exc:
        raise AdminCommandError(f"RELOAD failed, the running config is unchanged: {exc}") from exc
    return notes_result("RELOAD", notes)


@command("SHUTDOWN")
async def shutdown(proxy: Proxy, _session: Session) -> Result:
    """Shut pgleap down gracefully (running transactions finish first)."""
    proxy.spawn(proxy.shutdown())
    return Result("SHUTDOWN")


# The upgrade engine's commands live in their own module; importing it registers them.
from pgleap.admin import phase_commands, upgrade_commands, validation_commands, verify_commands  # noqa: E402, F401
