"""Assembling one session's statements into the transactions the source committed.

The forwarder tells the assembler what the client sent (query strings; Parse, Bind, Execute)
and what the server answered (each statement's CommandComplete, errors, ReadyForQuery, the
probe's txid). The assembler keeps the statements of the open transaction, drops what a
ROLLBACK TO SAVEPOINT undid, and hands out the end of every transaction exactly once, with
whether it committed: the forwarder settles the change-log record it prepared before the
COMMIT from that outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pgleap.store.records import CapturedCheck, CapturedStatement, CapturedTransaction, encode_image
from pgleap.upgrade.capture.classify import Kind, StatementInfo
from pgleap.upgrade.capture.encoding import to_utf8
from pgleap.upgrade.capture.images import ImageRows
from pgleap.upgrade.capture.probe import changes_captured_setting, settings_statement

_IDLE = ord("I")
MAX_CHECKS = 16  # sampled reads kept per transaction (each adds a read to its replay)
_SNAPSHOT_LEVELS = ("REPEATABLE", "SERIALIZABLE")


@dataclass
class Pending:
    """A statement sent to the server and not yet answered."""

    info: StatementInfo
    params: tuple[bytes | None, ...] = ()
    param_formats: tuple[int, ...] = ()
    param_types: tuple[int, ...] = ()
    copy_data: list[bytes] = field(default_factory=list)
    image: ImageRows | None = None  # the rows it wrote, when capture added a RETURNING clause
    client_encoding: str = "UTF8"  # the session's when it was sent: params and COPY data are in it
    portal: str | None = None  # the portal an Execute ran (extended protocol)


@dataclass(frozen=True)
class Ended:
    """A transaction that ended: its content (None when it wrote nothing) and whether it committed."""

    transaction: CapturedTransaction | None
    committed: bool
    # The samples of its reads when no record carries them (it logged nothing, or rolled back): opaque here.
    samples: tuple[object, ...] = ()
    read_only: bool = False  # it sent no write at all: it had no change-log record to settle
    undone: int = 0  # checks a ROLLBACK TO SAVEPOINT took back (they saw writes that are not replayed)


_Settings = tuple[tuple[str, str], ...]


@dataclass
class _Savepoint:
    name: str
    statements: int  # how many statements the transaction had when it was set
    # What the transaction knew of its settings then: a ROLLBACK TO SAVEPOINT puts the server's back too.
    settings: tuple[bool, _Settings, _Settings] = (False, (), ())


class TransactionAssembler:
    """One session's view of its transactions, as far as capture is concerned."""

    def __init__(self, database: str, session_id: int, on_problem: Callable[[str], None] | None = None) -> None:
        self.database = database
        self.session_id = session_id
        self.on_problem = on_problem  # told what a logged statement holds that replay may not reproduce
        self._logged_portals: set[str] = set()  # portals whose statement was logged when they were suspended
        self.explicit = False  # inside BEGIN ... COMMIT/ROLLBACK
        self.failed = False  # an error happened in the current (implicit) transaction
        self.statements: list[CapturedStatement] = []
        self.savepoints: list[_Savepoint] = []
        self.txid: int | None = None
        self.source_now: str | None = None
        self.settings: _Settings = ()  # in effect at the transaction's first statement
        self._settings_read = False  # read in the open transaction
        self._settings_now: _Settings = ()  # as last read
        self.ended: list[Ended] = []  # not handed out yet, oldest first
        self.may_write = False  # a write was sent in the current transaction (the probe is needed)
        self._appended_write = False  # a write is among `statements` (not only SET LOCAL)
        self.probed = False  # the probe answered after the last write was sent
        # Sampled reads of the open transaction (result comparison), each with the sample it came from.
        self.checks: list[tuple[CapturedCheck, object]] = []
        self.undone = 0
        # REPEATABLE READ or SERIALIZABLE asked for, in this transaction or for the session: a read then sees
        # the snapshot of the transaction's first statement, which its check cannot place (no checks taken).
        self.snapshot_tx = False
        self.snapshot_session = False

    # -- what the client sent -------------------------------------------------------------

    def sending(self, info: StatementInfo) -> None:
        """A statement is about to be forwarded."""
        if info.writes:
            self.may_write = True
            self.probed = False

    def needs_probe(self) -> bool:
        """Whether the transaction may have written and its txid (or, after a ROLLBACK TO SAVEPOINT, its
        settings) is not known yet."""
        return self.may_write and not self.failed and (self.txid is None or not self._settings_read) and not self.probed

    @property
    def checks_allowed(self) -> bool:
        """Whether a read of the open transaction may be sampled as a check of its record."""
        return not (self.failed or self.snapshot_tx or self.snapshot_session) and len(self.checks) < MAX_CHECKS

    def add_check(self, check: CapturedCheck, sample: object) -> bool:
        """Keep a sampled read's check at its place among the statements; False when over the bound."""
        if len(self.checks) >= MAX_CHECKS:
            return False
        self.checks.append((check, sample))
        return True

    @property
    def wrote_nothing(self) -> bool:
        """The probe found no txid after the last write: the source changed nothing, there is nothing to log."""
        return self.txid is None and self.probed

    # -- what the server answered ---------------------------------------------------------

    def completed(self, pending: Pending, tag: str) -> None:
        """A statement finished with CommandComplete `tag`."""
        info = pending.info
        kind = info.kind
        if (kind is Kind.BEGIN or kind is Kind.SESSION) and _snapshot_level(info.text):
            if self.explicit or kind is Kind.BEGIN:
                self.snapshot_tx = True  # BEGIN ISOLATION LEVEL ..., SET TRANSACTION ..., SET LOCAL ...
            else:
                self.snapshot_session = True  # for the session's later transactions (never cleared: fewer checks)
        if kind is Kind.BEGIN:
            self.explicit = True
        elif kind is Kind.SAVEPOINT and info.savepoint:
            known = (self._settings_read, self.settings, self._settings_now)
            self.savepoints.append(_Savepoint(info.savepoint, len(self.statements), known))
        elif kind is Kind.RELEASE and info.savepoint:
            self._pop_savepoints(info.savepoint, keep=False)
        elif kind is Kind.ROLLBACK_TO and info.savepoint:
            kept = self._pop_savepoints(info.savepoint, keep=True)
            if kept is not None:
                read, settings, now = self.savepoints[-1].settings
                if read:
                    self._settings_read, self.settings, self._settings_now = read, settings, now
                else:
                    # Read only after the savepoint: kept until read again (a SET between the savepoint and that
                    # read is undone now); needs_probe() asks for that read with the next write.
                    self._settings_read = False
                del self.statements[kept:]  # the set_config() of changes after the savepoint with them
                # A read after a rolled-back write saw it; the replay will not have it.
                kept_checks = [c for c in self.checks if c[0].before <= kept]
                self.undone += len(self.checks) - len(kept_checks)
                self.checks = kept_checks
            self.failed = False
        elif kind is Kind.COMMIT or kind is Kind.ROLLBACK:
            snapshot_tx = self.snapshot_tx
            # COMMIT of a failed transaction answers ROLLBACK: nothing was committed.
            self._end(committed=kind is Kind.COMMIT and tag.startswith("COMMIT"))
            if info.chain:
                # AND CHAIN: the next transaction is already open, explicit, with the same characteristics.
                self.explicit, self.snapshot_tx = True, snapshot_tx
        elif (info.writes or (kind is Kind.SESSION and self.explicit and self._replayed_local(info))) and (
            pending.portal is None or pending.portal not in self._logged_portals  # logged when it was suspended
        ):
            self._append(pending, tag)

    def suspended(self, pending: Pending) -> bool:
        """A writing statement's portal stopped at its row limit (PortalSuspended): log it now; True if it was.

        The client may commit without fetching the rest, and then no CommandComplete ever comes. A DML with
        RETURNING has run to completion at its first Execute (only its rows wait), so the statement replays
        exactly; its row count is not known yet, so it is not compared. Later Executes of the portal add nothing.
        """
        if not pending.info.writes or pending.portal is None or pending.portal in self._logged_portals:
            return False
        self._logged_portals.add(pending.portal)
        self._append(pending, "")
        return True

    def forget_portal(self, name: str) -> None:
        """The portal `name` was closed or bound anew."""
        self._logged_portals.discard(name)

    def _append(self, pending: Pending, tag: str) -> None:
        info = pending.info
        self._appended_write = self._appended_write or info.writes
        data = b"".join(pending.copy_data) if pending.copy_data else None
        image = pending.image
        # An image a suspended portal left incomplete is not used: the statement is replayed instead.
        images = encode_image(image.image()) if image is not None and image.complete else None
        # Replay's session speaks UTF-8.
        recoded = to_utf8(
            pending.client_encoding, info.text, pending.params, pending.param_formats, pending.param_types, data
        )
        if recoded.problem is not None and self.on_problem is not None:
            self.on_problem(recoded.problem)
        self.statements.append(
            CapturedStatement(
                sql=info.text,
                params=recoded.params,
                param_formats=pending.param_formats,
                param_types=pending.param_types,
                copy_data=recoded.copy_data,
                tag=tag,
                images=images,
            )
        )

    def _replayed_local(self, info: StatementInfo) -> bool:
        """A SET LOCAL replay must run too; not client_encoding (capture re-encodes to the UTF-8 replay speaks),
        nor, before the transaction's first write, one of the captured settings: the first read of the settings
        holds it already, and replayed after them it would undo a later SET of the same setting."""
        setting = info.setting
        if setting is None or not setting[1] or setting[0].lower() == "client_encoding":
            return False
        return self._appended_write or not changes_captured_setting(info)

    def failed_statement(self) -> None:
        """An ErrorResponse ended the current statement."""
        self.failed = True

    def probe(self, txid: int | None, source_now: str, settings: tuple[tuple[str, str], ...]) -> None:
        """The probe answered inside the transaction: its txid (None: nothing written yet), now() and settings."""
        if txid is not None:
            self.txid = txid
        self.source_now = source_now
        self.settings_seen(settings)
        self.probed = True

    @property
    def settings_read(self) -> bool:
        """Whether the open transaction's settings are known (read, and not undone by a ROLLBACK TO since)."""
        return self._settings_read

    @property
    def last_settings(self) -> _Settings:
        """The captured settings as last read in the session."""
        return self._settings_now or self.settings

    def settings_seen(self, settings: _Settings) -> None:
        """A probe read the captured settings: the first read gives the transaction's; a change after a statement
        was kept is kept too, as a set_config() at its place, so the statements after it replay under it.

        The forwarder probes before and after each SET of a captured setting that follows a write of the same
        transaction, so a change is read before the next statement, and the first read comes before any change
        made after the transaction's first write.
        """
        if not self._settings_read or not self.statements:
            self.settings = self._settings_now = settings
            self._settings_read = True
            return
        if settings == self._settings_now:
            return
        changed = tuple(pair for pair, before in zip(settings, self._settings_now, strict=True) if pair != before)
        sql, params, types = settings_statement(changed)
        self.statements.append(CapturedStatement(sql=sql, params=params, param_types=types, tag="SELECT 1"))
        self._settings_now = settings

    def ready(self, status: int) -> None:
        """ReadyForQuery with transaction status `status` ('I', 'T' or 'E')."""
        if status == _IDLE:
            if self.explicit:
                # The session left a transaction block without a COMMIT we saw complete
                # (e.g. the whole string failed): nothing to log.
                self._end(committed=False)
            else:
                self._end(committed=not self.failed)

    # -- internals --------------------------------------------------------------------------

    def _pop_savepoints(self, name: str, keep: bool) -> int | None:
        for i in range(len(self.savepoints) - 1, -1, -1):
            if self.savepoints[i].name == name:
                statements = self.savepoints[i].statements
                # ROLLBACK TO keeps the savepoint itself; RELEASE removes it.
                del self.savepoints[i + 1 if keep else i :]
                return statements
        return None

    @property
    def has_writes(self) -> bool:
        """A write was sent or kept in the open transaction: a SET LOCAL kept for replay is not one."""
        return self.may_write or self._appended_write

    def current(self) -> CapturedTransaction | None:
        """The open transaction as it stands (what the change log holds before its COMMIT is forwarded)."""
        if not self.statements or not self.has_writes or self.wrote_nothing:
            return None
        return CapturedTransaction(
            database=self.database,
            txid=self.txid,
            source_now=self.source_now,
            settings=self.settings,
            statements=tuple(self.statements),
            session_id=self.session_id,
            captured_at=time.time(),
            checks=tuple(c for c, _ in self.checks),
        )

    def _end(self, committed: bool) -> None:
        # Not "any statement kept": a read-only transaction's SET LOCAL is kept for replay, but it writes nothing
        # (logged, it was a record without a txid, applied twice if it came before S, for every such read).
        wrote = self.has_writes
        tx = self.current() if wrote else None
        samples = tuple(s for _, s in self.checks) if tx is None or not committed else ()
        if wrote or samples or self.undone:
            self.ended.append(Ended(tx, committed, samples, read_only=not wrote, undone=self.undone))
        self.explicit = False
        self.failed = False
        self.statements = []
        self.savepoints = []
        self._logged_portals.clear()  # a transaction's end closes its portals
        self.txid = None
        self.source_now = None
        self.may_write = False
        self._appended_write = False
        self.probed = False
        self._settings_read = False
        self.checks = []
        self.undone = 0
        self.snapshot_tx = False

    def take_ended(self) -> list[Ended]:
        """The transactions that ended since the last call, oldest first."""
        out, self.ended = self.ended, []
        return out


def _snapshot_level(text: str) -> bool:
    """Whether a BEGIN or SET text asks for REPEATABLE READ or SERIALIZABLE (a snapshot per transaction)."""
    upper = text.upper()
    return any(level in upper for level in _SNAPSHOT_LEVELS)
