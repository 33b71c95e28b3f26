"""Checkpoints of the change log's WAL, off the commit path.

SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold (1,000 pages), so every
client COMMIT held for the log waited for it: 40-50 ms on the lab's disk, the one moment all sessions
stalled together. Here a thread of its own copies the WAL into the file with PASSIVE checkpoints, which
never block the writer. A checkpoint from another connection alone never lets SQLite start the WAL over
under a steady load, though: it does so only when a write transaction begins with every frame copied,
and a commit always lands in between. So the thread makes two passes (the second copies only what the
writer appended during the first) and then asks the writer for a short pass of its own between two
groups; the writer's next transaction then finds the WAL fully copied and writes it from the start.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# SQLite's automatic checkpoint, left on at this many WAL pages (40 MB): the passes here keep the WAL far
# below it, so it runs only if they stop working.
BACKSTOP_PAGES = 10_000
INTERVAL = 0.1  # seconds between background passes: 1 s let the WAL reach 36 MB at 2,600 records a second


class WalCheckpointer:
    """Copies a WAL-mode database's WAL into its file from a thread, and tells the writer when to finish."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], name: str, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.background_passes = 0
        self.writer_passes = 0  # short passes the writer ran after them: each lets the WAL start over
        self._db = connect()
        self._stop = threading.Event()
        self._due = threading.Event()  # copied in the background: the writer's short pass is due
        self._warned = False
        self._thread = threading.Thread(target=self._loop, name=f"changelog-checkpoint:{name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self._due.is_set():
                continue  # the writer has not run its pass yet (an idle log): nothing more to copy meanwhile
            try:
                _, frames, _ = self._passive(self._db)
                if frames > 0:
                    self._passive(self._db)  # what the writer appended during the first pass
                    self.background_passes += 1
                    self._due.set()
            except Exception as exc:  # the thread must outlive any failure: the WAL would only grow
                self._failed("", exc)
            else:
                self._warned = False

    def after_commit(self, writer: sqlite3.Connection) -> None:
        """Called by the writer thread between groups: run the short pass when the background one has."""
        if not self._due.is_set():
            return
        try:
            self._passive(writer)
        except Exception as exc:  # never the writer's failure: its group is committed already
            self._failed(" in the writer", exc)
        else:
            self.writer_passes += 1
        finally:
            self._due.clear()  # only now: the thread's next pass must not run beside this one

    def _failed(self, where: str, exc: Exception) -> None:
        # The log stays correct (a WAL that is not copied just grows): said once per failing spell.
        if not self._warned:
            log.warning("change log checkpoint failed%s (%s); the WAL grows until it succeeds", where, exc)
            self._warned = True

    @staticmethod
    def _passive(db: sqlite3.Connection) -> tuple[int, int, int]:
        row = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def close(self) -> None:
        """Stop the thread and close its connection."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        self._db.close()
