"""The capture path: forwarding with every message decoded, the probe injected and its answers hidden.

Databases with capture on use this subclass of the proxy's Forwarder. It reassembles whole
messages in both directions, pairs answers with requests (`ExchangeTracker`), feeds the
`TransactionAssembler`, and writes each write transaction to the change log *before* its
COMMIT reaches the source (invariant I4: a crash at any instant loses no committed write):

- the probe (`SELECT txid, now(), settings`) runs inside the transaction, hidden from the
  client: appended to the first write of an explicit transaction, or just before its end;
- at the commit point (a COMMIT, or the Sync that ends an implicit extended-protocol
  transaction) the client's bytes from that message on are *stashed* until every statement
  of the transaction is answered and its record is durable as `pending`; then they go on;
- an implicit simple-query write (autocommit) is sent as `BEGIN; <query>; <probe>`, and
  pgleap sends the COMMIT itself once the record is durable, hiding what it added;
- the source's answer to the COMMIT settles the record (committed or aborted).

A COMMIT inside a longer query string (`INSERT ...; COMMIT; ...`) cannot be held apart from
the rest of the string: such a transaction is logged after the answer and counted.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, cast

from pgleap.protocol import codes
from pgleap.protocol.messages import error_response, message, text_row
from pgleap.proxy.forward import _IDLE, _VALID_FRONTEND, Forwarder, _now
from pgleap.proxy.session_state import SESSION_SETTINGS_SQL, MovableState
from pgleap.store.records import CapturedTransaction
from pgleap.upgrade.capture.catalog import SourceCatalog
from pgleap.upgrade.capture.classify import Kind, StatementInfo, classify
from pgleap.upgrade.capture.ddl_block import blocked_command, refusal_sql
from pgleap.upgrade.capture.decode import bind_message, execute_portal, name_of, parse_message
from pgleap.upgrade.capture.encoding import codec_for, to_utf8
from pgleap.upgrade.capture.exchange import ExchangeError, ExchangeTracker, Outcome, Request
from pgleap.upgrade.capture.images import (
    ImagePlan,
    ImageRows,
    client_bind,
    client_row_description,
    insert_target,
    plan_insert,
)
from pgleap.upgrade.capture.probe import (
    changes_captured_setting,
    parse_probe_row,
    probe_extended,
    probe_query,
    probe_sql,
)
from pgleap.upgrade.capture.transaction import Pending, TransactionAssembler
from pgleap.upgrade.compat import UnsupportedVersionError, facts_for, version_num_of
from pgleap.upgrade.compat.adapters import adapter_for
from pgleap.upgrade.compat.facts import PG90

if TYPE_CHECKING:
    from pgleap.upgrade.capture.capture import Capture, HeldCommit
    from pgleap.upgrade.verify.sampling import SourceSample

log = logging.getLogger(__name__)
_LEN = struct.Struct("!I")
_PROBE = "probe"
_SETTINGS = "settings"  # a probe read only for the settings, around a SET of a captured one (not for the txid)
_HIDDEN = "hidden"  # pgleap's own BEGIN in front of an implicit transaction
_FAILED = ord("E")
_IN_BLOCK = ord("T")
_COPY_IN = ord("G")
_CONTROL = frozenset(
    (Kind.BEGIN, Kind.COMMIT, Kind.ROLLBACK, Kind.SAVEPOINT, Kind.RELEASE, Kind.ROLLBACK_TO, Kind.TWO_PHASE)
)
(_BEGIN,) = classify("BEGIN")
(_COMMIT,) = classify("COMMIT")
(_ROLLBACK,) = classify("ROLLBACK")
_FLUSH = message(codes.FLUSH)
_COPY_FROM_CLIENT = frozenset((codes.COPY_DATA, codes.COPY_DONE, codes.COPY_FAIL))
_NO_PARAMS = struct.pack("!h", 0)
# How long an INSERT into a table DDL has just reshaped waits for the catalog to be read again. The DDL's
# own lock on the source would hold it as long; past this it goes on and is replayed as a statement.
CATALOG_WAIT = 30.0
# The probe goes on a line of its own, so that a trailing `--` comment in the client's text cannot swallow it.
_SEP = "\n;"
# Statements result comparison may sample: SELECTs, and texts pglast cannot parse (old syntax the source ran).
_SAMPLED_COMMANDS = frozenset(["SelectStmt", "Unparseable"])

# Statements PostgreSQL runs to completion at their first Execute even under a row limit (their RETURNING rows
# wait in a store): a suspended portal of one has done all its writes.
_RUN_TO_COMPLETION = frozenset(["InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"])


def _settings_points(infos: tuple[StatementInfo, ...], wrote: bool) -> list[tuple[int, str]]:
    """Where settings probes go in a string: before and after each SET of a captured setting that follows a
    write of the same transaction (`wrote`: one was sent before the string); empty for nearly every string.

    Before: the transaction's first read of its settings must come before any change after its first write.
    After: the change is read before the next statement, and kept at its place for replay. Never before a
    write: the probe's SELECT would take the transaction's snapshot, which a SET does not (a later SET
    TRANSACTION ISOLATION LEVEL would fail, a LOCK taken first would no longer come before the snapshot).
    """
    for info in infos:  # most strings set nothing: a plain loop, no generator
        if info.setting is not None:
            break
    else:
        return []
    points: dict[tuple[int, str], None] = {}  # two SETs in a row share the probe between them
    for i, info in enumerate(infos):
        kind = info.kind
        if kind is Kind.BEGIN or kind is Kind.COMMIT or kind is Kind.ROLLBACK or kind is Kind.TWO_PHASE:
            wrote = False  # AND CHAIN too: the next transaction has written nothing yet
        elif info.writes:
            wrote = True
        elif wrote and info.setting is not None and changes_captured_setting(info):
            points[(i, _SETTINGS)] = points[(i + 1, _SETTINGS)] = None
    return list(points)


def _with_probes(
    sql: str, starts: list[int], statements: list[Pending | str], points: list[tuple[int, str]], probe: str
) -> tuple[str, list[Pending | str]]:
    """`sql` with the probe spliced in before statement i for each (i, marker) of `points` (after the last for
    i == len(statements)), and the parts in the order the server answers them, each marker at its probe's place."""
    if not points:
        return sql, statements
    pieces: list[str] = []
    parts: list[Pending | str] = []
    done = 0  # characters of `sql` and statements already placed
    placed = 0
    for i, marker in sorted(points, key=lambda point: point[0]):
        parts += statements[placed:i]
        placed = max(placed, i)
        if i < len(statements):
            pieces += [sql[done : starts[i]], f"{probe};"]
            done = starts[i]
        else:
            pieces += [sql[done:], f"{_SEP}{probe}"]
            done = len(sql)
        parts.append(marker)
    parts += statements[placed:]
    pieces.append(sql[done:])
    return "".join(pieces), parts


def _has_insert(infos: tuple[StatementInfo, ...]) -> bool:
    # A loop, not any() over a generator: this runs for every statement, and most are not INSERTs.
    for info in infos:  # noqa: SIM110
        if info.command == "InsertStmt":
            return True
    return False


@dataclass
class _QueryParts:
    """A simple Query's statements in the order the server answers them; the probe is one part."""

    parts: list[Pending | str]
    index: int = 0
    wrapped: bool = False  # pgleap put BEGIN in front; its own COMMIT (a _WrapEnd) follows
    sample: SourceSample | None = None  # result comparison hashes this read's answer (verify/sampling.py)

    def current(self) -> Pending | str | None:
        return self.parts[self.index] if self.index < len(self.parts) else None


@dataclass
class _WrapEnd:
    """pgleap's COMMIT (or ROLLBACK) ending a wrapped implicit transaction; its ReadyForQuery is the client's."""

    pending: Pending


class _PreparedLoad:
    """pgleap's own query for the statements the session prepared before capture started."""

    SQL = "SELECT name, statement, parameter_types::oid[]::text FROM pg_prepared_statements WHERE NOT from_sql"


@dataclass
class _Prepared:
    sql: str
    infos: tuple[StatementInfo, ...]
    param_types: tuple[int, ...]
    image: ImagePlan | None = None  # capture appended a RETURNING clause to it
    row_description: bytes | None = None  # its Describe's answer, kept while result comparison samples


@dataclass
class _ImageDescribe:
    """A Describe of a statement (or portal) capture added image columns to: the client sees its own only."""

    plan: ImagePlan


@dataclass
class _Portal:
    statement: _Prepared | None  # None: bound to a statement capture never saw prepared
    params: tuple[bytes | None, ...] = ()
    param_formats: tuple[int, ...] = ()
    bind: bytes = b""  # the Bind body (its result formats are read only for a sampled Execute)
    row_description: bytes | None = None  # its Describe's answer, kept while result comparison samples


@dataclass
class _DescribeOf:
    """A Describe whose RowDescription result comparison keeps (the statement's or portal's)."""

    target: _Prepared | _Portal


class CapturingForwarder(Forwarder):
    """A Forwarder that also captures every committed write of its session."""

    def init_capture(self, capture: Capture) -> None:
        """Start capturing (called at a transaction boundary)."""
        self.capture = capture
        self.tracker = ExchangeTracker()
        # Tagged by the capture's name: after cutover the reverse capture logs under a name of its own.
        self.assembler = TransactionAssembler(
            capture.database, self.session.id, on_problem=partial(capture.report_unreplayable, self.session.id)
        )
        # Moving from one capture to the next (cutover, rollback), the named statements were prepared again on
        # the new server with the client's own text (proxy/session_state.py): known now, without row images.
        before: dict[str, _Prepared] = getattr(self, "prepared", {})
        self.prepared: dict[str, _Prepared] = {
            name: _Prepared(p.sql, p.infos, p.param_types) for name, p in before.items() if name
        }
        self.portals: dict[str, _Portal] = {}
        self._cin = bytearray()
        self._sin = bytearray()
        self._copy_target: Pending | None = None
        # Extended-protocol COPY FROM STDIN: the Execute whose answer (copy-in, or an error) is not in yet,
        # and whether the server is in copy-in mode, where it ignores the client's Sync and Flush.
        self._copy_execute: Pending | None = None
        self._copy_in = False
        # A wrapped autocommit COPY FROM STDIN is in copy-in: its CopyData goes on from the stash (all else waits).
        self._wrapped_copy = False
        self._probe_in_batch = False
        self._probe_inflight = False  # a probe was sent and has not answered yet
        self._batch_refuses_block = False  # the open extended batch has a statement refusing a transaction block
        self._batch_writes = False  # the open extended batch executes a write
        self._batch_control = False  # it executes transaction control, or a statement capture does not know
        self._pass_one = False  # the next client message is a released commit point: let it through
        # Whether the server will be in a transaction block once everything sent has run, while transaction
        # control sent is not answered yet (None: as the last answer says). A COMMIT pipelined behind an
        # unanswered BEGIN is the client's to hold; writes behind it wait for the answers (_waits_for_answers).
        self._block_when_run: bool | None = None
        self._out: list[bytes] = []
        self._fwd: list[bytes] = []
        self._stash: bytearray | None = None  # client bytes held until the transaction's record is durable
        self._commit_point: str | None = None  # "commit", "sync", "copy" or "answers": why the stash was taken
        self._preparing = False
        self._log_id: int | None = None  # the pending record of the transaction whose COMMIT went out
        self._log_tx: CapturedTransaction | None = None  # and that transaction
        self._holding: HeldCommit | None = None  # the prepare the commit point waits on
        self._late_record: HeldCommit | None = None  # a COMMIT let go before its record landed (PREPARE_TIMEOUT)
        self._held_tag: bytes | None = None  # a wrapped string's last CommandComplete, until the COMMIT answers
        self._temp_names: set[str] = set()  # temporary tables this session may have created (never shrinks)
        # SET ROLE ran (for the session, or for the open transaction): RETURNING would be checked against a role
        # capture cannot see, which may lack SELECT on the table; no row images then, or the INSERT would fail.
        self._session_role = False
        self._local_role = False
        # Sampled extended-protocol Executes by id of their Pending, with the number of the Sync that ends their batch.
        self._samples: dict[int, tuple[int, SourceSample]] = {}
        self._syncs_sent = 0
        self._syncs_answered = 0
        self._catalog_waited = False  # the held message comes back from waiting for the catalog
        try:
            facts = facts_for(version_num_of(self.backend.server_version))
            self._do_in_block = not facts.do_may_commit
        except UnsupportedVersionError:
            # An unreadable server_version: the oldest supported major's probe runs on every major, and a DO
            # stays out of a block (it may COMMIT inside, for all capture knows).
            facts = facts_for(PG90)
            self._do_in_block = False
        self._probe_sql = probe_sql(facts)
        self._adapt = self._adapter_for_route()
        if self.server_transport is not None:
            # Statements prepared before capture started are Bound later: learn them, or their writes go unseen.
            # What the client sends meanwhile waits for the answer (a Bind decoded before it would find no
            # statement, and its Execute could not be replayed).
            self._send(
                Request(codes.QUERY, injected=True, context=_PreparedLoad()), self._query_message(_PreparedLoad.SQL)
            )
            self._flush_to_server()
            self._stash = bytearray()

    def _adapter_for_route(self) -> Callable[[str], str] | None:
        """On the target, what clients send is rewritten from the source's names ([auto_upgrade.adapters])."""
        if self.session.server_role != "target":
            return None
        try:
            source = version_num_of(self.database.server_versions.get("source", ""))
            target = version_num_of(self.backend.server_version)
        except UnsupportedVersionError:
            return None  # the source's version is not known yet (after a restart on the target): learned later
        if source // 10000 == target // 10000:
            return None
        adapter = adapter_for(self.database.upgrade)
        return lambda sql: adapter.adapt(sql, source, target)

    @property
    def quiescent(self) -> bool:
        """Also nothing half-framed, unanswered (pgleap's own queries too), held for the log, or being logged."""
        return (
            super().quiescent
            and not self._cin
            and not self._sin
            and not self.tracker.outstanding
            and self._stash is None
            and not self._preparing
        )

    @property
    def _client_encoding(self) -> str:
        return self.session.parameters.get("client_encoding", "UTF8")

    @property
    def _codec(self) -> str:
        return codec_for(self._client_encoding)

    # -- client -> server ----------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        """Decode whole client messages, inject the probe, hold commit points until logged, forward."""
        if self.held is not None:
            self.held += data
            return
        self.stats.bytes_in += len(data)
        if self._stash is not None:
            self._stash += data
            self.stats.bytes_in -= len(data)  # counted when released
            if self._wrapped_copy:
                self._pass_copy_messages()
            return
        buf = self._cin
        buf += data
        offset = 0
        try:
            while len(buf) - offset >= 5:
                if self._stash is not None:
                    break
                if not self.pending and not self.open_batch and self.tx_status == _IDLE and self._must_hold():
                    self._flush_to_server()
                    rest = bytes(buf[offset:])
                    del buf[:]
                    offset = 0
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
                if kind == codes.TERMINATE:
                    self.terminating = True
                    self._flush_to_server()
                    self.close()
                    return
                stash = self._client_message(kind, raw)
                self._pass_one = False
                if stash:
                    self._stash = bytearray()  # this message and everything after it wait
                    break
                offset = end
        except Exception as exc:  # any surprise here (a malformed message, a bug) must end this session, not the proxy
            self._capture_broken(exc)
            return
        finally:
            if self._stash is not None and len(buf) > offset:
                self._stash += buf[offset:]
                self.stats.bytes_in -= len(buf) - offset
                offset = len(buf)
            del buf[:offset]
        self._flush_to_server()
        if self._stash is not None:
            self.block_reading(True, "log")
            self._check_commit_point()

    def _pass_copy_messages(self) -> None:
        """While a wrapped COPY FROM STDIN is in copy-in, its data goes on from the stash; the rest stays held."""
        stash = self._stash
        assert stash is not None
        offset = 0
        while self._wrapped_copy and len(stash) - offset >= 5:
            kind = stash[offset]
            (length,) = _LEN.unpack_from(stash, offset + 1)
            end = offset + 1 + length
            if kind not in _COPY_FROM_CLIENT or length < 4 or length > self.max_size:
                del stash[:offset]
                self._flush_to_server()
                self._capture_broken(ExchangeError(f"message type {chr(kind)!r} during COPY FROM STDIN"))
                return
            if end > len(stash):
                break
            raw = bytes(stash[offset:end])
            offset = end
            self.stats.bytes_in += len(raw)
            self._client_message(kind, raw)
            self._wrapped_copy = kind == codes.COPY_DATA
        del stash[:offset]
        self._flush_to_server()
        if self._wrapped_copy:
            self.unblock_reading(True, "log")  # the rest of the data is still on its way
        else:
            self.block_reading(True, "log")  # until pgleap's COMMIT has answered

    def _flush_to_server(self) -> None:
        if self._out:
            self.server_transport.write(b"".join(self._out))
            self._out.clear()

    def _send(self, request: Request, raw: bytes) -> None:
        self.tracker.sent(request)
        self._out.append(raw)

    def _client_message(self, kind: int, raw: bytes) -> bool:
        """Forward one client message; True when it is a commit point that must wait for the log."""
        body = raw[5:]
        if kind == codes.QUERY:
            sql = body[:-1].decode(self._codec)
            if self._adapt is not None and (adapted := self._adapt(sql)) != sql:
                sql, raw = adapted, self._query_message(adapted)
            return self._client_query(sql, raw)
        if kind == codes.PARSE:
            self.open_batch = True
            msg = parse_message(body)
            sql = msg.sql.decode(self._codec)
            if self._adapt is not None and (adapted := self._adapt(sql)) != sql:
                tail = body[len(msg.name.encode()) + 1 + len(msg.sql) + 1 :]
                raw = message(kind, msg.name.encode() + b"\0" + adapted.encode(self._codec) + b"\0" + tail)
                body, msg = raw[5:], parse_message(raw[5:])
                sql = adapted
            infos = classify(sql)
            if self._wait_for_catalog(infos):
                return True
            self._note_two_phase(infos)
            self._note_role(infos)
            refused = self._refused_ddl(infos)
            if refused is not None:
                sql, infos = refused, classify(refused)
                raw = message(kind, msg.name.encode() + b"\0" + refused.encode() + b"\0" + _NO_PARAMS)
            self._ddl_sent(infos)
            plan = self._image_plan(infos[0]) if len(infos) == 1 else None
            self.prepared[msg.name] = _Prepared(sql, infos, msg.param_types, plan)
            if plan is not None:
                end = infos[0].start + len(infos[0].text)
                rewritten = (sql[:end] + plan.suffix + sql[end:]).encode(self._codec)
                tail = body[len(msg.name.encode()) + 1 + len(msg.sql) + 1 :]
                raw = message(kind, msg.name.encode() + b"\0" + rewritten + b"\0" + tail)
            self._send(Request(kind), raw)
        elif kind == codes.BIND:
            self.open_batch = True
            bind = bind_message(body)
            statement = self.prepared.get(bind.statement)
            # A Bind of a statement capture never saw replaces the portal all the same: never leave a stale one.
            self.portals[bind.portal] = _Portal(statement, bind.params, bind.param_formats, body)
            self.assembler.forget_portal(bind.portal)
            if statement is not None and statement.image is not None:
                raw = message(kind, client_bind(body, statement.image))  # the image columns come back in text
            self._send(Request(kind), raw)
        elif kind == codes.EXECUTE:
            return self._client_execute(execute_portal(body), raw)
        elif kind == codes.SYNC:
            return self._client_sync(raw)
        elif kind in (codes.DESCRIBE, codes.CLOSE):
            self.open_batch = True
            target, name = name_of(body)
            if kind == codes.CLOSE:
                (self.prepared if target == "S" else self.portals).pop(name, None)
                if target != "S":
                    self.assembler.forget_portal(name)
            plan = self._described_image(target, name) if kind == codes.DESCRIBE else None
            context: object = _ImageDescribe(plan) if plan is not None else None
            if kind == codes.DESCRIBE and plan is None and self._samples_reads():
                described = (self.prepared if target == "S" else self.portals).get(name)
                context = _DescribeOf(described) if described is not None else None
            self._send(Request(kind, describe_statement=kind == codes.DESCRIBE and target == "S", context=context), raw)
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
                self._copy_in = False
            self._send(Request(kind), raw)
        return False

    def _described_image(self, target: str, name: str) -> ImagePlan | None:
        if target == "S":
            statement = self.prepared.get(name)
        else:
            portal = self.portals.get(name)
            statement = portal.statement if portal is not None else None
        return statement.image if statement is not None else None

    # -- simple Query -------------------------------------------------------------------

    def _client_query(self, sql: str, raw: bytes) -> bool:
        infos = classify(sql)
        # First, before anything this string does is counted: it is decided again when released.
        if self.pending and self._waits_for_answers(infos):
            self._commit_point = "answers"
            return True
        self._note_two_phase(infos)
        self._note_role(infos)
        if self._wait_for_catalog(infos):
            return True
        refused = self._refused_ddl(infos)
        if refused is not None:
            sql, raw = refused, self._query_message(refused)
            infos = classify(sql)
        a = self.assembler
        in_block = self._in_block_when_run()
        if infos and in_block and infos[0].kind is Kind.COMMIT and not self._pass_one and self._may_have_written():
            if a.txid is None and not self._probe_inflight and self._probe_allowed():
                self._inject_query_probe()
            self._commit_point = "commit"
            return True
        self.pending.append(_now())
        self.open_batch = False
        self._ddl_sent(infos)
        sample = None
        validator = self.proxy.validator
        if validator is not None and len(infos) == 1:
            if not in_block and infos[0].command in _SAMPLED_COMMANDS:
                sample = self._begin_sample(sql)
            elif in_block and infos[0].command == "SelectStmt" and not infos[0].writes and self._may_check():
                # Compared while its transaction is replayed: a check in the transaction's record.
                sample = self._begin_sample(sql, in_transaction=True)
        original = sql
        sql, images, starts = self._rewrite_inserts(sql, infos)
        parseable = not (len(infos) == 1 and infos[0].command == "Unparseable")
        control = any(i.kind in _CONTROL for i in infos)
        writes = any(i.writes for i in infos)
        no_block = any(map(self._refuses_block, infos))
        wrote = in_block and a.has_writes
        around = self._settings_probes(infos, wrote) if parseable and not no_block else []
        if not in_block and writes and parseable and not control and not no_block and self._probe_allowed():
            self._send_wrapped(sql, infos, images, starts, around, sample)
            return False
        parts: list[Pending | str] = []
        for info, image in zip(infos, images, strict=True):
            a.sending(info)
            pending = Pending(info, image=image, client_encoding=self._client_encoding)
            if info.command == "CopyStmt" and info.kind is Kind.WRITE and self._copy_target is None:
                # Its data from now on, not from the CopyInResponse: a client may send it without waiting.
                self._copy_target = pending
            parts.append(pending)
        points = around
        may_probe = parseable and not no_block and not self._probe_inflight
        if may_probe and in_block and writes and not control and a.needs_probe() and self._probe_allowed():
            points = [*around, (len(infos), _PROBE)]  # learn the txid now, so the COMMIT need not wait for it
            self._probe_inflight = True
        elif may_probe and control:
            late = self._late_probe_point(infos, in_block)
            if late is not None:
                points = [*around, (late, _PROBE)]
        text, parts = _with_probes(sql, starts, parts, points, self._probe_sql)
        if text is not original:
            raw = self._query_message(text)
        self._send(Request(codes.QUERY, context=_QueryParts(parts, sample=sample)), raw)
        if control:
            self._sent_control(infos, in_block)
        return False

    def _refuses_block(self, info: StatementInfo) -> bool:
        """Whether the statement must not go in a transaction block of capture's (see Facts.do_may_commit)."""
        return info.refuses_block and not (self._do_in_block and info.command == "DoStmt")

    def _waits_for_answers(self, infos: tuple[StatementInfo, ...]) -> bool:
        """A write (or a SET of a captured setting) sent behind transaction control not answered yet: which
        transaction it runs in, whether that one has failed and what it has written are known only from the
        answers (an error before a COMMIT in the same string skips the COMMIT). Wrapped as an implicit
        transaction in the client's open block, a write would have pgleap's COMMIT end that block. So it is
        decided once every answer is in; a wrapped write waits for pgleap's COMMIT anyway."""
        if self._block_when_run is None:
            return False
        for info in infos:  # noqa: SIM110 (a plain loop: no generator for every pipelined statement)
            if info.writes or (info.setting is not None and changes_captured_setting(info)):
                return True
        return False

    def _in_block_when_run(self) -> bool:
        """Whether a statement sent now runs inside a transaction block (see _block_when_run)."""
        if self._block_when_run is not None:
            return self._block_when_run
        return self.assembler.explicit or self.tx_status != _IDLE

    def _sent_control(self, infos: tuple[StatementInfo, ...], in_block: bool) -> None:
        """Transaction control went out: the block state it leaves if it all succeeds, until every answer is in."""
        for info in infos:
            kind = info.kind
            if kind is Kind.BEGIN or kind is Kind.COMMIT or kind is Kind.ROLLBACK or kind is Kind.TWO_PHASE:
                in_block = kind is Kind.BEGIN or info.chain
        self._block_when_run = in_block

    def _late_probe_point(self, infos: tuple[StatementInfo, ...], in_block: bool) -> int | None:
        """A string with transaction control inside: probe before its COMMIT, or at its end; logged late. In a
        failed block, only after the ROLLBACK (TO SAVEPOINT) or COMMIT that ends it: a probe before would fail."""
        a = self.assembler
        # A held COMMIT released with every answer in knows its transaction's txid already: no probe for it.
        block_writes = a.may_write and in_block and not (self._pass_one and a.txid is not None)
        # A failed block's COMMIT commits nothing (it rolls back); a ROLLBACK TO SAVEPOINT lets it go on.
        failed = not self._probe_allowed()
        may_write = block_writes and not failed
        explicit = in_block
        for i, info in enumerate(infos):
            if info.kind is Kind.BEGIN:
                explicit = True
            elif info.kind is Kind.ROLLBACK_TO and failed:
                may_write, failed = block_writes, False
            elif info.kind in (Kind.COMMIT, Kind.ROLLBACK):
                if info.kind is Kind.COMMIT and may_write:
                    return i
                explicit = False
                may_write = failed = False
            if info.writes and not failed:  # in a failed block it runs only after a ROLLBACK TO, or not at all
                may_write = True
        if may_write and not explicit:
            return len(infos)
        return None

    def _send_wrapped(
        self,
        sql: str,
        infos: tuple[StatementInfo, ...],
        images: list[ImageRows | None],
        starts: list[int],
        around: list[tuple[int, str]],
        sample: SourceSample | None = None,
    ) -> None:
        """An implicit write transaction: BEGIN; the client's string; the probe. pgleap commits it later."""
        statements: list[Pending | str] = []
        for info, image in zip(infos, images, strict=True):
            self.assembler.sending(info)
            statements.append(Pending(info, image=image, client_encoding=self._client_encoding))
        text, parts = _with_probes(sql, starts, statements, [*around, (len(infos), _PROBE)], self._probe_sql)
        self._probe_inflight = True
        self._send(
            Request(codes.QUERY, context=_QueryParts([_HIDDEN, *parts], wrapped=True, sample=sample)),
            self._query_message(f"BEGIN;{text}"),
        )
        # Whatever the client sends next must wait until pgleap's COMMIT has answered.
        self._stash = bytearray()

    def _rewrite_inserts(
        self, sql: str, infos: tuple[StatementInfo, ...]
    ) -> tuple[str, list[ImageRows | None], list[int]]:
        """The string with a RETURNING clause for each INSERT that can carry row images; where each statement starts."""
        images: list[ImageRows | None] = [None] * len(infos)
        starts = [info.start for info in infos]
        if not _has_insert(infos):
            return sql, images, starts
        pieces: list[str] = []
        done = 0
        for i, info in enumerate(infos):
            starts[i] += sum(len(p) for p in pieces[1::2])
            plan = self._image_plan(info)
            if plan is None:
                continue
            end = info.start + len(info.text)
            pieces += [sql[done:end], plan.suffix]
            done = end
            images[i] = ImageRows(plan, self._codec)
        if not pieces:
            return sql, images, starts
        return "".join(pieces) + sql[done:], images, starts

    def _image_plan(self, info: StatementInfo) -> ImagePlan | None:
        if info.command != "InsertStmt":
            return None
        if self._session_role or self._local_role:
            self.capture.inserts_without_image += 1
            return None
        # RETURNING needs SELECT for the role the server connection logged in as (not the client's proxy login).
        role = self.backend.parameters.get("session_authorization") or self.backend.server.user
        plan = plan_insert(info.text, self.capture.catalog, role, self._temp_names)
        if plan is None:
            self.capture.inserts_without_image += 1
        return plan

    def _note_role(self, infos: tuple[StatementInfo, ...]) -> None:
        """SET ROLE (or RESET ROLE: which role is current then is not known either) turns row images off."""
        for info in infos:
            if info.setting is not None and info.setting[0].lower() == "role":
                if info.setting[1]:
                    self._local_role = True
                else:
                    self._session_role = True

    def _note_two_phase(self, infos: tuple[StatementInfo, ...]) -> None:
        """Two-phase commit is not captured: a prepared transaction may be committed from any session, or none."""
        for info in infos:
            if info.kind is Kind.TWO_PHASE:
                self.capture.report_unreplayable(
                    self.session.id, f"{info.text[:60]}: two-phase commit is not captured; verify what it wrote"
                )

    def _refused_ddl(self, infos: tuple[StatementInfo, ...]) -> str | None:
        """Under ddl = "block", the statement that makes the source refuse this DDL; None to let it through."""
        if self.proxy.config.proxy.ddl != "block":
            return None
        command = blocked_command(infos)
        if command is None:
            return None
        log.warning('session %s: %s refused (ddl = "block")', self.session.id, command)
        return refusal_sql(command)

    def _wait_for_catalog(self, infos: tuple[StatementInfo, ...]) -> bool:
        """Hold an INSERT into a table DDL may have reshaped until the catalog is read again (True: held)."""
        if self._catalog_waited:
            self._catalog_waited = False  # back from a wait: go on, with row images or without
            return False
        if not _has_insert(infos):
            return False  # most statements: nothing to wait for
        catalog = self.capture.catalog
        if catalog is None or catalog.in_ddl(self.session.id) or (not catalog.loaded and catalog.last_error):
            # The source refused pgleap's catalog queries: do not hold clients for it. Inside its own DDL
            # transaction a reload would wait for this very session. A first load still on its way (capture
            # just started, or resumed after a restart while clients reconnect) is waited for like a reload.
            return False
        targets = (insert_target(i.text) for i in infos if i.command == "InsertStmt")
        if not any(t is not None and catalog.is_stale(t.name) for t in targets):
            return False
        self._preparing = True  # nothing else may release what is held meanwhile
        self.proxy.spawn(self._await_catalog(catalog))
        return True

    async def _await_catalog(self, catalog: SourceCatalog) -> None:
        if not await catalog.wait_fresh(CATALOG_WAIT):
            log.warning(
                "session %s: the source catalog was not read again (within %g s, or capture stopped); "
                "the INSERT goes on, replayed as a statement",
                self.session.id,
                CATALOG_WAIT,
            )
        self._preparing = False
        self._catalog_waited = True
        self._release_stash(None)

    def _ddl_sent(self, infos: tuple[StatementInfo, ...]) -> None:
        """DDL on its way: the tables it may reshape get no row images until the catalog is read again."""
        catalog = self.capture.catalog
        for info in infos:
            if info.kind is not Kind.DDL or info.reshapes == ():
                continue
            if info.temporary:
                # A temporary table hides a permanent one of the same name for this session only.
                self._temp_names.update(info.relations)
            elif catalog is not None:
                catalog.ddl_started(self.session.id, info.reshapes)

    def _query_message(self, text: str) -> bytes:
        payload = text.encode(self._codec) + b"\0"
        return bytes((codes.QUERY,)) + _LEN.pack(len(payload) + 4) + payload

    # -- extended protocol --------------------------------------------------------------------

    def _client_execute(self, portal_name: str, raw: bytes) -> bool:
        portal = self.portals.get(portal_name)
        a = self.assembler
        if portal is not None and portal.statement is None:
            self.capture.report_unreplayable(
                self.session.id, f"Execute of portal {portal_name!r}, bound to a statement prepared before capture"
            )
            a.may_write = True
        if portal is None or portal.statement is None or not portal.statement.infos:
            self.open_batch = True
            self._batch_control = True  # it might be anything, a COMMIT included
            self._send(Request(codes.EXECUTE), raw)
            return False
        info = portal.statement.infos[0]
        if any(i.kind in _CONTROL for i in portal.statement.infos):
            self._batch_control = True
            self._sent_control(portal.statement.infos, self._in_block_when_run())
        if info.kind is Kind.COMMIT and not self._pass_one and self._may_have_written():
            if self._probe_allowed() and (
                (self._batch_writes and not self._probe_in_batch) or (a.txid is None and not self._probe_inflight)
            ):
                self._inject_extended_probe()
            self._out.append(_FLUSH)  # the answers the commit point waits for must come back now
            self._commit_point = "commit"
            return True
        self.open_batch = True
        sample = None
        if (
            self.proxy.validator is not None
            and info.kind is Kind.READ
            and info.command == "SelectStmt"
            and len(portal.statement.infos) == 1
            and raw[-4:] == b"\0\0\0\0"  # no row limit: the whole result in this Execute
        ):
            if not a.explicit and self.tx_status == _IDLE and not self._batch_writes:
                sample = self._begin_sample(portal.statement.sql, portal)
            elif self._may_check():
                # In a transaction block, or after a write of its implicit transaction: a check of its record.
                sample = self._begin_sample(portal.statement.sql, portal, in_transaction=True)
        if self._refuses_block(info):
            self._batch_refuses_block = True
        if info.writes:
            self._batch_writes = True
        a.sending(info)
        plan = portal.statement.image
        image = ImageRows(plan, self._codec) if plan is not None else None
        if plan is not None and (plan.client_columns == 0 or plan.single_row) and raw[-4:] != b"\0\0\0\0":
            # No client rows, or at most one (fewer than any row limit): the portal ends in this Execute, as
            # it may without a limit; the image rows all come back. Otherwise a suspension loses the image.
            raw = raw[:-4] + b"\0\0\0\0"
        pending = Pending(
            info,
            portal.params,
            portal.param_formats,
            portal.statement.param_types,
            image=image,
            client_encoding=self._client_encoding,
            portal=portal_name,
        )
        if sample is not None:
            self._samples[id(pending)] = (self._syncs_sent + 1, sample)
        if info.command == "CopyStmt" and info.kind is Kind.WRITE:
            self._copy_execute = pending
        around = info.setting is not None and self._probes_settings(info)
        if around:
            self._inject_extended_probe(_SETTINGS)  # see _settings_points
        self._send(Request(codes.EXECUTE, context=pending), raw)
        if around:
            self._inject_extended_probe(_SETTINGS)
        copy_in = self._copy_execute is not None  # the server reads only copy data after this Execute
        if (
            info.writes
            and a.explicit
            and a.needs_probe()
            and not self._probe_inflight
            and self._probe_allowed()
            and not copy_in
        ):
            self._inject_extended_probe()  # answered with the client's next Sync or Flush
        return False

    def _client_sync(self, raw: bytes) -> bool:
        if self._copy_in:
            self._out.append(raw)  # ignored by a server in copy-in mode: nothing answers it
            return False
        if self._copy_execute is not None:
            # Whether the server enters copy-in mode (and ignores this Sync) is known from the Execute's answer.
            self._out.append(_FLUSH)
            self._commit_point = "copy"
            return True
        if (
            self._batch_writes
            and not self._batch_refuses_block
            and not self._pass_one
            and self._probe_allowed()
            and not self._inside_a_block()
        ):
            # The Sync may end an implicit transaction that wrote: it would commit there, so it waits for the log.
            if not self._probe_in_batch:
                self._inject_extended_probe()
            self._out.append(_FLUSH)
            self._commit_point = "sync"
            return True
        if self._batch_refuses_block:
            # No probe: it would put the statement in a transaction block. Logged late, without a txid.
            self.capture.report_unreplayable(self.session.id, "a statement that refuses a transaction block")
        self.pending.append(_now())
        self.open_batch = False
        self._probe_in_batch = False
        self._batch_refuses_block = False
        self._batch_writes = False
        self._batch_control = False
        self._syncs_sent += 1
        self._send(Request(codes.SYNC), raw)
        return False

    def _inside_a_block(self) -> bool:
        """Whether the open batch's Sync surely commits nothing: the session is in a transaction block, every
        earlier batch is answered, and this one runs no transaction control. Then the Sync goes on at once."""
        return self.tx_status == _IN_BLOCK and not self.pending and not self._batch_control and self.assembler.explicit

    def _may_have_written(self) -> bool:
        """Seen from the sending side: the open transaction may have written, and has not failed."""
        a = self.assembler
        return (a.has_writes or self._batch_writes) and self.tx_status != _FAILED and not a.failed

    def _settings_probes(self, infos: tuple[StatementInfo, ...], wrote: bool) -> list[tuple[int, str]]:
        """_settings_points for a string; in a failed block, those after the string's first ROLLBACK (TO
        SAVEPOINT) or COMMIT (which rolls back), after which the string goes on: a probe before would fail."""
        if self._probe_allowed():
            return _settings_points(infos, wrote)
        for k, info in enumerate(infos):
            if info.kind is Kind.ROLLBACK_TO or info.kind is Kind.ROLLBACK or info.kind is Kind.COMMIT:
                return [(k + i, marker) for i, marker in _settings_points(infos[k:], wrote)]
        return []

    def _probe_allowed(self) -> bool:
        """The probe may only run in a transaction that has not failed."""
        return self.tx_status != _FAILED and not self.assembler.failed

    def _inject_query_probe(self) -> None:
        self._send(Request(codes.QUERY, injected=True), probe_query(self._probe_sql))
        self._probe_inflight = True

    def _inject_extended_probe(self, marker: str = _PROBE) -> None:
        for kind, raw in probe_extended(self._probe_sql):
            self._send(Request(kind, injected=True, context=marker), raw)
        if marker == _PROBE:
            self._probe_in_batch = True
            self._probe_inflight = True

    def _probes_settings(self, info: StatementInfo) -> bool:
        """Whether an Execute of `info` needs settings probes around it (see _settings_points)."""
        a = self.assembler
        wrote = (a.has_writes and (a.explicit or self.tx_status != _IDLE)) or self._batch_writes
        return wrote and changes_captured_setting(info) and self._probe_allowed()

    # -- the commit point --------------------------------------------------------------------

    def _check_commit_point(self) -> None:
        """Once every statement before the stashed commit point is answered, log the transaction, then go on."""
        if self._stash is None or self._commit_point in (None, "copy") or self._preparing:
            return
        if self._commit_point == "answers":  # see _waits_for_answers
            if not self.pending:  # not every request: an Execute without Sync may wait for what is held
                self._commit_point = None
                self._release_stash(None)
            return
        if self.tracker.outstanding_statements():
            return
        a = self.assembler
        point, self._commit_point = self._commit_point, None
        # Decided from the answers, now all in: a COMMIT ends an explicit transaction; a Sync ends an implicit one.
        commits_here = a.explicit if point == "commit" else not a.explicit
        tx = a.current() if commits_here and not a.failed and self.tx_status != _FAILED else None
        unknown = tx is not None and (tx.txid is None or not a.settings_read)
        if unknown and not a.probed and not self._probe_inflight and self._probe_allowed():
            # Sent behind the end of an earlier transaction, before its answers: capture's view was still of that
            # one, so no probe went with this transaction's writes (or a ROLLBACK TO SAVEPOINT went out with the
            # next write, undoing what the settings were read after). Ask now, then come back here.
            self._commit_point = point
            assert self._stash is not None
            if self._stash[0] == codes.QUERY:
                self._inject_query_probe()
            else:
                self._inject_extended_probe()
                self._out.append(_FLUSH)
            self._flush_to_server()
            return
        if tx is None or tx.txid is None:
            # Nothing to log, or the probe could not run: then it is logged after the answer, never lost.
            self._release_stash(point)
            return
        self._preparing = True
        # Called back from a fresh call stack (a turn of the loop of its own): the stash can go at once.
        self._holding = self.capture.prepare_then(tx, partial(self._prepared, tx, partial(self._forward_stash, True)))

    def _prepared(self, tx: CapturedTransaction, go_on: Callable[[], None], log_id: int | None) -> None:
        """`tx` is durable as pending (`log_id`; None: it could not be logged): let its COMMIT go (`go_on`)."""
        self._preparing = False
        held, self._holding = self._holding, None
        late = held if held is not None and held.timed_out else None
        if self.closed.done():
            if log_id is not None:
                # The COMMIT never went out: the source rolled the transaction back with the connection.
                self.capture.settle(log_id, None, committed=False)
            elif late is not None:
                late.answered(False)  # the same, for a record still on its way
            return
        self._log_id, self._log_tx = log_id, tx
        self._late_record = late
        go_on()

    def _release_stash(self, point: str | None) -> None:
        """Forward what the commit point held (from a fresh call stack: never inside another callback)."""
        asyncio.get_running_loop().call_soon(self._forward_stash, point is not None)

    def _forward_stash(self, commit_point: bool) -> None:
        if self._stash is None or self.closed.done():
            return
        data, self._stash = bytes(self._stash), None
        self.unblock_reading(True, "log")
        self._pass_one = commit_point
        self.from_client(data)

    def _commit_wrapped(self, failed: bool) -> None:
        """The wrapped string has run: log it, then send pgleap's COMMIT (or ROLLBACK after an error)."""
        tx = None if failed else self.assembler.current()
        if tx is None or tx.txid is None:
            self._send_wrap_end(_ROLLBACK if failed else _COMMIT)
            return
        self._preparing = True
        self._holding = self.capture.prepare_then(
            tx, partial(self._prepared, tx, partial(self._send_wrap_end, _COMMIT))
        )

    def _send_wrap_end(self, info: StatementInfo) -> None:
        self._send(Request(codes.QUERY, context=_WrapEnd(Pending(info))), self._query_message(info.text))
        self._flush_to_server()

    # -- server -> client ----------------------------------------------------------------

    def from_server(self, data: bytes) -> None:
        """Decode whole server messages, hide the probe's answers, feed the assembler, forward."""
        self.stats.bytes_out += len(data)
        buf = self._sin
        buf += data
        offset = 0
        forward = self._fwd
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
                    if kind != codes.NOTICE_RESPONSE or not self._held_tag_is_last():
                        self._flush_held_tag()
                    forward.append(raw)
        except Exception as exc:  # any surprise here (a malformed message, a bug) must end this session, not the proxy
            self._capture_broken(exc)
            return
        finally:
            del buf[:offset]
        if forward:
            self.client_transport.write(b"".join(forward))
            forward.clear()
        self._settle_ended()
        self._check_commit_point()

    def _settle_ended(self) -> None:
        for ended in self.assembler.take_ended():
            if ended.samples or ended.undone:
                self._ended_samples(ended.committed, ended.samples, ended.undone)
            if ended.read_only:
                continue
            if self._log_id is not None:
                self.capture.settle(self._log_id, ended.transaction, ended.committed)
                self._log_id = None
            elif self._late_record is not None:
                late, self._late_record = self._late_record, None
                late.answered(ended.committed)  # its own record, landed or not yet: never a second one
            elif ended.committed and ended.transaction is not None:
                self.capture.record_late(ended.transaction)

    def _held_tag_is_last(self) -> bool:
        """Whether the held tag is the wrapped string's last: a notice now comes from pgleap's probe or COMMIT.

        Directly, the commit of an implicit transaction runs before its last CommandComplete, so such a
        notice goes ahead of the tag; a notice of a later statement of the string goes after it.
        """
        if self._held_tag is None or not self.tracker.queue:
            return False
        context = self.tracker.queue[0].context
        return isinstance(context, _WrapEnd) or (isinstance(context, _QueryParts) and context.current() == _PROBE)

    def _flush_held_tag(self) -> None:
        if self._held_tag is not None:
            self._fwd.append(self._held_tag)
            self._held_tag = None

    def _server_message(self, kind: int, raw: bytes) -> bool:
        """Handle one server message; True when the client must see it."""
        request, outcome = self.tracker.received(kind, raw[5:])
        if request is None:
            if kind == codes.PARAMETER_STATUS:
                self.session.note_parameter(raw[5:])
            return True
        context = request.context
        if request.injected:
            if isinstance(context, _PreparedLoad):
                if kind == codes.DATA_ROW:
                    self._load_prepared(raw[5:])
                elif kind == codes.READY_FOR_QUERY and self._stash is not None and self._commit_point is None:
                    self._release_stash(None)
                return False
            if kind == codes.DATA_ROW and context == _SETTINGS:
                self.assembler.settings_seen(parse_probe_row(raw[5:])[2])
                return False
            if kind == codes.DATA_ROW:
                self.assembler.probe(*parse_probe_row(raw[5:]))
                self._probe_inflight = False
                return False
            if kind == codes.ERROR_RESPONSE:
                # The client's transaction is now aborted: it must hear why, as from any statement.
                log.warning("session %s: the capture probe failed", self.session.id)
                self.stats.errors += 1
                self.assembler.failed_statement()
                self._probe_inflight = False
                return True
            if kind == codes.READY_FOR_QUERY:
                self.tx_status = raw[5]
                self._probe_inflight = False
            return False
        if isinstance(context, _WrapEnd):
            return self._wrap_end_answer(context, kind, raw)
        if kind == codes.ERROR_RESPONSE:
            self.stats.errors += 1
            self.assembler.failed_statement()
            if self._copy_in or self._wrapped_copy or self._copy_target is not None:
                # An error ends copy-in: the server drops whatever copy data still comes.
                self._copy_in = self._wrapped_copy = False
                self._copy_target = None
                if self._stash is not None:
                    self.block_reading(True, "log")
            if isinstance(context, _QueryParts) and context.sample is not None:
                context.sample.error()
            elif self._samples and isinstance(context, Pending) and id(context) in self._samples:
                self._execute_answer(context, kind, raw)
            if self._copy_execute is not None:
                self._copy_answered(copy_in=False)  # the server now skips to the held Sync, and answers it
            return True
        if kind == codes.READY_FOR_QUERY:
            self._probe_inflight = False
            if isinstance(context, _QueryParts) and context.sample is not None:
                self._sample_done(context)
            if request.kind == codes.SYNC:
                self._syncs_answered += 1
                if self._samples:
                    self._forget_skipped_samples()
            if isinstance(context, _QueryParts) and context.wrapped:
                self.tx_status = raw[5]
                self._commit_wrapped(failed=raw[5] == _FAILED)
                return False
            self._client_ready(raw[5])
            return True
        if isinstance(context, _QueryParts):
            return self._query_answer(context, kind, request, raw)
        if isinstance(context, _ImageDescribe):
            if kind == codes.ROW_DESCRIPTION:
                self._forward_instead(client_row_description(raw[5:], context.plan))
                return False
            return True
        if isinstance(context, _DescribeOf):
            if kind == codes.ROW_DESCRIPTION:
                context.target.row_description = raw[5:]
            return True
        if isinstance(context, Pending):
            if self._samples and id(context) in self._samples:
                self._execute_answer(context, kind, raw)
            if context.image is not None and kind in (codes.DATA_ROW, codes.PORTAL_SUSPENDED):
                forward = self._image_answer(context.image, kind, raw)  # first: it marks the image incomplete
                if kind == codes.PORTAL_SUSPENDED:
                    self._portal_suspended(context)
                return forward
            if kind == codes.PORTAL_SUSPENDED:
                self._portal_suspended(context)
            elif kind == _COPY_IN:
                self._copy_target = context
                if context is self._copy_execute:
                    self._copy_answered(copy_in=True)
            elif outcome is Outcome.DONE and kind == codes.COMMAND_COMPLETE and request.tag is not None:
                self.assembler.completed(context, request.tag)
        return True

    def _query_answer(self, context: _QueryParts, kind: int, request: Request, raw: bytes) -> bool:
        part = context.current()
        if context.sample is not None and isinstance(part, Pending):
            self._feed_sample(context, kind, raw)
        if part is _PROBE or part is _SETTINGS:  # the markers themselves: no Pending's __eq__ on every answer
            if kind == codes.DATA_ROW and part is _PROBE:
                self.assembler.probe(*parse_probe_row(raw[5:]))
                self._probe_inflight = False
            elif kind == codes.DATA_ROW:
                self.assembler.settings_seen(parse_probe_row(raw[5:])[2])
            if kind == codes.COMMAND_COMPLETE:
                context.index += 1
            return False
        if part == _HIDDEN:
            if kind == codes.COMMAND_COMPLETE:
                self.assembler.completed(Pending(_BEGIN), "BEGIN")
                context.index += 1
            return False
        if isinstance(part, Pending):
            image = part.image
            if image is not None and kind == codes.ROW_DESCRIPTION:
                if image.plan.client_columns:  # the simple protocol sends no RowDescription for no columns
                    self._forward_instead(client_row_description(raw[5:], image.plan))
                return False
            if image is not None and kind == codes.DATA_ROW:
                return self._image_answer(image, kind, raw)
            if kind == _COPY_IN:
                self._copy_target = part
                if context.wrapped and self._stash is not None:
                    # The client's data waits in the stash taken for pgleap's COMMIT: let it through.
                    self._wrapped_copy = True
                    self._pass_copy_messages()
            elif kind == codes.COMMAND_COMPLETE and request.tag is not None:
                self.assembler.completed(part, request.tag)
                context.index += 1
                if context.wrapped:
                    # Held: if pgleap's COMMIT fails, the client must see the error instead, as directly.
                    self._flush_held_tag()
                    self._held_tag = raw
                    return False
        return True

    def _samples_reads(self) -> bool:
        validator = self.proxy.validator
        return validator is not None and validator.active(self.database.upgrade.database)

    def _may_check(self) -> bool:
        """Whether a read of the open transaction may become a check of its record (result comparison)."""
        return self.tx_status != _FAILED and self.assembler.checks_allowed

    def _begin_sample(
        self, sql: str, portal: _Portal | None = None, *, in_transaction: bool = False
    ) -> SourceSample | None:
        """Whether result comparison samples this read (one countdown step when not); never fails the session."""
        assert self.proxy.validator is not None
        try:
            sample = self.proxy.validator.begin(
                self.database.upgrade.database, sql, self.session.parameters, in_transaction=in_transaction
            )
            if sample is not None and portal is not None:
                statement = portal.statement
                assert statement is not None
                # Run again in UTF-8 sessions on both servers: the parameters as the source read them.
                recoded = to_utf8(
                    self._client_encoding, sql, portal.params, portal.param_formats, statement.param_types, None
                )
                if recoded.problem is not None:
                    # Counted, like every sample not compared: it could not be sent as the client meant it.
                    self.proxy.validator.skip(self.database.upgrade.database, "parameters_not_reencodable")
                    return None
                sample.extended(
                    recoded.params,
                    portal.param_formats,
                    statement.param_types,
                    portal.bind,
                    lambda: portal.row_description or statement.row_description,
                )
            return sample
        except Exception as exc:
            log.warning("session %s: result comparison could not sample a read (%s)", self.session.id, exc)
            return None

    def _forget_skipped_samples(self) -> None:
        """Executes the server skipped after an error in their batch (now ended): never answered, nothing to compare."""
        for key, (batch, _) in list(self._samples.items()):
            if batch <= self._syncs_answered:
                del self._samples[key]

    def _execute_answer(self, context: Pending, kind: int, raw: bytes) -> None:
        """A sampled Execute's answer: rows are hashed; its CommandComplete ends it (never fails the session)."""
        _, sample = self._samples[id(context)]
        validator = self.proxy.validator
        try:
            if kind == codes.DATA_ROW:
                sample.data_row(raw[5:])
            elif kind in (codes.COMMAND_COMPLETE, codes.ERROR_RESPONSE, codes.PORTAL_SUSPENDED):
                del self._samples[id(context)]
                if kind == codes.ERROR_RESPONSE:
                    sample.error()
                elif kind == codes.PORTAL_SUSPENDED:
                    sample.abandoned = "suspended"
                else:
                    sample.describe_now()
                if sample.in_transaction:
                    self._check_done(sample)
                elif validator is not None:
                    validator.finish(sample)
        except Exception as exc:
            self._samples.pop(id(context), None)
            log.warning("session %s: result comparison could not read an answer (%s); dropped", self.session.id, exc)

    def _feed_sample(self, context: _QueryParts, kind: int, raw: bytes) -> None:
        """Hash the sampled read's answer as it goes to the client; a failure drops the sample, never the session."""
        sample = context.sample
        assert sample is not None
        try:
            if kind == codes.DATA_ROW:
                sample.data_row(raw[5:])
            elif kind == codes.ROW_DESCRIPTION:
                sample.row_description(raw[5:])
        except Exception as exc:
            log.warning("session %s: result comparison could not read an answer (%s); dropped", self.session.id, exc)
            context.sample = None

    def _sample_done(self, context: _QueryParts) -> None:
        """The sampled read's answer is complete: hand it to the validator (which never blocks)."""
        sample, context.sample = context.sample, None
        if sample is None or self.proxy.validator is None:
            return
        try:
            if sample.in_transaction:
                self._check_done(sample)
                return
            if context.wrapped:
                # A SELECT calling a function that wrote is logged and replayed: not a read to compare.
                tx = self.assembler.current()
                sample.wrote = tx is not None and tx.txid is not None
            self.proxy.validator.finish(sample)
        except Exception as exc:
            log.warning("session %s: result comparison failed to queue a sample (%s)", self.session.id, exc)

    def _check_done(self, sample: SourceSample) -> None:
        """A read inside a transaction has its whole answer: keep its check where it ran among the statements."""
        validator = self.proxy.validator
        if validator is None:
            return
        # Answers come in order: every statement before the read has completed, none after it has.
        check = validator.finish_check(sample, len(self.assembler.statements))
        if check is not None and not self.assembler.add_check(check, sample):
            validator.drop(sample.database)

    def _ended_samples(self, committed: bool, samples: tuple[object, ...], undone: int) -> None:
        """Reads of a transaction that logged nothing: compared at their log point, as reads outside one."""
        validator = self.proxy.validator
        if validator is None:
            return
        for _ in range(undone):
            validator.skip(self.database.upgrade.database, "rolled_back")
        for one in samples:
            sample = cast("SourceSample", one)
            try:
                if committed:
                    # Its end bounds what the reads saw; a read-only transaction's reads are plain reads.
                    validator.finish(sample)
                else:
                    validator.skip(sample.database, "rolled_back")
            except Exception as exc:
                log.warning("session %s: result comparison failed to queue a sample (%s)", self.session.id, exc)

    def _copy_answered(self, *, copy_in: bool) -> None:
        """The held Sync after an extended COPY FROM STDIN can go: ignored in copy-in mode, answered after an error."""
        self._copy_execute = None
        self._copy_in = copy_in
        if self._commit_point == "copy":
            self._commit_point = None
            self._release_stash(None)

    def _portal_suspended(self, pending: Pending) -> None:
        """A writing Execute stopped at its row limit: its statement is logged now (the client may never resume)."""
        if self.assembler.suspended(pending) and pending.info.command not in _RUN_TO_COMPLETION:
            # A SELECT calling a writing function writes as its rows are fetched; replay runs all of them.
            self.capture.report_unreplayable(
                self.session.id, f"a writing {pending.info.command} portal was suspended: replayed in full"
            )

    def _image_answer(self, image: ImageRows, kind: int, raw: bytes) -> bool:
        """Keep a row's image, hand the client its own columns; True when the client sees `raw` as it is."""
        if kind == codes.PORTAL_SUSPENDED:
            # The client stopped fetching its RETURNING rows: the rest of the image is never seen.
            image.complete = False
            self.capture.report_unreplayable(
                self.session.id, "an INSERT ... RETURNING portal was suspended: replayed as a statement"
            )
            return True
        client_row = image.data_row(raw[5:])
        if client_row is not None:
            self._forward_instead(client_row)
        return False

    def _forward_instead(self, raw: bytes) -> None:
        self._flush_held_tag()
        self._fwd.append(raw)

    def _wrap_end_answer(self, context: _WrapEnd, kind: int, raw: bytes) -> bool:
        if kind == codes.COMMAND_COMPLETE:
            tag = raw[5:].rstrip(b"\0").decode(errors="replace")
            self.assembler.completed(context.pending, tag)
            if not tag.startswith("COMMIT"):
                self._held_tag = None
            return False
        if kind == codes.ERROR_RESPONSE:
            self.stats.errors += 1
            self._held_tag = None  # the commit failed: the last statement's tag is replaced by the error
            self.assembler.failed_statement()
            self.assembler.completed(context.pending, "ROLLBACK")
            return True
        if kind == codes.READY_FOR_QUERY:
            self._client_ready(raw[5])
            if self._stash is not None and self._commit_point is None:
                self._release_stash(None)
            return True
        return True

    def _load_prepared(self, body: bytes) -> None:
        name, sql, types = text_row(body)
        if name is None or sql is None:
            return
        oids = tuple(int(t) for t in (types or "{}").strip("{}").split(",") if t)
        self.prepared[name] = _Prepared(sql, classify(sql), oids)

    def _client_ready(self, status: int) -> None:
        self.tx_status = status
        stats = self.stats
        if self.pending:
            stats.latency.observe(_now() - self.pending.popleft())
            stats.queries += 1
        if not self.pending and not self.open_batch:
            # Every answer is in: the server's own status says it.
            self._block_when_run = None
        if status == _IDLE:
            stats.transactions += 1
            self._local_role = False
            if self.gate.paused and not self.pending:
                self.gate.notify()
            if self.capture.catalog is not None:
                self.capture.catalog.transaction_ended(self.session.id)
        self.assembler.ready(status)

    async def state_to_move(self) -> MovableState:
        """The client's named prepared statements (its own text, never pgleap's rewrite) and, from the server,
        every setting the session changed (the probe sees only those replay needs)."""
        statements = [(name, p.sql, p.param_types) for name, p in self.prepared.items() if name]
        found = await self._movable_from_server(SESSION_SETTINGS_SQL)  # the statements are known here
        return statements, found[1] if found is not None else list(self.assembler.last_settings)

    def close(self, error: bytes | None = None) -> None:
        """Close the session; a DDL transaction it left open no longer holds row images back."""
        catalog = getattr(self, "capture", None) and self.capture.catalog
        if catalog is not None:
            catalog.transaction_ended(self.session.id)
        log_id = getattr(self, "_log_id", None)
        if log_id is not None and self._log_tx is not None:
            # The COMMIT went out but its answer will never be read (the client left): ask the source what
            # became of it, or the pending record would hold back replay of every later transaction.
            self.proxy.settle_orphan(self.database, log_id, self._log_tx)
            self._log_id = self._log_tx = None
        late = getattr(self, "_late_record", None)
        if late is not None:
            self._late_record = None
            late.orphaned(partial(self.proxy.settle_orphan, self.database))
        super().close(error)

    def _capture_broken(self, exc: Exception) -> None:
        """The stream no longer makes sense to capture: close this session loudly rather than guess."""
        expected = isinstance(exc, (ExchangeError, ValueError, struct.error, UnicodeDecodeError))
        log.error(
            "session %s: capture lost track of the protocol (%s); closing the session",
            self.session.id,
            exc,
            exc_info=None if expected else exc,
        )
        self.capture.report_unreplayable(self.session.id, f"capture lost track of the protocol: {exc}")
        self.close(
            error_response(
                "pgleap could not follow this session for the upgrade",
                codes.PROTOCOL_VIOLATION,
                "FATAL",
                detail=str(exc),
            )
        )
