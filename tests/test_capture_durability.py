"""I4 on the capture path: a write transaction is durable in the change log before its COMMIT reaches the source.

The change log's `prepare` is held open by the test. While it is held, the source must not have
committed the client's transaction (a direct session cannot see its row) and the log must already
hold it as pending; once released, the row is committed and the record settles as committed.
Each protocol shape that ends a transaction is tried: simple and extended, explicit and autocommit.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from pgleap.lab import LabServer
from pgleap.store import ChangeLogError, SQLiteChangeLog
from pgleap.store.changelog import PrepareDone
from pgleap.store.records import CapturedTransaction
from pgleap.testing import ProxyThread
from pgleap.upgrade.capture.capture import Capture

from conftest import capture_into, start_proxy, tool

pytestmark = pytest.mark.integration


class HeldChangeLog(SQLiteChangeLog):
    """A change log that answers a held COMMIT's prepare only when the test says so (after it is durable)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.prepared = threading.Event()
        self.release = threading.Event()
        self._held: set[asyncio.Task[None]] = set()

    def prepare_then(self, tx: CapturedTransaction, done: PrepareDone) -> None:
        def durable(log_id: int | None, error: ChangeLogError | None) -> None:
            self.prepared.set()
            task = asyncio.ensure_future(self._answer_when_released(done, log_id, error))
            self._held.add(task)
            task.add_done_callback(self._held.discard)

        super().prepare_then(tx, durable)

    async def _answer_when_released(self, done: PrepareDone, log_id: int | None, error: ChangeLogError | None) -> None:
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        done(log_id, error)


@pytest.fixture
def held(tmp_path: Path, backend: LabServer) -> Iterator[tuple[ProxyThread, Capture, HeldChangeLog]]:
    """A capturing proxy in front of `backend` whose change log holds every prepare."""
    backend.psql("drop table if exists dur; create table dur (id int primary key, v text)")
    proxy = start_proxy(tmp_path, {"app": backend})
    changelog = HeldChangeLog(tmp_path / "changes.db")
    capture = capture_into(proxy, changelog)
    try:
        yield proxy, capture, changelog
    finally:
        changelog.release.set()
        proxy.stop()
        changelog.close()


def psql(dsn: str, *commands: str) -> None:
    args = [tool("psql"), dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    for command in commands:
        args += ["-c", command]
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def simple_autocommit(dsn: str) -> None:
    psql(dsn, "insert into dur values (1, 'simple autocommit')")


def simple_explicit(dsn: str) -> None:
    psql(dsn, "begin", "insert into dur values (1, 'simple explicit')", "commit")


def extended_autocommit(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into dur values (%s, %s)", (1, "extended autocommit"))


def extended_explicit(dsn: str) -> None:
    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("insert into dur values (%s, %s)", (1, "extended explicit"))


@pytest.mark.parametrize("client", [simple_autocommit, simple_explicit, extended_autocommit, extended_explicit])
def test_the_log_holds_the_transaction_before_the_source_commits_it(
    held: tuple[ProxyThread, Capture, HeldChangeLog], backend: LabServer, client: Callable[[str], None]
) -> None:
    proxy, capture, changelog = held
    errors: list[BaseException] = []

    def run() -> None:
        try:
            client(proxy.dsn())
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert changelog.prepared.wait(30), "the transaction never reached the change log"
        # Durable as pending, and the source has not committed it: the COMMIT is still held by pgleap.
        (pending,) = changelog.pending()
        assert pending[1].statements[0].sql.startswith("insert into dur")
        assert pending[1].txid is not None
        assert backend.psql("select count(*) from dur") == "0"
    finally:
        changelog.release.set()
        thread.join(60)
    assert not errors, errors
    assert backend.psql("select count(*) from dur") == "1"
    proxy.call(capture.drain())
    assert changelog.pending() == []
    (record,) = changelog.read_committed("app", 0, 10)
    txid = backend.psql("select xmin::text from dur")
    assert record.transaction.txid is not None and str(record.transaction.txid % 2**32) == txid
    assert capture.logged_after_commit == 0 and capture.problems == []


def test_a_failed_commit_settles_the_record_aborted(
    held: tuple[ProxyThread, Capture, HeldChangeLog], backend: LabServer
) -> None:
    """A deferred constraint fails at COMMIT: the client gets the error, the record is aborted, never replayed."""
    proxy, capture, changelog = held
    changelog.release.set()
    backend.psql(
        "drop table if exists dur_child; create table dur_child (id int primary key, "
        "parent int references dur (id) deferrable initially deferred)"
    )
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("insert into dur_child values (1, 42)")  # autocommit: pgleap's wrapped COMMIT fails
        with pytest.raises(psycopg.errors.ForeignKeyViolation), conn.transaction():
            conn.execute("insert into dur_child values (2, 42)")
        conn.execute("insert into dur_child values (3, null)")
    out = subprocess.run(
        [tool("psql"), proxy.dsn(), "-X", "-c", "insert into dur_child values (4, 42)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    direct = subprocess.run(
        [tool("psql"), backend.dsn(), "-X", "-c", "insert into dur_child values (4, 42)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.stdout, out.returncode) == (direct.stdout, direct.returncode)  # no "INSERT 0 1" before the error
    assert "violates foreign key constraint" in out.stderr
    proxy.call(capture.drain())
    records = changelog.read_committed("app", 0, 10)
    assert [[s.sql for s in r.transaction.statements] for r in records] == [["insert into dur_child values (3, null)"]]
    assert changelog.stats().aborted == 3 and changelog.pending() == []
