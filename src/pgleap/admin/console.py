"""The admin console's protocol loop: simple queries (and, through admin/extended.py, the extended
protocol without parameters) in, tables or errors out."""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import TYPE_CHECKING

from pgleap import __version__
from pgleap.admin.commands import AdminCommandError, Result, run_command
from pgleap.admin.extended import ExtendedQueries, ExtendedQueryError
from pgleap.protocol import codes
from pgleap.protocol.messages import (
    ProtocolError,
    backend_key_data,
    command_complete,
    data_row,
    error_response,
    parameter_status,
    ready_for_query,
    row_description,
)
from pgleap.protocol.stream import read_message

if TYPE_CHECKING:
    from pgleap.proxy.server import Proxy
    from pgleap.proxy.session import Session

log = logging.getLogger(__name__)
_MAX_ADMIN_MESSAGE = 1024 * 1024


class AdminConsole:
    """Serves admin sessions for one proxy."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def serve(self, session: Session) -> None:
        """Run one admin session until the client leaves."""
        writer = session.writer
        session.server_role = "admin"
        greeting = [
            parameter_status("server_version", f"{__version__}/pgleap"),  # parsable by drivers, as PgBouncer's
            parameter_status("server_encoding", "UTF8"),
            parameter_status("client_encoding", "UTF8"),
            parameter_status("DateStyle", "ISO, MDY"),
            parameter_status("integer_datetimes", "on"),
            parameter_status("standard_conforming_strings", "on"),
            backend_key_data(0, 0),
            ready_for_query(),
        ]
        writer.write(b"".join(greeting))
        extended = ExtendedQueries(lambda text: run_command(self.proxy, session, text))
        skipping_to_sync = False  # after an error in the extended protocol, as PostgreSQL does
        while True:
            try:
                kind, body = await read_message(session.reader, _MAX_ADMIN_MESSAGE)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            except ProtocolError as exc:
                writer.write(error_response(str(exc), codes.PROTOCOL_VIOLATION, "FATAL"))
                break
            if kind == codes.TERMINATE:
                break
            if kind == codes.QUERY:
                await self._answer(session, body.rstrip(b"\0").decode(errors="replace"))
            elif kind == codes.SYNC:
                extended.sync()
                skipping_to_sync = False
                writer.write(ready_for_query())
            elif kind == codes.FLUSH:
                pass
            elif not skipping_to_sync:
                try:
                    writer.write(await self._extended(extended, kind, body))
                except ExtendedQueryError as exc:
                    writer.write(error_response(str(exc), exc.sqlstate, hint=exc.hint))
                    skipping_to_sync = True
                except (ProtocolError, struct.error, UnicodeDecodeError) as exc:
                    writer.write(error_response(f"malformed message {chr(kind)!r}: {exc}", codes.PROTOCOL_VIOLATION))
                    skipping_to_sync = True
                except Exception as exc:
                    writer.write(_command_failure(exc, "extended-protocol command"))
                    skipping_to_sync = True
            await writer.drain()
        writer.close()

    async def _extended(self, extended: ExtendedQueries, kind: int, body: bytes) -> bytes:
        """One extended-protocol message's answer."""
        if kind == codes.PARSE:
            return extended.parse(body)
        if kind == codes.BIND:
            return extended.bind(body)
        if kind == codes.DESCRIBE:
            return await extended.describe(body)
        if kind == codes.EXECUTE:
            return await extended.execute(body)
        if kind == codes.CLOSE:
            return extended.close(body)
        raise ExtendedQueryError(
            f"the pgleap admin console does not take message {chr(kind)!r} (COPY and function calls)",
            codes.FEATURE_NOT_SUPPORTED,
        )

    async def _answer(self, session: Session, text: str) -> None:
        writer = session.writer
        statements = [s.strip() for s in text.split(";") if s.strip()]
        if not statements:
            writer.write(message_empty_query() + ready_for_query())
            return
        for statement in statements:
            try:
                result = await run_command(self.proxy, session, statement)
            except Exception as exc:
                writer.write(_command_failure(exc, statement))
                break
            writer.write(_render(result))
        writer.write(ready_for_query())


def _command_failure(exc: Exception, statement: str) -> bytes:
    """The ErrorResponse for a command that failed: its own message, or the unexpected error, logged."""
    if isinstance(exc, AdminCommandError):
        return error_response(str(exc), codes.SYNTAX_ERROR if exc.syntax else "55000", hint=exc.hint)
    log.exception("admin command %r failed", statement)
    return error_response(f"{statement}: {exc}", "XX000")


def _render(result: Result) -> bytes:
    parts = []
    if result.columns:
        parts.append(row_description(result.columns))
        parts.extend(data_row(row) for row in result.rows)
    parts.append(command_complete(result.tag))
    return b"".join(parts)


def message_empty_query() -> bytes:
    """EmptyQueryResponse."""
    return b"I\x00\x00\x00\x04"
