"""Pairing server answers with the client requests that caused them.

The capture path must know, for every message the server sends, which request it answers:
which statement a CommandComplete tag belongs to, which answers belong to a probe pgleap
injected (and must not reach the client), and which requests the server skipped because an
earlier one failed (after an error in the extended protocol, the server ignores everything
until Sync). This module is that bookkeeping, free of I/O.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pgleap.protocol import codes

# Backend messages that are not part of any answer and may arrive at any time.
ASYNC_MESSAGES = frozenset([codes.NOTICE_RESPONSE, ord("A"), codes.PARAMETER_STATUS])

_PARSE_COMPLETE, _BIND_COMPLETE, _CLOSE_COMPLETE = ord("1"), ord("2"), ord("3")
_PARAMETER_DESCRIPTION, _NO_DATA = ord("t"), ord("n")
_EMPTY_QUERY, _PORTAL_SUSPENDED = ord("I"), ord("s")
_COPY_IN, _COPY_OUT, _COPY_BOTH = ord("G"), ord("H"), ord("W")
_COPY_DATA, _COPY_DONE = ord("d"), ord("c")
_FUNCTION_RESULT = ord("V")
_RUNS_STATEMENTS = frozenset((codes.QUERY, codes.EXECUTE, codes.FUNCTION_CALL, codes.SYNC))


class Outcome(enum.Enum):
    """What one server message means for the request at the head of the queue."""

    PART = "part"  # part of the answer; more follows
    DONE = "done"  # the answer is complete
    FAILED = "failed"  # an ErrorResponse ended the answer
    ASYNC = "async"  # not part of any answer (notice, notification, parameter status)


@dataclass
class Request:
    """A request forwarded to the server, waiting for its answer."""

    kind: int  # frontend message type
    injected: bool = False  # pgleap's own (a probe): its answer never reaches the client
    describe_statement: bool = False  # Describe of a statement: ParameterDescription comes first
    tag: str | None = None  # the CommandComplete tag, once it arrived
    context: Any = None  # what the capture layer attached (e.g. the statement being executed)
    _described: bool = field(default=False, repr=False)
    _copying: bool = field(default=False, repr=False)


class ExchangeTracker:
    """Requests in the order they were forwarded, matched with answers in the order they arrive."""

    def __init__(self) -> None:
        self.queue: deque[Request] = deque()

    def sent(self, request: Request) -> None:
        """A request was forwarded to the server; Flush and CopyData/Done/Fail get no answer of their own."""
        if request.kind not in (codes.FLUSH, codes.COPY_DATA, codes.COPY_DONE, codes.COPY_FAIL):
            self.queue.append(request)

    @property
    def outstanding(self) -> int:
        """Requests still waiting for (the end of) their answer."""
        return len(self.queue)

    def outstanding_statements(self) -> bool:
        """Whether a request that runs statements (or ends a batch) still waits for its answer."""
        return any(r.kind in _RUNS_STATEMENTS for r in self.queue)

    def received(self, kind: int, body: bytes = b"") -> tuple[Request | None, Outcome]:
        """Match one server message; returns the request it answers (None for async) and what it means."""
        if kind in ASYNC_MESSAGES:
            return None, Outcome.ASYNC
        if not self.queue and kind == codes.ERROR_RESPONSE:
            # A FATAL with nothing asked (pg_terminate_backend, idle timeouts): the client must see it as sent.
            return None, Outcome.ASYNC
        if not self.queue:
            raise ExchangeError(f"server sent message type {chr(kind)!r} with no request outstanding")
        request = self.queue[0]
        if kind == codes.ERROR_RESPONSE:
            self._fail_until_sync(request)
            return request, Outcome.FAILED
        outcome = self._advance(request, kind, body)
        if outcome is Outcome.DONE:
            self.queue.popleft()
        return request, outcome

    def _fail_until_sync(self, failed: Request) -> None:
        """An error ends `failed`; in the extended protocol the server skips everything up to Sync."""
        self.queue.popleft()
        if failed.kind in (codes.QUERY, codes.FUNCTION_CALL, codes.SYNC):
            # A simple query (or function call) still ends with ReadyForQuery: keep waiting for it.
            self.queue.appendleft(Request(codes.SYNC, injected=failed.injected, context=failed.context))
            return
        while self.queue and self.queue[0].kind != codes.SYNC:
            self.queue.popleft()

    def _advance(self, request: Request, kind: int, body: bytes) -> Outcome:
        expected = request.kind
        if expected == codes.QUERY:
            return self._simple_query(request, kind, body)
        if expected == codes.PARSE:
            return self._expect(kind, _PARSE_COMPLETE)
        if expected == codes.BIND:
            return self._expect(kind, _BIND_COMPLETE)
        if expected == codes.CLOSE:
            return self._expect(kind, _CLOSE_COMPLETE)
        if expected == codes.SYNC:
            return self._expect(kind, codes.READY_FOR_QUERY)
        if expected == codes.DESCRIBE:
            if request.describe_statement and not request._described:
                request._described = True
                self._require(kind, (_PARAMETER_DESCRIPTION,))
                return Outcome.PART
            self._require(kind, (codes.ROW_DESCRIPTION, _NO_DATA))
            return Outcome.DONE
        if expected == codes.EXECUTE:
            return self._execute(request, kind, body)
        if expected == codes.FUNCTION_CALL:
            if kind == _FUNCTION_RESULT:
                return Outcome.PART
            return self._expect(kind, codes.READY_FOR_QUERY)
        raise ExchangeError(f"no answer expected for frontend message type {chr(expected)!r}")

    @staticmethod
    def _require(kind: int, allowed: tuple[int, ...]) -> None:
        if kind not in allowed:
            names = " or ".join(repr(chr(k)) for k in allowed)
            raise ExchangeError(f"server sent message type {chr(kind)!r} where {names} was expected")

    def _expect(self, kind: int, wanted: int) -> Outcome:
        self._require(kind, (wanted,))
        return Outcome.DONE

    @staticmethod
    def _tag(request: Request, body: bytes) -> None:
        request.tag = body.rstrip(b"\0").decode(errors="replace")

    def _execute(self, request: Request, kind: int, body: bytes) -> Outcome:
        if kind == codes.DATA_ROW or kind in (_COPY_IN, _COPY_OUT, _COPY_BOTH, _COPY_DATA, _COPY_DONE):
            request._copying = request._copying or kind in (_COPY_IN, _COPY_OUT, _COPY_BOTH)
            return Outcome.PART
        if kind == codes.COMMAND_COMPLETE:
            self._tag(request, body)
            return Outcome.DONE
        self._require(kind, (_EMPTY_QUERY, _PORTAL_SUSPENDED))
        return Outcome.DONE

    def _simple_query(self, request: Request, kind: int, body: bytes) -> Outcome:
        if kind == codes.READY_FOR_QUERY:
            return Outcome.DONE
        if kind == codes.COMMAND_COMPLETE:
            # One tag per statement of the query string; the capture layer reads them as they come.
            self._tag(request, body)
        return Outcome.PART


class ExchangeError(Exception):
    """The server's answers do not fit the requests sent: the session cannot be captured reliably."""
