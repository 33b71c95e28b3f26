"""The admin console's protocol loop: simple queries in, tables or errors out."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pgleap.admin.commands import AdminCommandError, Result, run_command
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
            parameter_status("server_version", "pgleap"),
            parameter_status("server_encoding", "UTF8"),
            parameter_status("client_encoding", "UTF8"),
            parameter_status("DateStyle", "ISO, MDY"),
            parameter_status("integer_datetimes", "on"),
            parameter_status("standard_conforming_strings", "on"),
            backend_key_data(0, 0),
            ready_for_query(),
        ]
        writer.write(b"".join(greeting))
        skipping_to_sync = False
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
            if kind != codes.QUERY:
                # Like PostgreSQL after an error: one ErrorResponse, then skip until Sync.
                if not skipping_to_sync:
                    writer.write(
                        error_response(
                            "the pgleap admin console accepts only simple queries (no extended protocol)",
                            codes.FEATURE_NOT_SUPPORTED,
                        )
                    )
                    skipping_to_sync = True
                if kind == codes.SYNC:
                    writer.write(ready_for_query())
                    skipping_to_sync = False
                continue
            text = body.rstrip(b"\0").decode(errors="replace")
            await self._answer(session, text)
            await writer.drain()
        writer.close()

    async def _answer(self, session: Session, text: str) -> None:
        writer = session.writer
        statements = [s.strip() for s in text.split(";") if s.strip()]
        if not statements:
            writer.write(message_empty_query() + ready_for_query())
            return
        for statement in statements:
            try:
                result = await run_command(self.proxy, session, statement)
            except AdminCommandError as exc:
                writer.write(error_response(str(exc), codes.SYNTAX_ERROR if exc.syntax else "55000", hint=exc.hint))
                break
            except Exception as exc:
                log.exception("admin command %r failed", statement)
                writer.write(error_response(f"{statement}: {exc}", "XX000"))
                break
            writer.write(_render(result))
        writer.write(ready_for_query())


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
