"""Result comparison of sampled reads: the same query on the target at the same point of the change stream.

A sampled read's result is hashed on the source as it streams to the client (sampling.py). When its
answer is complete, the validator asks the database's Replayer for a `LogPoint` at the last log id
prepared by then (replay/point.py): replay applies exactly the records prepared up to that instant and
runs the query on the target there, inside its own transaction and a savepoint that is always rolled
back, then goes on. The outcome is classified and grouped by query fingerprint.

Which transactions the source's statement saw: those whose COMMIT was answered before the query was
forwarded (their records had settled: log id at or below `low_log_id`) certainly; those prepared after
its answer was complete (above `high_log_id`) certainly not; those in between are ambiguous. The point
applies the ambiguous ones too; a difference found while one of them wrote a table the query reads is
counted `inconclusive`, never as a mismatch.

Shadow work never slows or fails a client (I5): at most `queue_size` samples wait for their point; more
are dropped and counted; a sample with more than `max_rows` rows stops hashing and is dropped.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pgleap.config import UpgradeConfig
from pgleap.protocol import codes
from pgleap.protocol.messages import cstr, message, parse_error
from pgleap.store.changelog import ChangeLog
from pgleap.store.records import CapturedCheck, LoggedTransaction
from pgleap.upgrade.replay.errors import ErrorKind, TransientApplyError, classify_sqlstate, is_transient
from pgleap.upgrade.replay.journal import EVERY_TABLE
from pgleap.upgrade.replay.point import PointMissedError, log_point
from pgleap.upgrade.replay.snapshot import parse_snapshot
from pgleap.upgrade.replay.wire import Pipeline, Slot, TargetSession
from pgleap.upgrade.verify.fingerprint import analyse
from pgleap.upgrade.verify.resultcompare import (
    Column,
    Digest,
    ResultHasher,
    compare_digests,
    parse_row_description,
)
from pgleap.upgrade.verify.sampling import PRINT_SETTINGS, Sampler, SourceSample

log = logging.getLogger(__name__)

QUEUE_SIZE = 64
MAX_ROWS = 10_000
COMPARE_TIMEOUT = 5.0  # seconds the target query may run (replay waits meanwhile)
POINT_WAIT = 30.0  # seconds a sample waits for replay to reach its point
WINDOW_SECONDS = 300.0
RECHECKS_WAITING = 32  # differing samples waiting for an exact re-check; more keep their first verdict
HOLD_WAIT = 30.0  # seconds a re-check waits for replay to hold
# A check of a transaction replayed later than this after its COMMIT is dropped (counted): replay is behind,
# and each check adds its read (up to compare_timeout) to replay's time.
CHECK_MAX_LAG = 10.0
_FAILURES_KEPT = 256
_MAX_FINGERPRINTS = 10_000
_SAVEPOINT = "pgleap_sample"
_CONDITIONS = {
    "0A000": "feature_not_supported",
    "42883": "undefined_function",
    "42P01": "undefined_table",
    "42703": "undefined_column",
    "42704": "undefined_object",
    "42725": "ambiguous_function",
    "42804": "datatype_mismatch",
    "42846": "cannot_coerce",
    "42P18": "indeterminate_datatype",
}
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class Classification(enum.StrEnum):
    """The outcome of one compared read."""

    MATCH = "match"
    DATA_MISMATCH = "data_mismatch"
    SYNTAX_ERROR = "syntax_error"
    FEATURE_INCOMPATIBILITY = "feature_incompatibility"
    TIMEOUT = "timeout"
    TARGET_ERROR = "target_error"
    INCONCLUSIVE = "inconclusive"  # differed while an ambiguous transaction wrote a table it reads


@dataclass(frozen=True)
class Outcome:
    """What the target's run of a sampled read gave, against the source's."""

    classification: Classification
    detail: str
    target_seconds: float
    feature: str | None = None  # for incompatibilities: the SQLSTATE's condition name
    sqlstate: str | None = None


@dataclass(frozen=True)
class ValidationMetrics:
    """Counters of result comparison (one database, or all)."""

    total: int  # reads compared to a conclusion (inconclusive ones are not counted)
    matching: int
    data_mismatches: int
    syntax_errors: int
    feature_incompatibilities: dict[str, int]  # by feature (SQLSTATE condition name)
    timeouts: int
    target_errors: int
    dropped: int  # samples given up because comparison fell behind (queue full, too many rows)
    error_rate_window: float  # errors / compared over the last window_seconds (0 when none compared)
    window_seconds: float
    inconclusive: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # samples not compared, by reason
    source_seconds: float = 0.0  # summed latency of the compared reads on the source
    target_seconds: float = 0.0  # and on the target
    overturned: int = 0  # first comparisons that differed but matched when re-checked at one source snapshot


@dataclass(frozen=True)
class FailureRecord:
    """A fingerprint's latest failed comparison of one kind."""

    fingerprint: str
    example: str
    classification: str
    detail: str
    last_seen: float  # epoch seconds
    count: int = 1


@dataclass
class QueryStats:
    """Per fingerprint: one example text, counts by classification, first and last seen, latency both sides."""

    fingerprint: str
    example: str
    first_seen: float
    last_seen: float
    counts: dict[str, int] = field(default_factory=dict)
    source_seconds: float = 0.0
    target_seconds: float = 0.0
    last_detail: str = ""

    @property
    def compared(self) -> int:
        """Comparisons that reached a conclusion."""
        return sum(n for c, n in self.counts.items() if c != Classification.INCONCLUSIVE)

    @property
    def mismatches(self) -> int:
        """Comparisons that did not match (inconclusive ones aside)."""
        return self.compared - self.counts.get(Classification.MATCH, 0)


class _Histogram:
    """Cumulative latency buckets, for Prometheus."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out


@dataclass
class _DatabaseCounters:
    counts: dict[str, int] = field(default_factory=dict)
    features: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    overturned: int = 0
    window: deque[tuple[float, bool]] = field(default_factory=deque)
    source_latency: _Histogram = field(default_factory=_Histogram)
    target_latency: _Histogram = field(default_factory=_Histogram)


ReplayerLookup = Callable[[str], Any]  # database -> its running Replayer, or None


class ResultValidator:
    """Samples reads, compares them on the target at their point, and keeps the counts (proxy.validator)."""

    def __init__(
        self,
        upgrades: Iterable[UpgradeConfig],
        replayer: ReplayerLookup,
        changelog: Callable[[], ChangeLog | None],
        *,
        window_seconds: float = WINDOW_SECONDS,
    ) -> None:
        self._replayer = replayer
        self._changelog = changelog
        self.window_seconds = window_seconds
        self.samplers: dict[str, Sampler] = {}
        self._upgrades: dict[str, UpgradeConfig] = {}
        self._options: dict[str, tuple[int, int, float]] = {}
        self.configure(upgrades)
        self._lock = threading.Lock()  # the metrics thread reads what the loop writes
        self._counters: dict[str, _DatabaseCounters] = {}
        self._queries: dict[str, QueryStats] = {}
        self._failures: dict[tuple[str, str], FailureRecord] = {}
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._recheck_lock = asyncio.Lock()
        self._rechecking = 0

    def configure(self, upgrades: Iterable[UpgradeConfig]) -> None:
        """(Re)read each database's `validation` settings."""
        for upgrade in upgrades:
            self._upgrades[upgrade.database] = upgrade
            v = upgrade.validation
            rate = v.sample_rate if v.compare_results and upgrade.target is not None else 0.0
            old = self.samplers.get(upgrade.database)
            if old is None or old.rate != rate:
                self.samplers[upgrade.database] = Sampler(rate)
            self._options[upgrade.database] = (v.sample_queue_size, v.sample_max_rows, v.compare_timeout)

    # -- the capture path's side (cheap unless sampled) -------------------------------------

    def active(self, database: str) -> bool:
        """Whether reads of `database` may be sampled at all."""
        sampler = self.samplers.get(database)
        return sampler is not None and sampler.rate > 0

    def begin(
        self, database: str, sql: str, parameters: dict[str, str], *, in_transaction: bool = False
    ) -> SourceSample | None:
        """A SourceSample for this read when it is sampled, else None (one countdown step).

        `in_transaction`: the read runs inside a transaction block; its check goes into that transaction's
        change-log record (`finish_check`) and is compared while the transaction is replayed.
        """
        sampler = self.samplers.get(database)
        if sampler is None or not sampler.take():
            return None
        changelog = self._changelog()
        replayer = self._replayer(database)
        if changelog is None or replayer is None:
            self._skip(database, "replay_not_running")
            return None
        queue_size, max_rows, _ = self._options.get(database, (QUEUE_SIZE, MAX_ROWS, COMPARE_TIMEOUT))
        if in_transaction:
            # Checks wait in the change log, not in the queue; replay runs them (and bounds them: run_check).
            if getattr(replayer, "check_runner", self) is None:
                replayer.check_runner = self
        elif self._in_flight >= queue_size:
            self._drop(database)
            return None
        try:
            low = changelog.settled_through()
        except Exception as exc:  # the log's own health is reported elsewhere; never fail the client for this
            log.debug("result comparison: change log unreadable (%s); sample skipped", exc)
            self._skip(database, "changelog_unreadable")
            return None
        settings = {name: parameters[name] for name in PRINT_SETTINGS if name in parameters}
        return SourceSample(database, sql, analyse(sql), settings, low, max_rows, in_transaction=in_transaction)

    def finish_check(self, sample: SourceSample, before: int) -> CapturedCheck | None:
        """The source's answer to a read inside a transaction is complete: its check entry, or None (counted)."""
        if sample.failed:
            self._skip(sample.database, "source_error")
            return None
        if sample.abandoned == "too_many_rows":
            self._drop(sample.database)
            return None
        if sample.abandoned is not None or not sample.described:
            self._skip(sample.database, sample.abandoned or "no_rows_returned")
            return None
        sample.ended = time.monotonic()
        return sample.check(before)

    def skip(self, database: str, reason: str) -> None:
        """Count a sample not compared, by reason (the capture path: a check whose transaction rolled back)."""
        self._skip(database, reason)

    def drop(self, database: str) -> None:
        """Count a sample given up to stay within bounds."""
        self._drop(database)

    # -- replay's side: the checks recorded inside transactions (replay/applier.py) --------------------

    def run_check(self, database: str, record: LoggedTransaction, check: CapturedCheck) -> _CheckRun | None:
        """A run for a check of the transaction replay is applying; None to leave it out (counted)."""
        sampler = self.samplers.get(database)
        if sampler is None or sampler.rate <= 0:
            self._skip(database, "comparison_off")
            return None
        if time.time() - record.transaction.captured_at > CHECK_MAX_LAG:
            # Each check adds its read to replay's time: a replay that is behind catches up first.
            self._drop(database)
            return None
        _, max_rows, timeout = self._options.get(database, (QUEUE_SIZE, MAX_ROWS, COMPARE_TIMEOUT))
        return _CheckRun(self, database, record, check, max_rows, timeout)

    def finish(self, sample: SourceSample) -> None:
        """The source's answer is complete: queue the target side at the sample's point (never blocks)."""
        if sample.failed or sample.wrote:
            self._skip(sample.database, "source_error" if sample.failed else "wrote")
            return
        if sample.abandoned == "too_many_rows":
            self._drop(sample.database)  # hashing more would cost the client's own forwarding time
            return
        if sample.abandoned is not None or not sample.described:
            self._skip(sample.database, sample.abandoned or "no_rows_returned")
            return
        replayer = self._replayer(sample.database)
        changelog = self._changelog()
        if replayer is None or changelog is None:
            self._skip(sample.database, "replay_not_running")
            return
        queue_size, _, timeout = self._options.get(sample.database, (QUEUE_SIZE, MAX_ROWS, COMPARE_TIMEOUT))
        if sample.in_transaction and self._in_flight >= queue_size:
            # A read of a transaction that logged nothing, handed over at its end: the queue bounds it too.
            self._drop(sample.database)
            return
        try:
            sample.complete(changelog.last_log_id())
        except Exception:
            self._skip(sample.database, "changelog_unreadable")
            return
        # Queued now, in the loop, before replay can apply anything prepared after this instant.
        request = replayer.request_point(_TargetRun(sample, replayer, changelog, timeout), timeout=POINT_WAIT)
        request.fix_at(log_point(sample.high_log_id))
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._await(sample, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _await(self, sample: SourceSample, request: Any) -> None:
        _, _, timeout = self._options.get(sample.database, (QUEUE_SIZE, MAX_ROWS, COMPARE_TIMEOUT))
        try:
            # Bounded even if replay stops with the request still queued (nothing would answer it then).
            outcome: Outcome = await asyncio.wait_for(request.wait(), POINT_WAIT + timeout + 5)
        except (PointMissedError, TimeoutError) as exc:
            request.cancel()
            log.debug("result comparison of %r skipped: %s", sample.sql[:80], exc)
            self._skip(sample.database, "point_missed")
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("result comparison of %r failed: %s", sample.sql[:80], exc)
            self._skip(sample.database, "comparison_failed")
            return
        finally:
            self._in_flight -= 1
        if outcome.classification is Classification.DATA_MISMATCH:
            # Inconclusive ones are not re-checked: under a busy workload they are common, and each re-check
            # holds replay for a source snapshot, which moves it past the points of the samples queued behind.
            outcome = await self._recheck(sample, outcome)
        self.record(sample, outcome)

    async def _recheck(self, sample: SourceSample, outcome: Outcome) -> Outcome:
        """Run a differing read again on both sides at one source snapshot (verify/aligned.py's way); exact.

        The first comparison places the source's statement from the proxy's view, which leaves room for
        doubt; a difference is only reported once the query, re-run on the source at a REPEATABLE READ
        snapshot and on the target at exactly that snapshot, still differs.
        """
        if self._rechecking >= RECHECKS_WAITING:
            return _unconfirmed(outcome, "too many re-checks waiting")
        self._rechecking += 1
        try:
            async with self._recheck_lock:
                return await self._recheck_now(sample, outcome)
        except Exception as exc:  # the source or target refused pgleap's own statements, or the point was missed
            log.info("result comparison: re-check of %r not possible (%s)", sample.sql[:80], exc)
            return _unconfirmed(outcome, str(exc))
        finally:
            self._rechecking -= 1

    async def _recheck_now(self, sample: SourceSample, outcome: Outcome) -> Outcome:
        replayer = self._replayer(sample.database)
        changelog = self._changelog()
        upgrade = self._upgrades.get(sample.database)
        if replayer is None or changelog is None or upgrade is None:
            return _unconfirmed(outcome, "replay is not running")
        _, _, timeout = self._options.get(sample.database, (QUEUE_SIZE, MAX_ROWS, COMPARE_TIMEOUT))
        session = await TargetSession.open(upgrade.source)  # pgleap's own wire connection, to the source
        try:

            async def on_target(target: TargetSession) -> tuple[Digest | None, Any, float]:
                return await target_read(target, sample, timeout)

            request = replayer.request_point(on_target)
            try:
                # Inside the try: a re-check cancelled while waiting must not leave replay holding for it.
                await request.wait_held(HOLD_WAIT)
                await session.query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                (snapshot_text,) = (await session.query("SELECT txid_current_snapshot()::text"))[0]
                assert snapshot_text is not None
                # Read after the snapshot: every COMMIT forwarded before it was taken is at or below this id.
                request.fix(parse_snapshot(snapshot_text), changelog.last_log_id())
                source, source_error, _ = await source_read(session, sample, timeout)
                await session.query("ROLLBACK")
            except BaseException:
                request.cancel()
                raise
            try:
                target, target_error, seconds = await request.wait()
            except asyncio.CancelledError:
                request.cancel()
                raise
        finally:
            session.close()
        if target_error is not None:
            return _error_outcome(target_error, seconds)
        if source_error is not None or source is None or target is None:
            return _unconfirmed(outcome, "the source refused it when run again")
        differs = compare_digests(source, target, sample.shape.values_comparable)
        if differs is None:
            with self._lock:
                self._db(sample.database).overturned += 1
            return Outcome(Classification.MATCH, "matched when run again at one source snapshot", seconds)
        return Outcome(Classification.DATA_MISMATCH, f"{differs} (also at one source snapshot)", seconds)

    # -- counting -----------------------------------------------------------------------------

    def _db(self, database: str) -> _DatabaseCounters:
        counters = self._counters.get(database)
        if counters is None:
            counters = self._counters[database] = _DatabaseCounters()
        return counters

    def _skip(self, database: str, reason: str) -> None:
        with self._lock:
            skipped = self._db(database).skipped
            skipped[reason] = skipped.get(reason, 0) + 1

    def _drop(self, database: str) -> None:
        with self._lock:
            self._db(database).dropped += 1

    def record(self, sample: SourceSample, outcome: Outcome) -> None:
        """Count one compared read under its fingerprint."""
        now = time.time()
        key = outcome.classification.value
        fp = sample.shape.fingerprint
        with self._lock:
            db = self._db(sample.database)
            db.counts[key] = db.counts.get(key, 0) + 1
            if outcome.feature is not None:
                db.features[outcome.feature] = db.features.get(outcome.feature, 0) + 1
            if outcome.classification is not Classification.INCONCLUSIVE:
                failed = outcome.classification not in (Classification.MATCH, Classification.TIMEOUT)
                db.window.append((now, failed))
                db.source_latency.observe(sample.source_seconds)
                db.target_latency.observe(outcome.target_seconds)
            stats = self._queries.get(fp)
            if stats is None and len(self._queries) < _MAX_FINGERPRINTS:
                stats = self._queries[fp] = QueryStats(fp, sample.sql, sample.seen_at, now)
            if stats is not None:
                stats.counts[key] = stats.counts.get(key, 0) + 1
                stats.last_seen = now
                stats.source_seconds += sample.source_seconds
                stats.target_seconds += outcome.target_seconds
                if outcome.classification is not Classification.MATCH:
                    stats.last_detail = outcome.detail
            if outcome.classification is not Classification.MATCH:
                old = self._failures.get((fp, key))
                count = old.count + 1 if old is not None else 1
                self._failures[(fp, key)] = FailureRecord(fp, sample.sql, key, outcome.detail, now, count)
                if len(self._failures) > _FAILURES_KEPT:
                    oldest = min(self._failures, key=lambda k: self._failures[k].last_seen)
                    del self._failures[oldest]
        if outcome.classification is not Classification.MATCH:
            log.info("result comparison: %s for %r: %s", key, sample.sql[:120], outcome.detail)

    # -- reading (SHOW UPGRADE STATUS / ERRORS / QUERIES, metrics) ------------------------------

    def metrics(self, database: str | None = None) -> ValidationMetrics:
        """The counters of one database, or of all together."""
        now = time.time()
        counts: dict[str, int] = {}
        features: dict[str, int] = {}
        skipped: dict[str, int] = {}
        dropped = compared = errors = overturned = 0
        source = target = 0.0
        with self._lock:
            for name, db in self._counters.items():
                if database is not None and name != database:
                    continue
                while db.window and db.window[0][0] < now - self.window_seconds:
                    db.window.popleft()
                compared += len(db.window)
                errors += sum(1 for _, failed in db.window if failed)
                for target_dict, source_dict in ((counts, db.counts), (features, db.features), (skipped, db.skipped)):
                    for k, n in source_dict.items():
                        target_dict[k] = target_dict.get(k, 0) + n
                dropped += db.dropped
                overturned += db.overturned
                source += db.source_latency.total
                target += db.target_latency.total
        c = Classification
        total = sum(n for k, n in counts.items() if k != c.INCONCLUSIVE)
        return ValidationMetrics(
            total=total,
            matching=counts.get(c.MATCH, 0),
            data_mismatches=counts.get(c.DATA_MISMATCH, 0),
            syntax_errors=counts.get(c.SYNTAX_ERROR, 0),
            feature_incompatibilities=features,
            timeouts=counts.get(c.TIMEOUT, 0),
            target_errors=counts.get(c.TARGET_ERROR, 0),
            dropped=dropped,
            error_rate_window=errors / compared if compared else 0.0,
            window_seconds=self.window_seconds,
            inconclusive=counts.get(c.INCONCLUSIVE, 0),
            skipped=skipped,
            source_seconds=source,
            target_seconds=target,
            overturned=overturned,
        )

    def recent_failures(self, limit: int = 50) -> list[FailureRecord]:
        """The latest failed comparison per fingerprint and kind, newest first."""
        with self._lock:
            records = sorted(self._failures.values(), key=lambda r: r.last_seen, reverse=True)
        return records[:limit]

    def queries(self) -> list[QueryStats]:
        """Every fingerprint seen, most mismatches first (then most compared)."""
        with self._lock:
            stats = [
                QueryStats(
                    q.fingerprint,
                    q.example,
                    q.first_seen,
                    q.last_seen,
                    dict(q.counts),
                    q.source_seconds,
                    q.target_seconds,
                    q.last_detail,
                )
                for q in self._queries.values()
            ]
        return sorted(stats, key=lambda q: (-q.mismatches, -q.compared, q.fingerprint))

    def latency(self, database: str) -> tuple[list[tuple[str, float]], float, list[tuple[str, float]], float]:
        """(source buckets, source sum, target buckets, target sum) of one database's compared reads."""
        with self._lock:
            db = self._db(database)
            return (
                db.source_latency.cumulative(),
                db.source_latency.total,
                db.target_latency.cumulative(),
                db.target_latency.total,
            )

    def databases(self) -> list[str]:
        """Databases with any counter."""
        with self._lock:
            return sorted(self._counters)

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no sample waits for its point (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))


class _CheckRun:
    """A check of a transaction being replayed: its target rows hashed as they come, then judged and counted."""

    def __init__(
        self,
        validator: ResultValidator,
        database: str,
        record: LoggedTransaction,
        check: CapturedCheck,
        max_rows: int,
        timeout: float,
    ) -> None:
        self.validator = validator
        self.database = database
        self.record = record
        self.check = check
        self.shape = analyse(check.sql)
        self.source = Digest(
            tuple(Column(name, oid) for name, oid in check.columns), check.rows, check.multiset, check.sequence
        )
        self.max_rows = max_rows
        timeout_ms = str(max(1, int(timeout * 1000)))
        self.settings = (*check.settings, ("statement_timeout", timeout_ms))
        self.hasher = ResultHasher(self.shape.order_keys if self.shape.values_comparable else None, self.source.columns)
        self.extra_rows = 0  # past max_rows the target's rows are counted, not hashed (the count differs anyway)

    def row(self, kind: int, body: bytes) -> None:
        """The target's RowDescription or a DataRow."""
        if kind == codes.ROW_DESCRIPTION:
            self.hasher.describe(parse_row_description(body))
        elif self.hasher.rows <= self.max_rows:
            self.hasher.data_row(body)
        else:
            self.extra_rows += 1

    def done(self, error: Any, seconds: float) -> None:
        """Classify the target's answer against the source's and count it."""
        if error is not None:
            outcome = _error_outcome(error, seconds)
        else:
            digest = self.hasher.digest()
            digest = Digest(digest.columns, digest.rows + self.extra_rows, digest.multiset, digest.sequence)
            differs = compare_digests(self.source, digest, self.shape.values_comparable)
            if differs is None:
                outcome = Outcome(Classification.MATCH, self.shape.why_shape_only or "", seconds)
            else:
                outcome = self._difference(differs, seconds)
        check = self.check
        sample = SourceSample(
            self.database,
            check.sql,
            self.shape,
            dict(check.settings),
            check.low_log_id,
            self.max_rows,
            started=0.0,
            seen_at=check.seen_at,
            ended=check.source_seconds,
            in_transaction=True,
        )
        self.validator.record(sample, outcome)

    def _difference(self, differs: str, seconds: float) -> Outcome:
        """A data_mismatch, or inconclusive when a transaction the read may not have seen wrote a table it reads.

        Replay placed the read after every transaction committed before its own: those whose records had
        settled before the read was forwarded (at or below `low_log_id`) it certainly saw; the ones settled
        later committed while the read ran or after, and it may not have.
        """
        changelog = self.validator._changelog()
        position = self.record.position
        if changelog is None or position is None:
            return Outcome(Classification.INCONCLUSIVE, f"{differs}; the change log is not readable", seconds)
        low = changelog.position_through(self.database, self.check.low_log_id) or 0
        touched = tables_written(changelog, self.database, low, position - 1, self.check.low_log_id)
        relations = set(self.shape.relations)
        if touched and (not relations or "?" in touched or touched & relations):
            written = ", ".join(sorted(touched & relations or touched))
            return Outcome(
                Classification.INCONCLUSIVE, f"{differs}; transactions committed while it ran wrote {written}", seconds
            )
        return Outcome(Classification.DATA_MISMATCH, f"{differs} (inside its replayed transaction)", seconds)


class _TargetRun:
    """The work run at the sample's point: the query in a savepoint, rolled back, compared with the source."""

    def __init__(self, sample: SourceSample, replayer: Any, changelog: ChangeLog, timeout: float) -> None:
        self.sample = sample
        self.replayer = replayer
        self.changelog = changelog
        self.timeout = timeout

    async def __call__(self, session: TargetSession) -> Outcome:
        sample = self.sample
        through = self.changelog.position_through(sample.database, sample.high_log_id)
        if through is None:
            raise PointMissedError("the sample's point is not settled")
        if self.replayer.position > through:
            # An earlier request (a re-check, a verification point) moved replay past this one. The target
            # still stands at the point for this read unless what was applied since wrote a table it reads.
            later = self._tables_written(through, self.replayer.position)
            if later and (not sample.shape.relations or "?" in later or later & set(sample.shape.relations)):
                raise PointMissedError("replay was already past the sample's point")
        digest, error, seconds = await target_read(session, sample, self.timeout)
        if error is not None:
            return _error_outcome(error, seconds)
        assert digest is not None
        differs = compare_digests(sample.digest(), digest, sample.shape.values_comparable)
        if differs is None:
            return Outcome(Classification.MATCH, sample.shape.why_shape_only or "", seconds)
        touched = self._ambiguous_tables(through)
        relations = set(sample.shape.relations)
        if touched and (not relations or "?" in touched or touched & relations):
            written = ", ".join(sorted(touched & relations or touched))
            detail = f"{differs}; transactions in flight while it ran wrote {written}"
            return Outcome(Classification.INCONCLUSIVE, detail, seconds)
        return Outcome(Classification.DATA_MISMATCH, differs, seconds)

    def _ambiguous_tables(self, through: int) -> set[str]:
        """Tables written by the transactions the source's statement may or may not have seen."""
        sample = self.sample
        low = self.changelog.position_through(sample.database, sample.low_log_id)
        return self._tables_written(low or 0, through, above_log_id=sample.low_log_id)

    def _tables_written(self, after: int, through: int, above_log_id: int = 0) -> set[str]:
        """Unqualified lower-case names of the tables written at positions (after, through]; "?" for unknown."""
        return tables_written(self.changelog, self.sample.database, after, through, above_log_id)


def tables_written(changelog: ChangeLog, database: str, after: int, through: int, above_log_id: int = 0) -> set[str]:
    """Unqualified lower-case names of the tables written at positions (after, through] by records above
    `above_log_id`; "?" for unknown."""
    from pgleap.upgrade.replay.applier import touched_tables

    names: set[str] = set()
    if through <= after:
        return names
    records = changelog.read_committed(database, after, through - after)
    if len(records) < through - after:
        names.add("?")  # truncated or not durable: unknown
    for record in records:
        if record.log_id > above_log_id:
            for table in touched_tables(record) or ("?",):
                names.add("?" if table == EVERY_TABLE else table.rsplit(".", 1)[-1].strip('"').lower())
    return names


async def target_read(session: TargetSession, sample: SourceSample, timeout: float) -> tuple[Digest | None, Any, float]:
    """Run the sampled read on the target inside a savepoint that is always rolled back; (digest, error, seconds)."""
    settings = [(name, value) for name, value in sample.settings.items()]
    settings.append(("statement_timeout", str(max(1, int(timeout * 1000)))))
    calls = ", ".join(f"set_config({_literal(n)}, {_literal(v)}, true)" for n, v in settings)
    # search_path back to the login's own: a replayed transaction's SET LOCAL may still be in force.
    calls += ", set_config('search_path', (SELECT reset_val FROM pg_settings WHERE name = 'search_path'), true)"
    await session.query(f"SAVEPOINT {_SAVEPOINT}")
    try:
        await session.query(f"SELECT {calls}")
        started = time.monotonic()
        digest, error = await _run_read(session, sample, sample.digest().columns)
        seconds = time.monotonic() - started
    finally:
        # Always rolled back: whatever the query did (a function that writes) never stays on the target.
        await session.query(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
        await session.query(f"RELEASE SAVEPOINT {_SAVEPOINT}")
    return digest, error, seconds


async def source_read(session: TargetSession, sample: SourceSample, timeout: float) -> tuple[Digest | None, Any, float]:
    """Run the sampled read again on the source, in the REPEATABLE READ transaction the caller opened."""
    settings = [(name, value) for name, value in sample.settings.items()]
    settings.append(("statement_timeout", str(max(1, int(timeout * 1000)))))
    await session.query("SELECT " + ", ".join(f"set_config({_literal(n)}, {_literal(v)}, true)" for n, v in settings))
    started = time.monotonic()
    digest, error = await _run_read(session, sample, None)
    return digest, error, time.monotonic() - started


def _read_messages(sample: SourceSample) -> bytes:
    """The sampled read as its client sent it: a simple Query, or Parse/Bind/Describe/Execute/Sync."""
    if sample.params is None:
        return message(codes.QUERY, cstr(sample.sql))
    pipeline = Pipeline()  # replay's own messages for a read: user type OIDs left to the server, results in text
    pipeline.read(sample.sql, sample.params, sample.param_formats, sample.param_types, Slot(sample.sql))
    pipeline.sync()
    return b"".join(pipeline.chunks)


async def _run_read(
    session: TargetSession, sample: SourceSample, reference: tuple[Any, ...] | None
) -> tuple[Digest | None, Any]:
    """Run the read as its client did; (the digest of its result, None) or (None, the ServerError)."""
    hasher = ResultHasher(sample.shape.order_keys if sample.shape.values_comparable else None, reference)
    error = None
    writer = session.conn.writer
    try:
        writer.write(_read_messages(sample))
        await writer.drain()
        while True:
            kind, body = await session.next_message()
            if kind == codes.DATA_ROW and error is None:
                hasher.data_row(body)
            elif kind == codes.ROW_DESCRIPTION:
                hasher.describe(parse_row_description(body))
            elif kind == codes.ERROR_RESPONSE:
                error = parse_error(body)
                if is_transient(error.sqlstate) or error.severity in ("FATAL", "PANIC"):
                    raise TransientApplyError(f"target: {error}")
            elif kind == codes.READY_FOR_QUERY:
                session.status = body[:1]
                break
    except (OSError, asyncio.IncompleteReadError, ConnectionError, struct.error) as exc:
        raise TransientApplyError(f"connection to the target lost: {exc}") from exc
    if error is not None:
        return None, error
    return hasher.digest(), None


def _unconfirmed(outcome: Outcome, why: str) -> Outcome:
    """A first difference the exact re-check could not confirm: never counted as a mismatch."""
    detail = f"{outcome.detail}; not confirmed at one source snapshot ({why})"
    return Outcome(Classification.INCONCLUSIVE, detail, outcome.target_seconds)


def _error_outcome(error: Any, seconds: float) -> Outcome:
    sqlstate = error.sqlstate
    detail = f"{sqlstate}: {error.message}"
    if sqlstate == "57014":
        return Outcome(Classification.TIMEOUT, detail, seconds, sqlstate=sqlstate)
    kind = classify_sqlstate(sqlstate)
    if kind is ErrorKind.SYNTAX:
        return Outcome(Classification.SYNTAX_ERROR, detail, seconds, sqlstate=sqlstate)
    if kind is ErrorKind.FEATURE_INCOMPATIBILITY:
        feature = _CONDITIONS.get(sqlstate, sqlstate)
        return Outcome(Classification.FEATURE_INCOMPATIBILITY, detail, seconds, feature, sqlstate)
    return Outcome(Classification.TARGET_ERROR, detail, seconds, sqlstate=sqlstate)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def replayer_lookup(proxy: Any) -> ReplayerLookup:
    """database -> the Replayer running for it in the proxy's replay service, or None."""

    def lookup(database: str) -> Any:
        service = proxy.replay
        if service is None:
            return None
        getter = getattr(service, "replayer", None)
        if getter is not None:
            return getter(database)
        run = service._runs.get(database)  # before ReplayService.replayer existed
        return run.replayer if run is not None and run.running else None

    return lookup
