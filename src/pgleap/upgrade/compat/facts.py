"""Per-major facts and function names (DESIGN.md "Version facts"), gated on server_version_num."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pgleap.errors import PgleapError

PG90, PG91, PG92, PG93, PG94, PG96 = 90000, 90100, 90200, 90300, 90400, 90600
PG95 = 90500
PG10, PG11, PG12, PG13, PG14 = 100000, 110000, 120000, 130000, 140000


class UnsupportedVersionError(PgleapError):
    """The server is too old for what pgleap needs from it."""


@dataclass(frozen=True)
class Facts:
    """What one server (by server_version_num) calls things and can do."""

    version_num: int

    @property
    def major(self) -> int:
        """10 for 100023, 9 for 90624 (9.x majors share the first number here)."""
        return self.version_num // 10000

    def _wal(self, new: str, old: str) -> str:
        # 10 renamed xlog -> wal and location -> lsn in every function name.
        return new if self.version_num >= PG10 else old

    # -- replay control on a standby -------------------------------------------------------

    def replay_pause_sql(self) -> str:
        """Pause WAL replay on a hot standby (9.1+)."""
        self._need(PG91, "pausing replay on a standby")
        return "SELECT " + self._wal("pg_wal_replay_pause()", "pg_xlog_replay_pause()")

    def replay_resume_sql(self) -> str:
        """Resume WAL replay on a hot standby."""
        self._need(PG91, "resuming replay on a standby")
        return "SELECT " + self._wal("pg_wal_replay_resume()", "pg_xlog_replay_resume()")

    def replay_lsn_sql(self) -> str:
        """The standby's last replayed position, as text."""
        return "SELECT " + self._wal("pg_last_wal_replay_lsn()", "pg_last_xlog_replay_location()") + "::text"

    def pause_requested_sql(self) -> str:
        """Whether a pause was requested (before 14 this says nothing about whether it was reached)."""
        return "SELECT " + self._wal("pg_is_wal_replay_paused()", "pg_is_xlog_replay_paused()")

    def pause_state_sql(self) -> str | None:
        """14+: 'not paused' / 'pause requested' / 'paused'; None before 14 (poll the position instead)."""
        return "SELECT pg_get_wal_replay_pause_state()" if self.version_num >= PG14 else None

    def current_lsn_sql(self) -> str:
        """The primary's current WAL insert position, as text."""
        return "SELECT " + self._wal("pg_current_wal_insert_lsn()", "pg_current_xlog_insert_location()") + "::text"

    def replication_state_sql(self) -> str:
        """Per standby on a primary: application_name, state, replay position (text)."""
        column = self._wal("replay_lsn", "replay_location")
        return f"SELECT application_name, state, {column}::text FROM pg_stat_replication"

    # -- snapshots and txids --------------------------------------------------------------

    def snapshot_sql(self) -> str:
        """S: the current txid snapshot in its text form (8.3+; same form as pg_current_snapshot on 13+)."""
        return "SELECT txid_current_snapshot()::text"

    def standby_snapshot_sql(self) -> str | None:
        """S on a paused hot standby, its in-progress txids filled in; None before 10 (no txid_status).

        On a standby PostgreSQL keeps every running txid in the snapshot's subxip array and leaves xip empty,
        so txid_current_snapshot() there says "xmin:xmax:" with transactions running: each of them would
        read as visible in S, as if already copied. The standby's own txid_status() tells which txids of
        [xmin, xmax) were still running at the point replay paused at (subtransactions among them too,
        which is harmless: no top-level txid is ever one of those).
        """
        if self.version_num < PG10:
            return None
        return (
            "SELECT txid_snapshot_xmin(s)::text || ':' || txid_snapshot_xmax(s)::text || ':' || "
            "coalesce((SELECT string_agg(x::text, ',' ORDER BY x) "
            "FROM generate_series(txid_snapshot_xmin(s), txid_snapshot_xmax(s) - 1) AS x "
            "WHERE txid_status(x) = 'in progress'), '') "
            "FROM (SELECT txid_current_snapshot() AS s) AS snapshot"
        )

    @property
    def can_export_snapshot(self) -> bool:
        """pg_export_snapshot() exists (9.2+)."""
        return self.version_num >= PG92

    @property
    def standby_can_export_snapshot(self) -> bool:
        """A hot standby can export a snapshot (10+)."""
        return self.version_num >= PG10

    def export_snapshot_sql(self) -> str:
        """Export the current transaction's snapshot for other sessions."""
        self._need(PG92, "exporting a snapshot (pg_export_snapshot) to copy from the primary without a replica")
        return "SELECT pg_export_snapshot()"

    @property
    def has_txid_status(self) -> bool:
        """txid_status(bigint) exists (10+): tells whether a recent transaction committed."""
        return self.version_num >= PG10

    def capture_txid_sql(self) -> str:
        """The capture probe's txid of the running transaction, NULL when it has written nothing.

        9.6+ has txid_current_if_assigned(), which never assigns a txid. Before it, txid_current()
        assigns one and fails in a read-only transaction, which cannot have written anyway.
        """
        if self.version_num >= PG96:
            return "txid_current_if_assigned()::text"
        return "CASE WHEN current_setting('transaction_read_only') = 'on' THEN NULL ELSE txid_current()::text END"

    def txid_status_sql(self) -> str:
        """'committed' / 'aborted' / 'in progress' / NULL (too old) for $1."""
        self._need(PG10, "txid_status on the target")
        return "SELECT txid_status($1::bigint)"

    def backend_of_xid_sql(self) -> str:
        """pids whose transaction has the 32-bit xid of $1 (a 64-bit txid), to end a stale copy transaction."""
        self._need(PG96, "finding the backend of a transaction (backend_xid)")
        return (
            "SELECT pid FROM pg_stat_activity "
            "WHERE backend_xid::text::bigint = ($1::bigint % 4294967296) AND pid <> pg_backend_pid()"
        )

    def drop_database_sql(self, quoted_name: str) -> str:
        """DROP DATABASE, ending its sessions first where the server can (13+)."""
        force = " WITH (FORCE)" if self.version_num >= PG13 else ""
        return f"DROP DATABASE IF EXISTS {quoted_name}{force}"

    # -- capabilities ---------------------------------------------------------------------

    @property
    def has_tid_range_scan(self) -> bool:
        """14+ scans a ctid range without reading the whole table; older servers would scan it per chunk."""
        return self.version_num >= PG14

    @property
    def has_matviews(self) -> bool:
        """Materialized views exist (9.3+)."""
        return self.version_num >= PG93

    @property
    def has_partitioning(self) -> bool:
        """Declarative partitioning (relkind 'p', relispartition) exists (10+)."""
        return self.version_num >= PG10

    @property
    def has_generated_columns(self) -> bool:
        """attgenerated exists (12+); generated columns are not COPYed."""
        return self.version_num >= PG12

    @property
    def has_lo_metadata(self) -> bool:
        """pg_largeobject_metadata exists (9.0+)."""
        return self.version_num >= PG90

    @property
    def has_hex_bytea(self) -> bool:
        """bytea_output = hex exists (9.0+)."""
        return self.version_num >= PG90

    # -- standbys: configuration of a new replica -------------------------------------------

    @property
    def uses_recovery_conf(self) -> bool:
        """Standby settings go in recovery.conf (before 12); 12+ refuses to start with one."""
        return self.version_num < PG12

    @property
    def socket_dir_setting(self) -> str:
        """The setting naming the unix socket directory (plural and a list from 9.3)."""
        return "unix_socket_directories" if self.version_num >= PG93 else "unix_socket_directory"

    @property
    def basebackup_wal_method(self) -> str:
        """pg_basebackup -X: stream needs 9.3+ servers; older ones only hand WAL over at the end (fetch)."""
        return "stream" if self.version_num >= PG93 else "fetch"

    @property
    def has_auto_conf(self) -> bool:
        """postgresql.auto.conf is read (9.4+); before, settings must go in postgresql.conf."""
        return self.version_num >= PG94

    def advisory_lock_sql(self, key: int) -> tuple[str, str]:
        """SQL taking, and then giving back, an advisory lock inside one implicit transaction (simple query).

        pg_advisory_xact_lock (9.1+) goes with the transaction; on 9.0 a session lock is taken and released.
        """
        if self.version_num >= PG91:
            return f"SELECT pg_advisory_xact_lock({key});", ""
        return f"SELECT pg_advisory_lock({key});", f"SELECT pg_advisory_unlock({key});"

    @property
    def do_may_commit(self) -> bool:
        """A DO block may COMMIT inside (11+), which it cannot in a transaction block: capture leaves it out of
        one. Before 11 it is wrapped and probed like any other write."""
        return self.version_num >= PG11

    @property
    def has_on_conflict(self) -> bool:
        """INSERT ... ON CONFLICT (9.5+); before it, replay stores its position with a writable CTE."""
        return self.version_num >= PG95

    @property
    def password_auth_method(self) -> str:
        """The strongest password method in pg_hba.conf: SCRAM from 10, md5 before."""
        return "scram-sha-256" if self.version_num >= PG10 else "md5"

    def _need(self, minimum: int, what: str) -> None:
        if self.version_num < minimum:
            raise UnsupportedVersionError(
                f"{what} needs PostgreSQL {minimum // 10000}.{minimum // 100 % 100} or later; this server is "
                f"server_version_num {self.version_num}"
            )


def version_num_of(server_version: str) -> int:
    """server_version_num from the server_version parameter ("10.23", "9.3.25", "18.6 (Debian 18.6-1)")."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", server_version.strip())
    if match is None:
        raise UnsupportedVersionError(f"cannot read a PostgreSQL version from server_version {server_version!r}")
    major, minor, patch = (int(g) if g else 0 for g in match.groups())
    if major >= 10:
        return major * 10000 + minor
    return major * 10000 + minor * 100 + patch


def facts_for(version_num: int) -> Facts:
    """The facts of a server, from SHOW server_version_num."""
    if version_num < PG90:
        raise UnsupportedVersionError(
            f"PostgreSQL server_version_num {version_num} is older than 9.0; pgleap supports sources from 9.0"
        )
    return Facts(version_num)
