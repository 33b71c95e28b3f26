"""The capture path: forwarding with every message decoded, the probe injected and its answers hidden.

Databases with capture on use this subclass of the proxy's Forwarder. It reassembles whole
messages in both directions, pairs answers with requests (`ExchangeTracker`), feeds the
`TransactionAssembler`, and hands committed transactions to the database's `Capture`.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgleap.protocol import codes
from pgleap.protocol.messages import error_response
from pgleap.proxy.forward import _IDLE, _VALID_FRONTEND, Forwarder, _now
from pgleap.upgrade.capture.classify import Kind, StatementInfo, classify
from pgleap.upgrade.capture.decode import bind_message, codec_for, execute_portal, name_of, parse_message
from pgleap.upgrade.capture.exchange import ExchangeError, ExchangeTracker, Outcome, Request
from pgleap.upgrade.capture.probe import PROBE_SQL, parse_probe_row, probe_extended
from pgleap.upgrade.capture.transaction import Pending, TransactionAssembler

if TYPE_CHECKING:
    from pgleap.upgrade.capture.capture import Capture

log = logging.getLogger(__name__)
_LEN = struct.Struct("!I")
_PROBE = "probe"
_FAILED = ord("E")


@dataclass
class _QueryParts:
    """A simple Query's statements in the order the server answers them; the probe is one part."""

    parts: list[Pending | str]
    index: int = 0

    def current(self) -> Pending | str | None:
        return self.parts[self.index] if self.index < len(self.parts) else None


@dataclass
class _Prepared:
    sql: str
    infos: tuple[StatementInfo, ...]
    param_types: tuple[int, ...]


@dataclass
class _Portal:
    statement: _Prepared
    params: tuple[bytes | None, ...] = ()
    param_formats: tuple[int, ...] = ()


class CapturingForwarder(Forwarder):
    """A Forwarder that also captures every committed write of its session."""

    def init_capture(self, capture: Capture) -> None:
        """Start capturing (called at a transaction boundary)."""
        self.capture = capture
        self.tracker = ExchangeTracker()
        self.assembler = TransactionAssembler(self.database.upgrade.database, self.session.id)
        self.prepared: dict[str, _Prepared] = {}
        self.portals: dict[str, _Portal] = {}
        self._cin = bytearray()
        self._sin = bytearray()
        self._copy_target: Pending | None = None
        self._probe_in_batch = False
        self._out: list[bytes] = []

    @property
    def _codec(self) -> str:
        return codec_for(self.session.parameters.get("client_encoding", "UTF8"))

    # -- client -> server ----------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        """Decode whole client messages, inject the probe where a transaction ends, forward."""
        if self.held is not None:
            self.held += data
            return
        self.stats.bytes_in += len(data)
        buf = self._cin
        buf += data
        offset = 0
        try:
            while len(buf) - offset >= 5:
                if not self.pending and not self.open_batch and self.tx_status == _IDLE and self._must_hold():
                    self._flush_to_server()
                    rest = bytes(buf[offset:])
                    del buf[:]
                    self.stats.bytes_in -= len(rest)
                    self._hold(rest, 0)
                    return
                kind = buf[offset]
                (length,) = _LEN.unpack_from(buf, offset + 1)
                if not _VALID_FRONTEND[kind] or length < 4 or length > self.max_size:
                    self._flush_to_server()
                    self._protocol_violation(kind, length)
                    return
                end = offset + 1 + length
                if end > len(buf):
                    break
                raw = bytes(buf[offset:end])
                offset = end
                if kind == codes.TERMINATE:
                    self.terminating = True
                    self._flush_to_server()
                    self.close()
                    return
                self._client_message(kind, raw)
        except (ExchangeError, ValueError, struct.error, UnicodeDecodeError) as exc:
            self._capture_broken(exc)
            return
        finally:
            del buf[:offset]
        self._flush_to_server()

    def _flush_to_server(self) -> None:
        if self._out:
            self.server_transport.write(b"".join(self._out))
            self._out.clear()

    def _send(self, request: Request, raw: bytes) -> None:
        self.tracker.sent(request)
        self._out.append(raw)

    def _client_message(self, kind: int, raw: bytes) -> None:
        body = raw[5:]
        if kind == codes.QUERY:
            self.pending.append(_now())
            self.open_batch = False
            self._client_query(body[:-1].decode(self._codec), raw)
        elif kind == codes.PARSE:
            self.open_batch = True
            msg = parse_message(body)
            sql = msg.sql.decode(self._codec)
            self.prepared[msg.name] = _Prepared(sql, classify(sql), msg.param_types)
            self._send(Request(kind), raw)
        elif kind == codes.BIND:
            self.open_batch = True
            bind = bind_message(body)
            statement = self.prepared.get(bind.statement)
            if statement is not None:
                self.portals[bind.portal] = _Portal(statement, bind.params, bind.param_formats)
            self._send(Request(kind), raw)
        elif kind == codes.EXECUTE:
            self.open_batch = True
            self._client_execute(execute_portal(body), raw)
        elif kind == codes.SYNC:
            self.pending.append(_now())
            self.open_batch = False
            if (
                not self.assembler.explicit
                and self.assembler.needs_probe()
                and not self._probe_in_batch
                and self._probe_allowed()
            ):
                self._inject_extended_probe()
            self._probe_in_batch = False
            self._send(Request(kind), raw)
        elif kind in (codes.DESCRIBE, codes.CLOSE):
            self.open_batch = True
            target, name = name_of(body)
            if kind == codes.CLOSE:
                (self.prepared if target == "S" else self.portals).pop(name, None)
            self._send(Request(kind, describe_statement=kind == codes.DESCRIBE and target == "S"), raw)
        elif kind == codes.COPY_DATA:
            if self._copy_target is not None:
                self._copy_target.copy_data.append(body)
            self._out.append(raw)
        elif kind == codes.FUNCTION_CALL:
            # A fast-path function call cannot be replayed as SQL: count it, never drop it silently.
            self.pending.append(_now())
            self.open_batch = False
            self.capture.report_unreplayable(self.session.id, "FunctionCall (fast-path function call)")
            self._send(Request(kind), raw)
        else:  # Flush, CopyDone, CopyFail
            if kind in (codes.COPY_DONE, codes.COPY_FAIL):
                self._copy_target = None
            self._send(Request(kind), raw)

    def _client_query(self, sql: str, raw: bytes) -> None:
        infos = classify(sql)
        assembler = self.assembler
        parts: list[Pending | str] = []
        explicit = assembler.explicit
        # In an aborted transaction the probe would fail and the server would skip the client's COMMIT.
        may_write = assembler.may_write and self._probe_allowed()
        splice_at: int | None = None
        for info in infos:
            if info.kind is Kind.BEGIN:
                explicit = True
            elif info.kind in (Kind.COMMIT, Kind.ROLLBACK):
                if info.kind is Kind.COMMIT and may_write and splice_at is None:
                    splice_at = info.start
                    parts.append(_PROBE)
                explicit = False
                may_write = False
            if info.writes:
                may_write = True
            assembler.sending(info)
            parts.append(Pending(info))
        text = sql
        if splice_at is not None:
            text = f"{sql[:splice_at]}{PROBE_SQL};{sql[splice_at:]}"
        elif may_write and not explicit:
            text = f"{sql};{PROBE_SQL}"  # the implicit transaction ends with the string
            parts.append(_PROBE)
        if text is not sql:
            payload = text.encode(self._codec) + b"\0"
            raw = bytes((codes.QUERY,)) + _LEN.pack(len(payload) + 4) + payload
        self._send(Request(codes.QUERY, context=_QueryParts(parts)), raw)

    def _client_execute(self, portal_name: str, raw: bytes) -> None:
        portal = self.portals.get(portal_name)
        if portal is None or not portal.statement.infos:
            self._send(Request(codes.EXECUTE), raw)
            return
        info = portal.statement.infos[0]
        if info.kind is Kind.COMMIT and self.assembler.needs_probe() and self._probe_allowed():
            self._inject_extended_probe()
        self.assembler.sending(info)
        pending = Pending(info, portal.params, portal.param_formats, portal.statement.param_types)
        self._send(Request(codes.EXECUTE, context=pending), raw)

    def _probe_allowed(self) -> bool:
        """The probe may only run in a transaction that has not failed."""
        return self.tx_status != _FAILED and not self.assembler.failed

    def _inject_extended_probe(self) -> None:
        for kind, raw in probe_extended():
            self._send(Request(kind, injected=True), raw)
        self._probe_in_batch = True

    # -- server -> client ----------------------------------------------------------------

    def from_server(self, data: bytes) -> None:
        """Decode whole server messages, hide the probe's answers, feed the assembler, forward."""
        self.stats.bytes_out += len(data)
        buf = self._sin
        buf += data
        offset = 0
        forward: list[bytes] = []
        try:
            while len(buf) - offset >= 5:
                kind = buf[offset]
                (length,) = _LEN.unpack_from(buf, offset + 1)
                end = offset + 1 + length
                if end > len(buf):
                    break
                raw = bytes(buf[offset:end])
                offset = end
                self.last_server_type = kind
                if self._server_message(kind, raw):
                    forward.append(raw)
        except (ExchangeError, ValueError, struct.error, UnicodeDecodeError) as exc:
            self._capture_broken(exc)
            return
        finally:
            del buf[:offset]
        if forward:
            self.client_transport.write(b"".join(forward))
        committed = self.assembler.take_committed()
        if committed:
            self.capture.record(committed)

    def _server_message(self, kind: int, raw: bytes) -> bool:
        """Handle one server message; True when the client must see it."""
        request, outcome = self.tracker.received(kind, raw[5:])
        if request is None:
            if kind == codes.PARAMETER_STATUS:
                self.session.note_parameter(raw[5:])
            return True
        if request.injected:
            if kind == codes.DATA_ROW:
                self.assembler.probe(*parse_probe_row(raw[5:]))
            elif kind == codes.ERROR_RESPONSE:
                log.warning("session %s: the capture probe failed", self.session.id)
            return False
        if kind == codes.ERROR_RESPONSE:
            self.stats.errors += 1
            self.assembler.failed_statement()
            return True
        if kind == codes.READY_FOR_QUERY:
            self._client_ready(raw[5])
            return True
        context = request.context
        if isinstance(context, _QueryParts):
            return self._query_answer(context, kind, request, raw[5:])
        if isinstance(context, Pending):
            if kind == ord("G"):
                self._copy_target = context
            elif outcome is Outcome.DONE and kind == codes.COMMAND_COMPLETE and request.tag is not None:
                self.assembler.completed(context, request.tag)
        return True

    def _query_answer(self, context: _QueryParts, kind: int, request: Request, body: bytes) -> bool:
        part = context.current()
        if part == _PROBE:
            if kind == codes.DATA_ROW:
                self.assembler.probe(*parse_probe_row(body))
            if kind == codes.COMMAND_COMPLETE:
                context.index += 1
            return False
        if isinstance(part, Pending):
            if kind == ord("G"):
                self._copy_target = part
            elif kind == codes.COMMAND_COMPLETE and request.tag is not None:
                self.assembler.completed(part, request.tag)
                context.index += 1
        return True

    def _client_ready(self, status: int) -> None:
        self.tx_status = status
        stats = self.stats
        if self.pending:
            stats.latency.observe(_now() - self.pending.popleft())
            stats.queries += 1
        if status == _IDLE:
            stats.transactions += 1
            if self.gate.paused and not self.pending:
                self.gate.notify()
        self.assembler.ready(status)

    def _capture_broken(self, exc: Exception) -> None:
        """The stream no longer makes sense to capture: close this session loudly rather than guess."""
        log.error("session %s: capture lost track of the protocol (%s); closing the session", self.session.id, exc)
        self.capture.report_unreplayable(self.session.id, f"capture lost track of the protocol: {exc}")
        self.close(
            error_response(
                "pgleap could not follow this session for the upgrade",
                codes.PROTOCOL_VIOLATION,
                "FATAL",
                detail=str(exc),
            )
        )
