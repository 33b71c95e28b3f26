"""Automatic rollback after cutover ([auto_upgrade.cutover] rollback_error_rate): the window's arithmetic, and a
real cutover whose clients fail on the target only, rolled back by pgleap itself, losing nothing.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgleap.config import CutoverConfig, ServerConfig, UpgradeConfig
from pgleap.lab import LabServer
from pgleap.proxy.route import Database
from pgleap.store.state import StateStore
from pgleap.testing import ProxyProcess
from pgleap.upgrade import machine as machine_module
from pgleap.upgrade.autorollback import ErrorWindow, RollbackPolicy, Sample, WindowRate
from pgleap.upgrade.copy.compare import database_differences
from pgleap.upgrade.machine import UpgradeMachine
from pgleap.upgrade.phases import Phase
from pgleap.upgrade.switch import SwitchReport

from conftest import console as open_console
from conftest import pgbench_database, server_config, show, wait_for


def test_window_covers_the_last_seconds_only() -> None:
    """The rate is taken between the oldest sample of the last `window` seconds and the newest."""
    window = ErrorWindow()
    assert window.add(Sample(100.0, 1000, 0), 10) == WindowRate(0.0, 0, 0)  # the first sample is the base
    assert window.add(Sample(105.0, 1100, 50), 10) == WindowRate(5.0, 100, 50)  # not full yet: what there is
    assert window.add(Sample(110.0, 1200, 50), 10) == WindowRate(10.0, 200, 50)
    # 100 and 105 are now older than the window: the 50 errors made between them no longer count.
    assert window.add(Sample(115.5, 1300, 60), 10) == WindowRate(5.5, 100, 10)
    assert window.add(Sample(130.0, 1310, 60), 10) == WindowRate(0.0, 0, 0)  # everything else is too old


def test_window_starts_over_when_the_counters_go_back() -> None:
    """Counters replaced (smaller than the last sample) start a new window instead of a negative rate."""
    window = ErrorWindow()
    window.add(Sample(0.0, 500, 20), 60)
    assert window.add(Sample(1.0, 10, 1), 60) == WindowRate(0.0, 0, 0)
    assert window.add(Sample(2.0, 30, 11), 60) == WindowRate(1.0, 20, 10)


def test_policy_needs_the_rate_above_the_threshold_and_enough_queries() -> None:
    """Strictly above the threshold, with at least min_queries; off at 0; the reason names the figures."""
    policy = RollbackPolicy.from_config(
        CutoverConfig(rollback_error_rate=0.1, rollback_window=30, rollback_min_queries=100)
    )
    assert policy.enabled and policy.window == 30
    assert policy.triggered(WindowRate(5.0, 100, 11))
    assert not policy.triggered(WindowRate(5.0, 100, 10))  # exactly at the threshold: not above it
    assert not policy.triggered(WindowRate(5.0, 99, 99))  # too few queries to judge
    assert not policy.triggered(WindowRate(0.0, 0, 0))
    off = RollbackPolicy.from_config(CutoverConfig())
    assert not off.enabled and not off.triggered(WindowRate(5.0, 1000, 1000))
    assert off.describe(WindowRate(5.0, 1000, 1000)) == "automatic rollback off"
    assert policy.reason(WindowRate(4.5, 200, 50)) == (
        "automatic rollback: error rate 25.00% over 4.5s after cutover > threshold 10.00% (50 errors in 200 queries)"
    )
    # rollback_min_queries = 0 still needs a query: no rate is judged from nothing.
    eager = RollbackPolicy(0.5, 10, 0)
    assert not eager.triggered(WindowRate(1.0, 0, 0)) and eager.triggered(WindowRate(1.0, 1, 1))


class _Replay:
    """Replay as the machine sees it: every direction running, no report."""

    def running(self, _name: str) -> bool:
        return True

    def report(self, _name: str) -> None:
        return None


class _Verifier:
    async def verify(self, _name: str) -> None:
        await asyncio.sleep(0)

    def last_reports(self) -> dict[Any, Any]:
        return {}


class _Proxy:
    """The few things of a Proxy the machine touches while cut over and mirroring."""

    def __init__(self, upgrade: UpgradeConfig) -> None:
        self.databases = {upgrade.database: Database.from_config(upgrade)}
        self.replay = _Replay()
        self._verifier = _Verifier()

    def verifier(self) -> _Verifier:
        return self._verifier

    def read_shift_changed(self, _name: str) -> None:
        pass


def test_automatic_and_operator_rollback_do_not_both_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Errors past the threshold while cut over: the machine switches back by itself, once. A ROLLBACK UPGRADE
    sent while that switch runs waits for it and says it is done; it does not abandon the upgrade."""
    server = ServerConfig("127.0.0.1", 1, "app", "u")
    cutover = CutoverConfig(rollback_error_rate=0.1, rollback_window=5, rollback_min_queries=10)
    upgrade = UpgradeConfig("app", server, target=server, cutover=cutover)
    proxy = _Proxy(upgrade)
    store = StateStore(tmp_path / "state.db")
    for phase in ("initializing", "copying", "catching_up", "mirroring", "cutover_ready", "cut_over"):
        store.set_phase("app", phase, "test")
    switching = asyncio.Event()
    release = asyncio.Event()
    switches: list[str] = []

    async def fake_switch(_proxy: Any, name: str, to: str, _timeout: float) -> SwitchReport:
        switches.append(to)
        switching.set()
        await release.wait()
        return SwitchReport(name, to, 0.01, 0.0, 0.0, 0.0, 0, "1:1:")  # type: ignore[arg-type]

    monkeypatch.setattr(machine_module, "switch", fake_switch)

    async def scenario() -> tuple[str, str | None]:
        machine = UpgradeMachine(proxy, "app", store)  # type: ignore[arg-type]
        assert machine.start() == "database app: upgrade resuming in phase cut_over"
        await asyncio.sleep(0.1)  # the watch takes its first sample
        stats = proxy.databases["app"].stats
        stats.queries, stats.errors = 100, 5  # 5%: under the threshold
        await asyncio.sleep(1.2)
        assert not switches and machine.phase is Phase.CUT_OVER
        assert "error rate 5.00%" in machine.activity
        stats.queries, stats.errors = 200, 60  # 30% since the watch began (its first sample: 0 and 0)
        await asyncio.wait_for(switching.wait(), 5)
        operator = asyncio.ensure_future(machine.rollback("ROLLBACK UPGRADE"))
        await asyncio.sleep(0.2)
        assert not operator.done()  # it waits for the automatic switch
        release.set()
        note = await asyncio.wait_for(operator, 5)
        record = store.phase("app")
        await machine.stop()
        return note, record.reason if record else None

    note, reason = asyncio.run(scenario())
    store.close()
    assert switches == ["source"]
    assert note.startswith("database app: already back on the source (automatic rollback: error rate "), note
    assert reason is not None and reason.startswith("automatic rollback: error rate 30.00% over "), reason
    assert "(60 errors in 200 queries): clients back on the source after a 0.010s pause" in reason, reason


VALIDATION = '[auto_upgrade.validation]\nvalidation_duration = "2s"\ncompare_results = false'
SYNC = "[auto_upgrade.sync]\nparallel_workers = 2"
CUTOVER = '[auto_upgrade.cutover]\nrollback_error_rate = 0.1\nrollback_window = "5s"\nrollback_min_queries = 50'
LEDGER = "CREATE TABLE ledger (worker int, n int, port int, PRIMARY KEY (worker, n))"
# abstime was removed in PG 12: the PG 10 source answers, the PG 18 target says the type does not exist.
OLD_ONLY = "SELECT now()::abstime"


@pytest.fixture
def source_db(pg_old: LabServer) -> Iterator[str]:
    """A PG 10 database with pgbench's tables at scale 1 and a ledger of the writers' rows."""
    yield from pgbench_database(pg_old, "ar", 1, LEDGER)


class Clients:
    """Threads through pgleap until stopped: writers add ledger rows (noted once committed), readers run a
    query only the old major accepts (counting answers and errors)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop = threading.Event()
        self.acked: list[tuple[int, int]] = []
        self.answers = 0
        self.errors: list[str] = []
        self.unexpected: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def start(self, role: str, count: int) -> None:
        """Start `count` more writers or readers."""
        for _ in range(count):
            worker = len(self._threads) + 1
            run = self._write if role == "writer" else self._read
            self._threads.append(threading.Thread(target=self._guard, args=(run, worker)))
            self._threads[-1].start()

    def join(self) -> None:
        """Stop every thread and wait for it."""
        self.stop.set()
        for thread in self._threads:
            thread.join(60)

    def _guard(self, run: Any, worker: int) -> None:
        try:
            run(worker)
        except BaseException as exc:
            self.unexpected.append(exc)

    def _write(self, worker: int) -> None:
        with psycopg.connect(self.dsn) as conn:
            n = 0
            while not self.stop.is_set():
                n += 1
                # The port of the server running the transaction, as a value: a statement prepared before the
                # cutover is replayed as a statement (no row image), and would read the other server's port.
                row = conn.execute("SELECT current_setting('port')::int").fetchone()
                assert row is not None
                conn.execute("INSERT INTO ledger VALUES (%s, %s, %s)", (worker, n, row[0]))
                conn.commit()
                self.acked.append((worker, n))
                time.sleep(0.005)

    def _read(self, _worker: int) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                try:
                    conn.execute(OLD_ONLY).fetchall()
                    self.answers += 1
                except psycopg.errors.UndefinedObject as exc:
                    self.errors.append(str(exc))
                time.sleep(0.005)


@pytest.mark.integration
def test_error_rate_after_cutover_rolls_back_by_itself(
    tmp_path: Path, pg_old: LabServer, source_db: str, target: LabServer
) -> None:
    """Cut over with writers only: the rate stays 0 and nothing happens. Readers of a type PG 18 no longer has
    start failing on the target: past rollback_error_rate over rollback_window, pgleap rolls back by itself,
    with the rate in the transition's reason; the readers are answered by the source again, and every write,
    those made on the target included, is on the source and equal on both sides."""
    source, target_config = server_config(pg_old, source_db), server_config(target, source_db)
    extra = f'state_path = "{tmp_path / "state.db"}"\nchangelog_path = "{tmp_path / "changes.db"}"'
    pgleap = ProxyProcess(
        tmp_path,
        {"app": source},
        extra=extra,
        targets={"app": target_config},
        upgrade_extra=f"{VALIDATION}\n{SYNC}\n{CUTOVER}",
    )
    clients = Clients(pgleap.dsn())
    try:
        pgleap.wait_accepting()
        with open_console(pgleap) as console:
            console.execute("START UPGRADE")
            wait_for(lambda: show(console, "SHOW UPGRADE STATUS")[0]["phase"] == "cutover_ready", "ready", 180)
            clients.start("writer", 2)
            time.sleep(1)
            console.execute("INITIATE CUTOVER")
            time.sleep(3)
            (status,) = show(console, "SHOW UPGRADE STATUS")
            assert status["phase"] == "cut_over" and status["routed_to"] == "target", status
            assert "error rate 0.00%" in status["activity"], status  # the watch runs, and sees no error
            clients.start("reader", 3)
            wait_for(
                lambda: show(console, "SHOW UPGRADE STATUS")[0]["phase"] == "mirroring", "the automatic rollback", 30
            )
            (status,) = show(console, "SHOW UPGRADE STATUS")
            assert status["routed_to"] == "source", status
            reason = status["phase_reason"]
            match = re.fullmatch(
                r"automatic rollback: error rate ([\d.]+)% over ([\d.]+)s after cutover > threshold 10\.00% "
                r"\((\d+) errors in (\d+) queries\): clients back on the source after a ([\d.]+)s pause",
                reason,
            )
            assert match is not None, reason
            rate, seconds, errors, queries, pause = match.groups()
            assert float(rate) > 10 and float(seconds) <= 5 and int(queries) >= 50 and int(errors) > 0, reason
            assert float(pause) < 1.0, reason
            moves = [(h["from_phase"], h["to_phase"], h["reason"]) for h in show(console, "SHOW UPGRADE HISTORY")]
            assert moves[-2][:2] == ("cutover_ready", "cut_over") and moves[-1] == ("cut_over", "mirroring", reason)
            # Back on the source: the readers are answered again.
            answered, failed = clients.answers, len(clients.errors)
            wait_for(lambda: clients.answers > answered + 50, "answers from the source", 30)
            assert len(clients.errors) == failed, clients.errors[failed:][:3]
            assert failed > 0 and all('type "abstime" does not exist' in e for e in clients.errors), clients.errors[:3]
            with psycopg.connect(pgleap.dsn(), autocommit=True) as app:
                assert app.execute("SELECT current_setting('port')").fetchone() == (str(pg_old.port),)
            time.sleep(1)
            clients.join()
            assert not clients.unexpected, clients.unexpected
            wait_for(lambda: show(console, "SHOW CAPTURE")[0]["log_pending"] == "0", "nothing pending", 60)
            wait_for(lambda: show(console, "SHOW REPLAY")[0]["lag_transactions"] == "0", "lag 0", 120)
    finally:
        clients.join()
        pgleap.stop()
    rows = pg_old.psql("SELECT worker, n, port FROM ledger", dbname=source_db)
    written = {(int(w), int(n)): int(port) for w, n, port in (line.split("|") for line in rows.splitlines() if line)}
    missing = set(clients.acked) - set(written)
    assert not missing, f"{len(missing)} committed writes missing on the source, e.g. {sorted(missing)[:5]}"
    assert sum(1 for port in written.values() if port == target.port) > 0, "no write was made on the target"
    problems = asyncio.run(database_differences(source, target_config))
    assert not problems, "\n".join(problems)
