"""Replay without servers: snapshot visibility (txid_visible_in_snapshot), error classification, journal."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from pgleap.config import ServerConfig
from pgleap.protocol import codes
from pgleap.protocol.messages import ProtocolError, message
from pgleap.proxy.backend import BackendConnection
from pgleap.upgrade.replay import (
    ApplyError,
    ApplyJournal,
    Divergence,
    ErrorKind,
    SnapshotFormatError,
    classify_sqlstate,
    is_transient,
    parse_snapshot,
    visible,
)
from pgleap.upgrade.replay.lag import RateMeter
from pgleap.upgrade.replay.wire import Pipeline, TargetSession, is_copy_from_stdin

from conftest import older_sqlite_file

EPOCH = 1 << 32  # txid_current() carries the epoch in its high 32 bits


def test_parse_snapshot() -> None:
    s = parse_snapshot("100:110:102,105")
    assert (s.xmin, s.xmax, s.xip) == (100, 110, frozenset({102, 105}))
    assert str(s) == "100:110:102,105"
    assert parse_snapshot("7:7:").xip == frozenset()


@pytest.mark.parametrize("text", ["", "1:2", "a:b:", "10:5:", "0:5:", "10:20:25", "10:20:5", "1:2:3:4"])
def test_parse_snapshot_rejects(text: str) -> None:
    with pytest.raises(SnapshotFormatError):
        parse_snapshot(text)


@pytest.mark.parametrize(
    ("txid", "expected"),
    [
        (99, True),  # below xmin: committed (or aborted) before the snapshot
        (100, True),  # xmin itself, not in progress: visible
        (102, False),  # in progress at the snapshot
        (103, True),  # between xmin and xmax, finished: visible
        (105, False),
        (109, True),
        (110, False),  # xmax: not yet started
        (1000, False),
    ],
)
def test_visible(txid: int, expected: bool) -> None:
    assert visible(txid, "100:110:102,105") is expected


def test_visible_with_epoch_sized_txids() -> None:
    xmin = 3 * EPOCH + 4_294_967_000  # close to wraparound of the 32-bit part
    snap = f"{xmin}:{xmin + 600}:{xmin + 10},{xmin + 500}"
    assert visible(xmin - 1, snap)
    assert visible(xmin + 11, snap)
    assert not visible(xmin + 10, snap)
    assert not visible(xmin + 500, snap)
    assert visible(xmin + 400, snap)  # crosses into the next epoch; still ordered as 64-bit numbers
    assert not visible(xmin + 600, snap)
    assert not visible(4 * EPOCH + 10_000, snap)
    assert visible(2 * EPOCH + 4_294_967_295, snap)  # an earlier epoch, numerically higher 32-bit part


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("42601", ErrorKind.SYNTAX),
        ("42883", ErrorKind.FEATURE_INCOMPATIBILITY),  # undefined_function
        ("42P01", ErrorKind.FEATURE_INCOMPATIBILITY),  # undefined_table
        ("42703", ErrorKind.FEATURE_INCOMPATIBILITY),  # undefined_column
        ("42704", ErrorKind.FEATURE_INCOMPATIBILITY),  # undefined_object (a type)
        ("0A000", ErrorKind.FEATURE_INCOMPATIBILITY),  # feature_not_supported
        ("23505", ErrorKind.CONSTRAINT_VIOLATION),
        ("23503", ErrorKind.CONSTRAINT_VIOLATION),
        ("23514", ErrorKind.CONSTRAINT_VIOLATION),
        ("42501", ErrorKind.OTHER),  # insufficient_privilege: the login, not the versions
        ("22012", ErrorKind.OTHER),
        ("XX000", ErrorKind.OTHER),
    ],
)
def test_classify_sqlstate(sqlstate: str, kind: ErrorKind) -> None:
    assert classify_sqlstate(sqlstate) is kind


@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("57P01", True),
        ("57P02", True),
        ("57P03", True),
        ("08006", True),
        ("08001", True),
        ("53300", True),
        ("40P01", True),
        ("23505", False),
        ("42P01", False),
        ("57014", False),
    ],
)
def test_is_transient(sqlstate: str, transient: bool) -> None:
    assert is_transient(sqlstate) is transient


def test_journal_keys_records_by_position(tmp_path: object) -> None:
    journal = ApplyJournal()
    error = ApplyError(
        "app",
        7,
        1234,
        0,
        "insert into t values (1)",
        "42P01",
        'relation "t" does not exist',
        ErrorKind.FEATURE_INCOMPATIBILITY,
        "paused",
    )
    journal.record_error(error)
    journal.record_error(error)  # recorded again after a retry: still one
    (back,) = journal.errors("app")
    assert back.position == 7 and back.kind is ErrorKind.FEATURE_INCOMPATIBILITY and back.action == "paused"
    journal.record_divergences([Divergence("app", 8, 99, 1, "update t set x = 1", "UPDATE 2", "UPDATE 3")] * 2)
    tags = [(d.position, d.source_tag, d.target_tag) for d in journal.divergences("app")]
    assert tags == [(8, "UPDATE 2", "UPDATE 3")]
    journal.mark_resync("app", ("t", "u"), 7, "skipped")
    journal.mark_resync("app", ("t",), 9, "skipped again")
    assert journal.resync_tables("app") == ["t", "u"]
    assert journal.errors("other") == []
    journal.close()


def test_pipeline_messages() -> None:
    pipeline = Pipeline()
    pipeline.extended("insert into t values ($1, $2)", (b"1", None), (0, 1), (23, 70000))
    pipeline.copy_in("copy t from stdin", b"1\tx\n")
    pipeline.sync()
    data = b"".join(pipeline.chunks)
    kinds = []
    offset = 0
    while offset < len(data):
        kind, length = data[offset], struct.unpack_from("!I", data, offset + 1)[0]
        kinds.append(chr(kind))
        if kind == codes.PARSE:
            # A user type OID (>= 16384) is sent as 0: OIDs differ between source and target.
            assert data[offset + 5 : offset + 1 + length].endswith(struct.pack("!h2I", 2, 23, 0))
        offset += 1 + length
    assert kinds == ["P", "B", "E", "Q", "d", "c", "S"]
    assert [chr(r.kind) for r in pipeline.requests] == ["P", "B", "E", "Q", "S"]
    assert is_copy_from_stdin("COPY t (a, b) FROM STDIN WITH (FORMAT csv)")
    assert not is_copy_from_stdin("copy t to stdout")


def test_target_session_frames_answers_however_they_are_read() -> None:
    """Several messages in one read, one message across reads, an oversized length, the connection's end."""

    def session(reader: asyncio.StreamReader) -> TargetSession:
        writer: asyncio.StreamWriter = None  # type: ignore[assignment]  # nothing is written here
        return TargetSession(BackendConnection(ServerConfig("127.0.0.1", 1, "app", "pgleap"), reader, writer, 1, 2))

    async def go() -> None:
        reader = asyncio.StreamReader()
        target = session(reader)
        complete, ready = message(codes.COMMAND_COMPLETE, b"UPDATE 1\0"), message(codes.READY_FOR_QUERY, b"T")
        big = message(codes.DATA_ROW, b"x" * 200_000)
        reader.feed_data(complete + ready + big[:7])
        assert await target.next_message() == (codes.COMMAND_COMPLETE, b"UPDATE 1\0")
        assert await target.next_message() == (codes.READY_FOR_QUERY, b"T")
        reader.feed_data(big[7:] + ready[:3])
        assert await target.next_message() == (codes.DATA_ROW, b"x" * 200_000)
        reader.feed_data(ready[3:] + b"D" + struct.pack("!i", 3))
        assert await target.next_message() == (codes.READY_FOR_QUERY, b"T")
        with pytest.raises(ProtocolError, match="length of 3"):
            await target.next_message()
        closed = asyncio.StreamReader()
        closed.feed_data(ready[:4])
        closed.feed_eof()
        with pytest.raises(asyncio.IncompleteReadError):
            await session(closed).next_message()

    asyncio.run(go())


def test_rate_meter() -> None:
    meter = RateMeter(window=10)
    meter.add(50, now=100.0)
    meter.add(50, now=105.0)
    assert meter.rate(now=110.0) == pytest.approx(10.0)
    assert meter.rate(now=200.0) == 0.0


def test_stitch_uses_the_snapshot_of_tables_copied_apart() -> None:
    from pgleap.upgrade.replay import make_stitch
    from pgleap.upgrade.replay.applier import touched_relations

    tables = {"public.scratch": "200:210:", "other.scratch": "300:300:", "public.u": "150:150:"}
    stitch = make_stitch("100:110:", tables)
    s, scratch, u = stitch.default, stitch.tables["public.scratch"], stitch.tables["public.u"]
    assert stitch.for_relations(touched_relations("insert into items values (1)")) is s
    assert stitch.for_relations(touched_relations("insert into public.scratch values (1)")) is scratch
    # Unqualified and ambiguous (two schemas have a scratch): falls back to S.
    assert stitch.for_relations(touched_relations("insert into scratch values (1)")) is s
    assert stitch.for_relations(touched_relations("update u set x = 1")) is u
    # One statement writing tables copied at different snapshots cannot be stitched exactly.
    mixed = "with d as (delete from public.scratch returning *) insert into items select * from d"
    assert stitch.for_relations(touched_relations(mixed)) is None
    # ... unless every one of their copies holds the transaction, or none does.
    assert {x.visible(999) for x in stitch.all_for(touched_relations(mixed))} == {False}
    assert {x.visible(99) for x in stitch.all_for(touched_relations(mixed))} == {True}
    assert {x.visible(150) for x in stitch.all_for(touched_relations(mixed))} == {False, True}
    assert stitch.for_relations(()) is s
    assert not s.visible(150) and scratch.visible(150)


def test_a_write_naming_no_table_is_placed_by_every_copy_snapshot() -> None:
    """`SELECT f()` may write a table copied at a snapshot of its own: when the copies disagree, it is flagged."""
    from pgleap.store.records import CapturedStatement, CapturedTransaction, LoggedTransaction, LogState
    from pgleap.upgrade.replay import make_stitch
    from pgleap.upgrade.replay.applier import Replayer
    from pgleap.upgrade.replay.indirect import IndirectWrites

    stitch = make_stitch("100:110:", {"public.scratch": "200:210:"})
    replayer = object.__new__(Replayer)  # only what _in_copy reads
    replayer.stitch, replayer.snapshot, replayer._flags = stitch, stitch.default, {}
    replayer._indirect = IndirectWrites()

    def in_copy(txid: int, sql: str) -> bool:
        tx = CapturedTransaction("app", txid, None, (), (CapturedStatement(sql),), 1)
        return replayer._in_copy(LoggedTransaction(1, 7, LogState.COMMITTED, tx), 0, sql)

    assert in_copy(99, "SELECT f()") is True and replayer._flags == {}  # every copy holds it
    assert in_copy(150, "UPDATE items SET a = 1") is False and replayer._flags == {}  # items: copied at S
    assert in_copy(150, "SELECT f()") is False  # S lacks it, scratch's copy holds it
    assert replayer._flags["*"][2] is True  # required: cutover waits for every table verified
    # A write reaching scratch through a foreign key's ON DELETE CASCADE, or a trigger that may write it.
    replayer._indirect = IndirectWrites({"public.items": frozenset({"public.scratch"})}, frozenset({"public.logged"}))
    replayer._flags = {}
    assert in_copy(150, "DELETE FROM items WHERE id = 1") is False
    assert set(replayer._flags) == {"items", "public.scratch"} and replayer._flags["public.scratch"][2] is True
    replayer._flags = {}
    assert in_copy(150, "UPDATE logged SET a = 1") is False and set(replayer._flags) == {"logged", "*"}
    replayer._flags = {}
    assert in_copy(99, "DELETE FROM items WHERE id = 1") is True and replayer._flags == {}  # both copies hold it


@pytest.mark.parametrize(
    ("sql", "txid", "alone"),
    [
        ("CREATE INDEX CONCURRENTLY i ON t (a)", None, True),
        ("VACUUM t", None, True),
        ("DO $$ BEGIN INSERT INTO t VALUES (1); END $$", None, False),  # may COMMIT, mostly does not
        ("CALL p(1)", None, False),
        ("INSERT INTO t VALUES (1)", None, False),
        ("CREATE INDEX CONCURRENTLY i ON t (a)", 7, False),  # a txid: it ran in a block after all
    ],
)
def test_which_transactions_replay_outside_a_block(sql: str, txid: int | None, alone: bool) -> None:
    """Only statements the target refuses in a block leave the batch; CALL and DO keep their position's transaction."""
    from pgleap.store.records import CapturedStatement, CapturedTransaction, LoggedTransaction, LogState
    from pgleap.upgrade.replay.applier import _refuses_block

    tx = CapturedTransaction("app", txid, None, (), (CapturedStatement(sql),), 1)
    assert _refuses_block(LoggedTransaction(1, 1, LogState.COMMITTED, tx)) is alone


@pytest.mark.parametrize(
    ("statements", "tables"),
    [
        (("SELECT nextval('s')", "INSERT INTO s.t VALUES (1)", "SELECT 1"), ("s.t",)),
        (("SELECT set_config($1, $2, true)", "UPDATE t SET a = 1", "SELECT pg_advisory_xact_lock(1)"), ("t",)),
        (("UPDATE t SET a = 1", "SELECT bump(1)"), ("*", "t")),  # bump() may write anywhere
        (("DO $$ BEGIN INSERT INTO t VALUES (1); END $$",), ("*",)),
        (("CALL p(1)",), ("*",)),
        (("this is no SQL",), ("*",)),
        (("INSERT INTO t VALUES (1)", "SELECT currval(pg_get_serial_sequence('t', 'id'))"), ("t",)),
        (("TRUNCATE a, b.c",), ("a", "b.c")),
        (("TRUNCATE a CASCADE",), ("*", "a")),
        (("CREATE INDEX i ON t (a)",), ()),
        (("SELECT count(*) FROM t",), ()),
    ],
)
def test_the_tables_a_transaction_writes_and_every_table_when_a_write_names_none(
    statements: tuple[str, ...], tables: tuple[str, ...]
) -> None:
    """Re-sync flags and result comparison read these: a write that names no table must not name none."""
    from pgleap.store.records import CapturedStatement, CapturedTransaction, LoggedTransaction, LogState
    from pgleap.upgrade.replay.applier import touched_tables

    tx = CapturedTransaction("app", 7, None, (), tuple(CapturedStatement(sql) for sql in statements), 1)
    assert sorted(touched_tables(LoggedTransaction(1, 1, LogState.COMMITTED, tx))) == sorted(tables)


def test_what_a_write_changes_beyond_the_tables_it_names() -> None:
    """Foreign keys' actions reach their tables at any depth; a trigger, a rule or a function that may write
    anywhere stands for every table."""
    from pgleap.upgrade.replay.indirect import IndirectWrites

    indirect = IndirectWrites(
        cascades={
            "public.orders": frozenset({"public.lines"}),
            "public.lines": frozenset({"public.notes", "audit.line_refs"}),
            "b.orders": frozenset({"b.lines"}),
            "public.audited_parent": frozenset({"public.audited"}),
        },
        spreading=frozenset({"public.audited", "public.ruled"}),
        read_only_functions=frozenset({"lower", "tax_rate"}),
    )
    reached = {"public.lines", "public.notes", "audit.line_refs"}
    assert set(indirect.widen(["public.orders"])) == {"public.orders", *reached}
    # A bare name may be any schema's table of that name.
    assert set(indirect.widen(["orders"])) == {"orders", "b.lines", *reached}
    widened = indirect.widen(["public.lines", "public.items"])
    assert widened[:2] == ("public.lines", "public.items")  # what it names first, as it names them
    assert set(widened[2:]) == {"public.notes", "audit.line_refs"}
    assert indirect.widen(["public.items"]) == ("public.items",)
    assert indirect.widen(["audited"]) == ("audited", "*")  # its trigger may write any table
    assert indirect.widen(["public.ruled"]) == ("public.ruled", "*")
    assert indirect.widen(["public.audited_parent"])[-1] == "*"  # the cascade fires the child's trigger
    assert indirect.widen(["t"], ["lower", "tax_rate", "nextval", "clock_timestamp"]) == ("t",)
    assert indirect.widen(["t"], ["next_order_no"]) == ("t", "*")  # volatile, or unknown: it may write
    assert indirect.widen(["*", "t"], ["next_order_no"]) == ("*", "t")
    # Nothing read from a catalog: any function may write; tables reach nothing more.
    assert IndirectWrites().widen(["t"], ["lower"]) == ("t", "*")
    assert IndirectWrites().widen(["public.orders"]) == ("public.orders",)


def test_a_table_flagged_again_while_it_was_verified_stays_flagged() -> None:
    """Re-sync clears a flag only through the position it read: a later write may be past the point it checked."""
    journal = ApplyJournal()
    journal.mark_resync("app", ("public.t", "public.u"), 5, "first")
    flags = journal.resync_flags("app")
    assert flags == {"public.t": 5, "public.u": 5}
    journal.mark_resync("app", ("public.t",), 9, "again, during the verification")
    journal.mark_resync("app", ("public.u",), 3, "an older position never lowers it")
    for name, position in flags.items():
        journal.clear_resync("app", name, through=position)
    assert journal.resync_flags("app") == {"public.t": 9}
    journal.clear_resync("app", "public.t")
    assert journal.resync_tables("app") == []


def test_triggered_tables_match_qualified_and_bare_names() -> None:
    from pgleap.upgrade.replay.recomputed import named_among

    triggered = frozenset({"public.orders", "audit.log"})
    assert named_among(("orders", "public.orders", "app.orders", "items", "log"), triggered) == (
        "orders",
        "public.orders",
        "log",
    )
    assert named_among(("orders",), frozenset()) == ()


def test_defaults_that_call_anything_count_as_computed_by_the_target() -> None:
    from pgleap.upgrade.replay.recomputed import computes

    for default in ("nextval('t_id_seq'::regclass)", "now()", "CURRENT_TIMESTAMP", "gen_random_uuid()", "my_id()"):
        assert computes(default), default
    # A constant, cast or not: 'now' in a default was read once, when the table was made.
    for default in ("0", "'x'::text", "'2020-01-01 00:00:00+00'::timestamp with time zone", "(-1)", "'{}'::jsonb"):
        assert not computes(default), default
    assert computes("this is not sql (")  # unknown: counted as computed


def test_a_required_flag_stays_required_until_cleared_and_an_older_journal_gains_the_column(tmp_path: Path) -> None:
    """A table flagged for a skipped transaction keeps holding cutover when flagged again for lesser reasons."""
    path = older_sqlite_file(
        tmp_path / "old.journal.db",
        "CREATE TABLE resync_table (database TEXT NOT NULL, table_name TEXT NOT NULL, position INTEGER NOT NULL, "
        "reason TEXT NOT NULL, PRIMARY KEY (database, table_name));"
        "INSERT INTO resync_table VALUES ('app', 'public.old', 2, 'before the column');",
    )
    journal = ApplyJournal(path)
    try:
        journal.mark_resync("app", ("public.t",), 5, "txid 7 skipped", required=True)
        journal.mark_resync("app", ("public.t", "public.u"), 6, "triggers fired again")
        assert journal.required_resyncs("app") == ["public.t"]
        assert journal.resync_flags("app") == {"public.old": 2, "public.t": 6, "public.u": 6}
        journal.clear_resync("app", "public.t", through=6)
        assert journal.required_resyncs("app") == []
    finally:
        journal.close()


def test_a_check_past_a_required_flag_clears_it_though_lesser_flags_came_during_the_check() -> None:
    """Triggers flag a busy table at every batch: the skip's flag must still clear once checked past it."""
    journal = ApplyJournal()
    journal.mark_resync("app", ("orders",), 5, "txid 7 skipped", required=True)
    seen = journal.resync_flags("app")  # read before the check, as the verifier does
    journal.mark_resync("app", ("orders",), 9, "triggers fired again")  # during the check
    journal.clear_resync("app", "orders", through=seen["orders"])
    assert journal.required_resyncs("app") == [] and journal.resync_flags("app") == {"orders": 9}
    journal.mark_resync("app", ("orders",), 12, "txid 9 skipped", required=True)
    journal.clear_resync("app", "orders", through=11)  # a check before that skip: it stays required
    assert journal.required_resyncs("app") == ["orders"]
    journal.clear_resync("app", "orders", through=12)
    assert journal.resync_flags("app") == {}
