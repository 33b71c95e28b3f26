"""Choosing which reads to compare, and taking the source's side of one as it streams to the client.

The capture path asks `Sampler.take()` for each eligible read: one decrement of a countdown drawn from a
geometric distribution (so that `sample_rate` holds on average without a random number per query). A
sampled read gets a `SourceSample`, which the forwarder feeds the RowDescription, DataRows and the end
of the answer; it hashes the rows (resultcompare.ResultHasher) and notes the two change-log instants
that bound which transactions the source's statement could have seen (see results.py).
"""

from __future__ import annotations

import math
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pgleap.store.records import CapturedCheck
from pgleap.upgrade.verify.fingerprint import ReadShape
from pgleap.upgrade.verify.resultcompare import Digest, ResultHasher, parse_row_description

_NEVER = 1 << 62
# The client's settings that change how values are printed: the target query runs under the same.
PRINT_SETTINGS = ("TimeZone", "DateStyle", "IntervalStyle")


class Sampler:
    """Says, cheaply, whether the next eligible read is compared."""

    def __init__(self, rate: float, rng: random.Random | None = None) -> None:
        self.rate = rate
        self._rng = rng or random.Random()
        self._countdown = self._gap()

    def _gap(self) -> int:
        if self.rate <= 0:
            return _NEVER
        if self.rate >= 1:
            return 1
        # Reads until the next sample: geometric, mean 1/rate.
        return int(math.log(1.0 - self._rng.random()) / math.log(1.0 - self.rate)) + 1

    def take(self) -> bool:
        """True for the reads to compare (on average `rate` of them)."""
        self._countdown -= 1
        if self._countdown > 0:
            return False
        self._countdown = self._gap()
        return True


@dataclass
class SourceSample:
    """One sampled read on the source: its text, its result's digest, and when it ran."""

    database: str
    sql: str
    shape: ReadShape
    settings: dict[str, str]  # PRINT_SETTINGS of the client's session
    low_log_id: int  # every record at or below it had settled before the query was forwarded
    max_rows: int
    started: float = field(default_factory=time.monotonic)
    seen_at: float = field(default_factory=time.time)
    ended: float | None = None
    high_log_id: int = 0  # the last record prepared when the answer was complete
    failed: bool = False  # the source answered with an error: nothing to compare
    wrote: bool = False  # it called a function that wrote: logged and replayed, not a read to compare
    abandoned: str | None = None  # why the sample was given up on the source side
    # Inside a transaction block: compared while that transaction is replayed (a check in its record).
    in_transaction: bool = False
    hasher: ResultHasher = field(init=False)
    described: bool = False
    # The extended protocol: the Bind's parameters, sent again to the target; None for a simple Query.
    params: tuple[bytes | None, ...] | None = None
    param_formats: tuple[int, ...] = ()
    param_types: tuple[int, ...] = ()
    _describe: Callable[[], bytes | None] | None = None

    def __post_init__(self) -> None:
        self.hasher = ResultHasher(self.shape.order_keys if self.shape.values_comparable else None)

    def extended(
        self,
        params: tuple[bytes | None, ...],
        param_formats: tuple[int, ...],
        param_types: tuple[int, ...],
        bind: bytes,
        describe: Callable[[], bytes | None],
    ) -> None:
        """An Execute of a bound portal; `describe` gives the Describe answer (it comes back before the rows)."""
        self.params, self.param_formats, self.param_types = params, param_formats, param_types
        self._describe = describe
        if any(result_formats(bind)):
            self.abandoned = "binary_results"  # values in binary: not normalised here (text only)

    def describe_now(self) -> None:
        """Take the columns from the statement's or portal's Describe answer, if not done yet."""
        if self.described or self._describe is None:
            return
        body = self._describe()
        if body is None:
            self.abandoned = self.abandoned or "not_described"  # the client never asked: types unknown
            return
        self.row_description(body)

    def row_description(self, body: bytes) -> None:
        """The source's RowDescription."""
        self.described = True
        self.hasher.describe(parse_row_description(body))

    def data_row(self, body: bytes) -> None:
        """One of the source's DataRows (text format: simple protocol)."""
        if self.abandoned is not None:
            return
        if not self.described:
            self.describe_now()
            if self.abandoned is not None:
                return
        if self.hasher.rows >= self.max_rows:
            # Hashing costs the client's own forwarding time: past this, stop and count the sample dropped.
            self.abandoned = "too_many_rows"
            return
        self.hasher.data_row(body)

    def error(self) -> None:
        """The source refused the query: the client saw the error; there is nothing to compare."""
        self.failed = True

    def complete(self, high_log_id: int) -> None:
        """The answer is complete (the ReadyForQuery after it)."""
        self.ended = time.monotonic()
        self.high_log_id = high_log_id

    @property
    def source_seconds(self) -> float:
        """How long the source took, as the proxy saw it."""
        return (self.ended or self.started) - self.started

    def digest(self) -> Digest:
        """The source result's digest."""
        return self.hasher.digest()

    def check(self, before: int) -> CapturedCheck:
        """The change-log entry for this read, run again after `before` statements of its replayed transaction."""
        digest = self.digest()
        return CapturedCheck(
            before=before,
            sql=self.sql,
            extended=self.params is not None,
            params=self.params or (),
            param_formats=self.param_formats,
            param_types=self.param_types,
            settings=tuple(self.settings.items()),
            columns=tuple((c.name, c.type_oid) for c in digest.columns),
            rows=digest.rows,
            multiset=digest.multiset,
            sequence=digest.sequence,
            source_seconds=self.source_seconds,
            low_log_id=self.low_log_id,
            seen_at=self.seen_at,
        )


def result_formats(bind: bytes) -> tuple[int, ...]:
    """The result format codes at the end of a Bind body."""
    offset = bind.index(b"\0") + 1
    offset = bind.index(b"\0", offset) + 1
    (nformats,) = struct.unpack_from("!h", bind, offset)
    offset += 2 + 2 * nformats
    (nparams,) = struct.unpack_from("!h", bind, offset)
    offset += 2
    for _ in range(nparams):
        (length,) = struct.unpack_from("!i", bind, offset)
        offset += 4 + max(length, 0)
    (nresults,) = struct.unpack_from("!h", bind, offset)
    return struct.unpack_from(f"!{nresults}h", bind, offset + 2) if nresults else ()
