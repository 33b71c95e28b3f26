"""The change log: record encoding, prepare/settle ordering, group commit, crash safety, full and read-only disks."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pgleap.store import (
    CapturedStatement,
    CapturedTransaction,
    ChangeLogClosedError,
    ChangeLogCorruptError,
    ChangeLogError,
    ChangeLogFullError,
    ChangeLogLockedError,
    ChangeLogReadOnlyError,
    ChangeLogStateError,
    LogState,
    RecordFormatError,
    SQLiteChangeLog,
    Trimmed,
    decode_transaction,
    encode_transaction,
)
from pgleap.store.checkpoint import BACKSTOP_PAGES

SRC = Path(__file__).resolve().parents[1] / "src"


def make_tx(n: int, database: str = "app", *, images: bytes | None = None) -> CapturedTransaction:
    """A small transaction whose txid is n."""
    statement = CapturedStatement(
        sql="INSERT INTO t (id, v) VALUES ($1, $2)",
        params=(str(n).encode(), None),
        param_formats=(0, 0),
        param_types=(23, 25),
        tag="INSERT 0 1",
        images=images,
    )
    return CapturedTransaction(
        database=database,
        txid=n,
        source_now="2024-05-01 12:00:00.123456+00",
        settings=(("TimeZone", "UTC"),),
        statements=(statement,),
        session_id=n % 7,
        captured_at=1714564800.5,
    )


# -- records ------------------------------------------------------------------------------------------


def test_record_round_trip_keeps_bytes_nulls_and_copy_data() -> None:
    tx = CapturedTransaction(
        database="app",
        txid=2**40,
        source_now="2024-05-01 12:00:00+02",
        settings=(("search_path", '"$user", public'), ("DateStyle", "ISO, DMY")),
        statements=(
            CapturedStatement(
                sql="INSERT INTO t VALUES ($1, $2, $3) -- é",
                params=(b"\x00\xff\x01", None, b""),
                param_formats=(1, 0, 0),
                param_types=(17, 0, 25),
                tag="INSERT 0 1",
                images=b"\x93\x01\x02\x03",
            ),
            CapturedStatement(sql="COPY t FROM STDIN", copy_data=b"1\tx\n2\t\\N\n", tag="COPY 2"),
            CapturedStatement(sql="TRUNCATE u", tag="TRUNCATE TABLE"),
        ),
        session_id=42,
        captured_at=1714564800.25,
    )
    data = encode_transaction(tx)
    assert data[0] == 1  # the format byte
    assert decode_transaction(data) == tx
    assert decode_transaction(encode_transaction(make_tx(1))) == make_tx(1)


def test_record_decoding_refuses_unknown_formats_and_damage() -> None:
    data = encode_transaction(make_tx(1))
    with pytest.raises(RecordFormatError, match="format 9"):
        decode_transaction(bytes([9]) + data[1:])
    with pytest.raises(RecordFormatError, match="damaged"):
        decode_transaction(data[:-5])
    with pytest.raises(RecordFormatError, match="empty"):
        decode_transaction(b"")


# -- prepare, settle, read ----------------------------------------------------------------------------


def test_positions_are_gap_free_and_aborted_records_are_never_read(tmp_path: Path) -> None:
    async def run() -> None:
        with SQLiteChangeLog(tmp_path / "log.db") as log:
            ids = [await log.prepare(make_tx(n)) for n in range(1, 11)]
            assert ids == sorted(ids)
            for n, log_id in enumerate(ids, start=1):
                await log.settle(log_id, committed=n % 3 != 0)
            await log.flush()
            committed = log.read_committed("app", 0, 100)
            assert [r.position for r in committed] == list(range(1, 8))
            assert [r.transaction.txid for r in committed] == [1, 2, 4, 5, 7, 8, 10]
            assert all(r.state is LogState.COMMITTED for r in committed)
            assert log.last_position("app") == 7
            assert [r.position for r in log.read_committed("app", 3, 2)] == [4, 5]
            assert log.read_committed("other", 0, 100) == []
            count, nbytes, oldest = log.backlog("app", 5)
            assert (count, nbytes) == (2, sum(len(encode_transaction(make_tx(n))) for n in (8, 10)))
            assert oldest is not None and time.time() - 60 < oldest <= time.time()
            assert log.backlog("app", log.last_position("app"))[2] is None
            stats = log.stats()
            assert (stats.committed, stats.aborted, stats.pending) == (7, 3, 0)
            assert stats.healthy is True and log.healthy and log.last_error is None

    asyncio.run(run())


def test_positions_follow_prepare_order_not_answer_order(tmp_path: Path) -> None:
    async def run() -> None:
        with SQLiteChangeLog(tmp_path / "log.db") as log:
            first = await log.prepare(make_tx(1))
            second = await log.prepare(make_tx(2))
            other_db = await log.prepare(make_tx(3, database="other"))
            await log.settle(second, committed=True, wait=True)
            await log.settle(other_db, committed=True, wait=True)
            # `first` is still pending: `second` must wait behind it; another database does not.
            assert log.read_committed("app", 0, 10) == []
            assert [r.transaction.txid for r in log.read_committed("other", 0, 10)] == [3]
            await log.settle(first, committed=True, wait=True)
            assert [(r.position, r.transaction.txid) for r in log.read_committed("app", 0, 10)] == [(1, 1), (2, 2)]

    asyncio.run(run())


def test_the_backlog_and_the_settled_point_count_records_whose_commit_is_in_flight(tmp_path: Path) -> None:
    """A client has its COMMIT answer before the record is settled: lag 0 then would be a lie."""

    async def run() -> None:
        with SQLiteChangeLog(tmp_path / "log.db") as log:
            size = len(encode_transaction(make_tx(1)))
            applied = await log.prepare(make_tx(1))
            await log.settle(applied, committed=True, wait=True)
            assert log.backlog("app", 1) == (0, 0, None)
            first = await log.prepare(make_tx(2))
            second = await log.prepare(make_tx(3))
            other = await log.prepare(make_tx(4, database="other"))
            assert log.backlog("app", 1)[:2] == (2, 2 * size)  # both pending
            assert log.settled_through() == applied
            await log.settle(second, committed=True, wait=True)
            assert log.backlog("app", 1)[:2] == (2, 2 * size)  # one committed behind one pending
            assert log.settled_through() == applied
            await log.settle(first, committed=False, wait=True)
            assert log.backlog("app", 1)[:2] == (1, size)  # the aborted one is not lag
            assert log.settled_through() == other - 1  # any database's pending record bounds it
            assert log.backlog("app", log.last_position("app")) == (0, 0, None)
            assert log.backlog("other", 0)[:2] == (1, len(encode_transaction(make_tx(4, database="other"))))
            await log.settle(other, committed=True, wait=True)
            assert log.settled_through() == log.last_log_id() == other

    asyncio.run(run())


def test_a_queued_settle_counts_as_settled_before_the_writer_has_written_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The COMMIT was answered: a read forwarded now sees the transaction, whatever the file says yet."""

    async def run() -> None:
        with SQLiteChangeLog(tmp_path / "log.db") as log:
            first = await log.prepare(make_tx(1))
            second = await log.prepare(make_tx(2))
            release = threading.Event()
            write_group = log._write_group

            def held(group: list[object]) -> None:
                release.wait(10)
                write_group(group)  # type: ignore[arg-type]

            monkeypatch.setattr(log, "_write_group", held)
            log.settle_nowait(first, committed=True)
            log.settle_nowait(second, committed=False)
            assert log._read("SELECT count(*) FROM change_log WHERE state = 'pending'") == [(2,)]  # not written
            assert log.settled_through() == second
            third = log.last_log_id() + 1
            release.set()
            await log.flush()
            assert log.settled_through() == second
            monkeypatch.undo()
            assert await log.prepare(make_tx(3)) == third
            assert log.settled_through() == second  # the new pending record bounds it again

    asyncio.run(run())


def test_wrong_settles_are_precise_errors_and_do_not_harm_health(tmp_path: Path) -> None:
    async def run() -> None:
        with SQLiteChangeLog(tmp_path / "log.db", durability="batch") as log:
            log_id = await log.prepare(make_tx(1))
            with pytest.raises(ChangeLogStateError, match="record 999 does not exist"):
                await log.settle(999, committed=True, wait=True)
            await log.settle(log_id, committed=True, wait=True)
            await log.settle(log_id, committed=True, wait=True)  # twice: harmless
            with pytest.raises(ChangeLogStateError, match="already committed"):
                await log.settle(log_id, committed=False, wait=True)
            with pytest.raises(ChangeLogStateError, match="to pending"):
                await log.resolve(log_id, LogState.PENDING)
            assert log.healthy and log.last_position("app") == 1

    asyncio.run(run())


def test_recovery_sees_pending_records_and_resolves_them(tmp_path: Path) -> None:
    path = tmp_path / "log.db"

    async def before_crash() -> list[int]:
        log = SQLiteChangeLog(path)
        ids = [await log.prepare(make_tx(n)) for n in range(1, 5)]
        await log.settle(ids[0], committed=True, wait=True)
        log.close()
        return ids

    async def after_restart(ids: list[int]) -> None:
        with SQLiteChangeLog(path) as log:
            assert [(log_id, tx.txid) for log_id, tx in log.pending()] == [(ids[1], 2), (ids[2], 3), (ids[3], 4)]
            assert log.stats().pending == 3
            live = await log.prepare(make_tx(5))  # a session of this run, its COMMIT in flight: not recovery's
            assert [log_id for log_id, _ in log.left_pending()] == ids[1:]
            await log.settle(live, committed=False, wait=True)
            await log.resolve(ids[1], LogState.UNRESOLVED)  # e.g. 9.x: the outcome cannot be known
            await log.resolve(ids[2], LogState.COMMITTED)  # txid_status() said committed
            await log.resolve(ids[3], LogState.ABORTED)
            assert log.pending() == []
            assert [r.transaction.txid for r in log.read_committed("app", 0, 10)] == [1, 3]
            assert [(r.log_id, r.state) for r in log.unresolved()] == [(ids[1], LogState.UNRESOLVED)]
            # Determined later after all: it goes last, it is not lost.
            await log.resolve(ids[1], LogState.COMMITTED)
            assert [(r.position, r.transaction.txid) for r in log.read_committed("app", 0, 10)] == [
                (1, 1),
                (2, 3),
                (3, 2),
            ]
            stats = log.stats()
            assert (stats.committed, stats.aborted, stats.unresolved, stats.pending) == (3, 2, 0, 0)  # live aborted

    asyncio.run(after_restart(asyncio.run(before_crash())))


def test_truncate_keeps_unapplied_and_unresolved_records(tmp_path: Path) -> None:
    async def run() -> None:
        with SQLiteChangeLog(tmp_path / "log.db") as log:
            ids = [await log.prepare(make_tx(n)) for n in range(1, 9)]
            await log.resolve(ids[0], LogState.UNRESOLVED)
            for n, log_id in enumerate(ids[1:], start=2):
                await log.settle(log_id, committed=n != 4, wait=True)  # txid 4 aborted
            # positions: 2->1, 3->2, 5->3, 6->4, 7->5, 8->6
            assert await log.truncate_before("app", 4, older_than=time.time() - 60) == 0  # all logged just now
            assert log.trimmed("app") == Trimmed()
            assert await log.truncate_before("app", 4, limit=1) == 1  # position 1 only: txid 4 is after it
            assert [r.position for r in log.read_committed("app", 0, 10)] == [2, 3, 4, 5, 6]
            assert log.trimmed("app") == Trimmed(1, 2, 0)  # position 1 was txid 2
            deleted = await log.truncate_before("app", 4, limit=5)
            assert deleted == 3  # positions 2..3 and the aborted txid 4
            assert log.trimmed("app") == Trimmed(3, 5, 0)  # the aborted txid 4 is no committed record
            assert [r.position for r in log.read_committed("app", 0, 10)] == [4, 5, 6]
            assert log.last_position("app") == 6
            assert [r.log_id for r in log.unresolved()] == [ids[0]]
            stats = log.stats()
            assert (stats.committed, stats.aborted, stats.unresolved) == (3, 0, 1)
            assert await log.truncate_before("app", 7) == 3
            assert await log.truncate_before("app", 7) == 0
        with SQLiteChangeLog(tmp_path / "log.db") as log:  # positions continue after truncation and reopen
            assert log.trimmed("app") == Trimmed(6, 8, 0)
            log_id = await log.prepare(replace(make_tx(9), txid=None))  # an autocommit DO, say
            await log.settle(log_id, committed=True, wait=True)
            assert [r.position for r in log.read_committed("app", 0, 10)] == [7]
            assert await log.truncate_before("app", 8) == 1
            assert log.trimmed("app") == Trimmed(7, 8, 1)

    asyncio.run(run())


# -- durability modes ---------------------------------------------------------------------------------


def _row_state(path: Path, log_id: int) -> str | None:
    """The record's state as a fresh connection sees it: visible there means committed in SQLite."""
    db = sqlite3.connect(path)
    try:
        row = db.execute("SELECT state FROM change_log WHERE log_id = ?", (log_id,)).fetchone()
        return None if row is None else str(row[0])
    finally:
        db.close()


def test_batch_mode_groups_concurrent_prepares_into_few_durable_commits(tmp_path: Path) -> None:
    path = tmp_path / "log.db"

    async def one(log: SQLiteChangeLog, n: int) -> int:
        log_id = await log.prepare(make_tx(n))
        assert _row_state(path, log_id) == "pending"  # durable before the await returned
        return log_id

    async def run() -> None:
        with SQLiteChangeLog(path, durability="batch", batch_interval=0.02) as log:
            ids = await asyncio.gather(*(one(log, n) for n in range(200)))
            assert len(set(ids)) == 200
            assert 1 <= log.sqlite_commits <= 10, log.sqlite_commits

    asyncio.run(run())


def test_commit_mode_shares_fsyncs_without_waiting(tmp_path: Path) -> None:
    """Prepares queued while an fsync runs share the next one; each is durable when its await returns."""
    path = tmp_path / "log.db"

    async def one(log: SQLiteChangeLog, n: int) -> int:
        log_id = await log.prepare(make_tx(n))
        assert _row_state(path, log_id) == "pending"
        return log_id

    async def run() -> None:
        with SQLiteChangeLog(path, durability="commit") as log:
            ids = await asyncio.gather(*(one(log, n) for n in range(50)))
            assert 1 <= log.sqlite_commits <= 50
            for log_id in ids:
                await log.settle(log_id, committed=True)
            await log.flush()
            assert log.last_position("app") == 50

    asyncio.run(run())


def test_waiting_for_the_disk_does_not_block_the_event_loop(tmp_path: Path) -> None:
    async def run() -> None:
        with SQLiteChangeLog(tmp_path / "log.db", durability="batch", batch_interval=0.3) as log:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(ticker())
            started = time.monotonic()
            await log.prepare(make_tx(1))
            assert time.monotonic() - started >= 0.25  # held for the group window ...
            assert ticks >= 10  # ... while the loop kept running
            task.cancel()

    asyncio.run(run())


CHILD = textwrap.dedent("""
    import asyncio, sys
    from pgleap.store import SQLiteChangeLog, CapturedStatement, CapturedTransaction

    async def session(log, s):
        for n in range(100000):
            tx = CapturedTransaction("app", s * 1000000 + n, None, (), (CapturedStatement("UPDATE t SET v = v + 1",
                                     images=b"x" * (n % 500)),), s, 0.0)
            log_id = await log.prepare(tx)
            print("P", log_id, flush=True)
            await log.settle(log_id, committed=n % 4 != 0)

    async def main():
        log = SQLiteChangeLog(sys.argv[1], durability=sys.argv[2], batch_interval=0.002)
        await asyncio.gather(*(session(log, s) for s in range(8)))

    asyncio.run(main())
""")


@pytest.mark.parametrize("durability", ["commit", "batch"])
def test_kill_9_loses_no_returned_prepare(tmp_path: Path, durability: str) -> None:
    path = tmp_path / "log.db"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), durability], stdout=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout is not None
    returned: list[int] = []
    try:
        while len(returned) < 400:
            line = child.stdout.readline()
            assert line, f"child exited early with {child.wait()}"
            returned.append(int(line.split()[1]))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    with SQLiteChangeLog(path) as log:
        states = {log_id: tx for log_id, tx in log.pending()}
        committed = log.read_committed("app", 0, 1_000_000)
        assert [r.position for r in committed] == list(range(1, len(committed) + 1))
        committed_ids = {r.log_id for r in committed}
        db = sqlite3.connect(path)
        all_rows = {int(i): str(s) for i, s in db.execute("SELECT log_id, state FROM change_log")}
        db.close()
        for log_id in returned:
            assert log_id in all_rows, f"prepare {log_id} returned but is not in the log"
            if all_rows[log_id] == "pending":
                assert log_id in states
        # every committed record is either positioned or waiting behind a pending one
        first_pending = min(states, default=None)
        for log_id, state in all_rows.items():
            if state == "committed" and (first_pending is None or log_id < first_pending):
                assert log_id in committed_ids


# -- errors -------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted for the test (needs root and mount permission), unmounted afterwards."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def _fill(log: SQLiteChangeLog, blob: int) -> ChangeLogFullError:
    for n in range(10_000):
        try:
            await log.prepare(make_tx(n, images=os.urandom(blob)))
        except ChangeLogFullError as exc:
            return exc
    raise AssertionError("the log never filled up")


def test_a_full_filesystem_is_a_loud_actionable_error(tiny_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tiny_fs / "log.db"

    async def run() -> None:
        log = SQLiteChangeLog(path, durability="batch")
        try:
            error = await _fill(log, 8000)
            message = str(error)
            assert str(path) in message and "is full" in message
            assert f"Free space on the filesystem holding {tiny_fs}" in message
            assert isinstance(error.__cause__, sqlite3.OperationalError)
            assert "re-copy" in message
            assert not log.healthy and log.last_error == message
            assert log.stats().healthy is False and log.stats().errors >= 1
            assert any(r.levelno == logging.ERROR and str(path) in r.getMessage() for r in caplog.records)
            # reads keep working: what was logged before the disk filled is still there for recovery
            assert len(log.pending()) > 0
        finally:
            log.close()

    asyncio.run(run())


def test_the_size_limit_is_reported_like_a_full_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "log.db"

    async def run() -> None:
        with SQLiteChangeLog(path, max_bytes=128 * 1024) as log:
            error = await _fill(log, 8000)
            assert "size limit of 131072 bytes" in str(error) and "Raise the change log's max_bytes" in str(error)
            assert not log.healthy and log.last_error == str(error)
            assert caplog.records and caplog.records[-1].levelno == logging.ERROR

    asyncio.run(run())


def test_a_read_only_filesystem_is_a_clear_error(tiny_fs: Path) -> None:
    path = tiny_fs / "log.db"

    async def create() -> None:
        with SQLiteChangeLog(path) as log:
            await log.prepare(make_tx(1))

    asyncio.run(create())
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with pytest.raises(ChangeLogReadOnlyError) as info:
        SQLiteChangeLog(path)
    assert str(path) in str(info.value)
    assert "writable" in str(info.value) and "read-only" in str(info.value)


def test_a_second_process_on_the_same_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with SQLiteChangeLog(path), pytest.raises(ChangeLogLockedError, match="in use by another process"):
        SQLiteChangeLog(path)
    SQLiteChangeLog(path).close()  # free again once closed


def test_a_log_from_before_the_trimmed_columns_gains_them(tmp_path: Path) -> None:
    """A log written before log_head kept what retention deleted opens, keeps its head, and reads no trim."""
    path = tmp_path / "log.db"

    async def write() -> None:
        with SQLiteChangeLog(path) as log:
            await log.settle(await log.prepare(make_tx(5)), committed=True, wait=True)

    async def write_trimmed() -> None:
        with SQLiteChangeLog(path) as log:
            for n in (5, 6, 7):
                await log.settle(await log.prepare(make_tx(n, database="old")), committed=True, wait=True)

    asyncio.run(write())
    asyncio.run(write_trimmed())
    db = sqlite3.connect(path)
    db.executescript(
        "ALTER TABLE log_head RENAME TO old_head; "
        "CREATE TABLE log_head (database TEXT PRIMARY KEY, last_position INTEGER NOT NULL, frontier INTEGER NOT NULL); "
        "INSERT INTO log_head SELECT database, last_position, frontier FROM old_head; DROP TABLE old_head;"
        "DELETE FROM change_log WHERE database = 'old' AND position < 3;"  # an older pgleap's retention
    )
    db.close()
    with SQLiteChangeLog(path) as log:
        assert log.last_position("app") == 1 and log.trimmed("app") == Trimmed()
        # What it deleted is not known: replay must never pass over it (as over a record without a txid).
        assert log.trimmed("old") == Trimmed(2, None, 1)


def test_a_record_whose_settle_the_disk_refused_is_left_to_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Still pending in the file and settled by nobody else: START CAPTURE's recovery must take it up."""

    async def run() -> None:
        with SQLiteChangeLog(tmp_path / "log.db") as log:
            refused, fine = await log.prepare(make_tx(1)), await log.prepare(make_tx(2))

            def failing(op: Any, fx: Any) -> None:
                raise sqlite3.OperationalError("disk I/O error")

            with monkeypatch.context() as patch:
                patch.setattr(log, "_transition", failing)
                with pytest.raises(ChangeLogError):
                    await log.settle(refused, committed=True, wait=True)
            await log.settle(fine, committed=True, wait=True)
            assert [log_id for log_id, _ in log.pending()] == [refused]
            assert [log_id for log_id, _ in log.left_pending()] == [refused]

    asyncio.run(run())


def test_a_log_from_a_newer_pgleap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    SQLiteChangeLog(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(ChangeLogCorruptError, match="schema version 99, written by a newer pgleap"):
        SQLiteChangeLog(path)


def test_a_closed_log_refuses_writes(tmp_path: Path) -> None:
    log = SQLiteChangeLog(tmp_path / "log.db")
    log.close()
    with pytest.raises(ChangeLogClosedError):
        asyncio.run(log.prepare(make_tx(1)))
    with pytest.raises(ChangeLogClosedError):
        log.pending()


def test_an_unexpected_writer_failure_fails_the_callers_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run() -> None:
        with SQLiteChangeLog(tmp_path / "log.db") as log:

            def broken(*args: object) -> int:
                raise RuntimeError("boom")

            monkeypatch.setattr(log, "_insert", broken)
            with pytest.raises(ChangeLogError, match=r"internal error .*boom"):
                await asyncio.wait_for(log.prepare(make_tx(1)), timeout=5)
            assert not log.healthy
            monkeypatch.undo()
            await log.prepare(make_tx(2))  # the writer is still alive

    asyncio.run(run())


def test_a_prepare_cancelled_before_it_returned_is_aborted_not_left_pending(tmp_path: Path) -> None:
    async def run() -> None:
        with SQLiteChangeLog(tmp_path / "log.db", durability="batch", batch_interval=0.3) as log:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(log.prepare(make_tx(1)), timeout=0.05)
            kept = await log.prepare(make_tx(2))
            await log.settle(kept, committed=True, wait=True)
            await asyncio.sleep(0.05)  # let the cancelled prepare's abort land
            await log.flush()
            assert log.pending() == []
            assert (log.stats().aborted, log.stats().committed) == (1, 1)
            # the orphan did not hold txid 2 back
            assert [r.transaction.txid for r in log.read_committed("app", 0, 10)] == [2]

    asyncio.run(run())


@pytest.fixture
def capture_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """pgleap.upgrade.capture.capture, with a PREPARE_TIMEOUT a slow group commit (batch, 0.3 s) outlasts."""
    from pgleap.upgrade.capture import capture

    monkeypatch.setattr(capture, "PREPARE_TIMEOUT", 0.05)
    return capture


def slow_log(tmp_path: Path) -> SQLiteChangeLog:
    """A change log whose records land 0.3 s after they are asked for (group commit)."""
    return SQLiteChangeLog(tmp_path / "log.db", durability="batch", batch_interval=0.3)


def test_a_held_commit_goes_on_after_the_prepare_timeout_and_its_late_record_is_settled_by_the_answer(
    tmp_path: Path, capture_module: Any
) -> None:
    async def run() -> None:
        with slow_log(tmp_path) as log:
            capture = capture_module.Capture("app", log)
            answers: list[int | None] = []
            committed = capture.prepare_then(make_tx(1), answers.append)
            rolled_back = capture.prepare_then(make_tx(2), answers.append)
            await asyncio.sleep(0.1)
            assert answers == [None, None]  # the COMMITs went on without their records (I5), and that was counted
            assert capture.log_failures == 2 and committed.timed_out
            # The source answers before the records land: each is settled by its answer, never logged twice
            # (a second record of the same txid, left pending by a crash, would be resolved committed too).
            committed.answered(True)
            rolled_back.answered(False)
            while not (committed.landed and rolled_back.landed):
                await asyncio.sleep(0.01)
            await capture.drain()
            assert log.pending() == []
            assert (log.stats().committed, log.stats().aborted, capture.logged_after_commit) == (1, 1, 0)
            assert [r.transaction.txid for r in log.read_committed("app", 0, 10)] == [1]

    asyncio.run(run())


def test_a_late_record_that_never_lands_is_logged_after_the_answer(
    tmp_path: Path, capture_module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run() -> None:
        with slow_log(tmp_path) as log:
            capture = capture_module.Capture("app", log)
            real_insert = log._insert

            def broken(*args: object) -> int:
                raise RuntimeError("disk gone")

            monkeypatch.setattr(log, "_insert", broken)
            held = capture.prepare_then(make_tx(1), lambda log_id: None)
            while not held.landed:
                await asyncio.sleep(0.01)
            assert held.log_id is None
            monkeypatch.setattr(log, "_insert", real_insert)
            held.answered(True)  # the source committed it: logged after the answer, as a COMMIT not held
            await capture.drain()
            assert capture.logged_after_commit == 1
            assert [r.transaction.txid for r in log.read_committed("app", 0, 10)] == [1]

    asyncio.run(run())


def test_prepare_then_answers_from_the_loop_with_the_id_or_the_error(tmp_path: Path) -> None:
    async def run() -> None:
        log = SQLiteChangeLog(tmp_path / "log.db")
        answers: list[tuple[int | None, ChangeLogError | None]] = []
        log.prepare_then(make_tx(1), lambda log_id, error: answers.append((log_id, error)))
        assert answers == []  # never from inside the call
        while not answers:
            await asyncio.sleep(0.01)
        assert answers[0][1] is None and log.pending()[0][0] == answers[0][0]
        log.close()
        log.prepare_then(make_tx(2), lambda log_id, error: answers.append((log_id, error)))
        assert len(answers) == 1
        await asyncio.sleep(0)
        assert answers[1][0] is None and isinstance(answers[1][1], ChangeLogClosedError)

    asyncio.run(run())


def test_a_barrier_after_unsynced_settles_waits_for_their_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A COMMIT that changes nothing writes no WAL frame and so fsyncs nothing: flush() must not take it for
    # a sync, or replay could apply (and store on the target) positions a power loss then hands out again.
    from pgleap.store import changelog as changelog_module

    monkeypatch.setattr(changelog_module, "_SETTLE_SYNC_DELAY", 30.0)  # no sync after a quiet moment

    async def run() -> None:
        with SQLiteChangeLog(tmp_path / "log.db") as log:
            syncs: list[int] = []
            real_sync = log._sync_wal

            def counted() -> None:
                syncs.append(1)
                real_sync()

            monkeypatch.setattr(log, "_sync_wal", counted)
            log_id = await log.prepare(make_tx(1))
            log.settle_nowait(log_id, committed=True)
            await asyncio.sleep(0.1)  # written, not fsynced
            assert log.read_committed("app", 0, 10) == []  # its position is not durable yet
            await asyncio.wait_for(log.flush(), timeout=5)
            assert syncs == [1]
            assert [r.transaction.txid for r in log.read_committed("app", 0, 10)] == [1]

    asyncio.run(run())


def test_a_prepare_the_disk_refuses_does_not_drop_the_settles_in_its_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run() -> None:
        with SQLiteChangeLog(tmp_path / "log.db", durability="batch", batch_interval=0.2) as log:
            first = await log.prepare(make_tx(1))
            real_insert = log._insert

            def full(op: Any, counts: Any) -> int:
                if op.tx.txid == 2:
                    raise sqlite3.OperationalError("database or disk is full")
                return real_insert(op, counts)

            monkeypatch.setattr(log, "_insert", full)
            log.settle_nowait(first, committed=True)  # queued with the refused prepare: one group
            with pytest.raises(ChangeLogError):
                await asyncio.wait_for(log.prepare(make_tx(2)), timeout=5)
            await log.flush()
            assert log.pending() == []
            assert [r.transaction.txid for r in log.read_committed("app", 0, 10)] == [1]

    asyncio.run(run())


def test_the_wal_is_copied_and_started_over_off_the_commit_path(tmp_path: Path) -> None:
    """With SQLite's own checkpoint off (it ran inside a held COMMIT), the WAL stays bounded under a steady load."""
    path = tmp_path / "log.db"
    image = os.urandom(8000)  # about two pages per record
    per_writer, writers = 400, 4

    async def writer(log: SQLiteChangeLog, first: int) -> None:
        for n in range(first, first + per_writer):  # back to back: a commit lands during every checkpoint
            await log.settle(await log.prepare(make_tx(n, images=image)), committed=True)

    async def run() -> tuple[int, int]:
        with SQLiteChangeLog(path, checkpoint_interval=0.01) as log:
            assert log._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == BACKSTOP_PAGES
            await asyncio.gather(*(writer(log, w * per_writer) for w in range(writers)))
            return os.path.getsize(f"{path}-wal"), log._checkpointer.writer_passes

    wal_size, writer_passes = asyncio.run(run())
    written = per_writer * writers * len(image)
    assert writer_passes > 0, wal_size
    # Never started over, the WAL grew past 45 MB here (pages are written more than once); started over,
    # it stayed near 2.2 MB, what the writer appends while a background pass runs.
    assert wal_size < written / 2, (wal_size, written)
