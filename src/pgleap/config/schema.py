"""The configuration records. Field names follow the plan's `[[auto_upgrade]]` block."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ADMIN_DATABASE = "pgleap"


@dataclass(frozen=True)
class ServerConfig:
    """Where a PostgreSQL server is and how pgleap logs in to it."""

    host: str
    port: int
    database: str
    user: str
    password: str | None = None

    def describe(self) -> str:
        """host:port/database as user, for messages (never the password)."""
        return f"{self.user}@{self.host}:{self.port}/{self.database}"


@dataclass(frozen=True)
class ValidationConfig:
    """When the target counts as validated (used by the upgrade engine)."""

    error_threshold: float = 0.001
    validation_duration: float = 24 * 3600.0
    compare_results: bool = True
    sample_rate: float = 0.01
    sample_queue_size: int = 64  # sampled reads waiting for their point in the change stream; more are dropped
    sample_max_rows: int = 10000  # a sampled result with more rows is dropped (hashing costs the client's time)
    compare_timeout: float = 5.0  # seconds the target's run of a sampled read may take (replay waits meanwhile)


@dataclass(frozen=True)
class SyncConfig:
    """How data is copied and re-synced (used by the upgrade engine)."""

    parallel_workers: int = 4
    copy_batch_size: int = 10000
    resync_on_error: bool = True
    max_resync_attempts: int = 3
    on_schema_error: str = "stop"  # or "skip": what to do with an object the target rejects
    split_threshold_mb: float = 256.0  # tables larger than this are copied as ranges, in parallel
    chunk_mb: float = 128.0  # the size of one range
    split_policy: str = "makespan"  # or "always": split every table above the threshold
    copy_roles: bool = True
    copy_binary: bool = True  # binary COPY where every column type allows it
    verify_chunk_rows: int = 10000  # rows per checksum chunk of `pgleap verify`
    verify_chunks_per_round: int = 10  # chunks compared at one source point (bounds replay's pause)


@dataclass(frozen=True)
class CutoverConfig:
    """How clients move between the servers (used by the upgrade engine)."""

    switch_timeout: float = 5.0  # seconds a cutover or rollback waits for running transactions and replay
    session_wait: float = 10.0  # seconds it waits for sessions holding a temporary table or an open cursor
    read_shift_percent: float = 0.0  # of read-only sessions sent to the target while mirroring (gradual shift)
    rollback_error_rate: float = 0.0  # after cutover: error rate on the target that rolls back by itself; 0: off
    rollback_window: float = 60.0  # seconds over which that error rate is measured
    rollback_min_queries: int = 100  # fewer queries in the window never trigger it


@dataclass(frozen=True)
class AdapterRule:
    """One renaming: `old` before server_version_num `since`, `new` from it; kind function, column, setting."""

    name: str
    since: int  # server_version_num of the first major with the new name (100000 for 10, 90200 for 9.2)
    kind: str  # "function", "column" (of `relation`) or "setting"
    old: str
    new: str
    relation: str | None = None  # the catalog relation a renamed column belongs to (kind "column" only)


@dataclass(frozen=True)
class AdaptersConfig:
    """Version adapters: which built-in rename rules are on, and the user's own (compat/adapters.py)."""

    enable: tuple[str, ...] = ("*",)  # built-in rule names or globs that are on (all by default)
    disable: tuple[str, ...] = ()  # built-in rule names or globs taken out again
    rules: tuple[AdapterRule, ...] = ()  # user rules, after the built-in ones


@dataclass(frozen=True)
class UpgradeConfig:
    """One `[[auto_upgrade]]` entry: a database clients reach through pgleap, and its upgrade."""

    database: str
    source: ServerConfig
    target: ServerConfig | None = None
    replica: ServerConfig | None = None
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    cutover: CutoverConfig = field(default_factory=CutoverConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)


@dataclass(frozen=True)
class UserConfig:
    """A client user pgleap authenticates itself."""

    name: str
    auth_method: str  # "scram-sha-256" or "md5"
    password: str | None = None
    scram_verifier: str | None = None
    md5_hash: str | None = None


@dataclass(frozen=True)
class AdminConfig:
    """Credentials of the admin console (database `pgleap`)."""

    user: str
    password: str


@dataclass(frozen=True)
class ProxyConfig:
    """The listener and its limits."""

    listen_addr: str = "127.0.0.1"
    listen_port: int = 6432
    max_client_connections: int = 1000
    shutdown_timeout: float = 30.0
    connect_timeout: float = 10.0
    max_message_size: int = 256 * 1024 * 1024
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_addr: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no metrics endpoint
    state_path: Path = Path("pgleap-state.db")  # the durable state store (SQLite)
    changelog_path: Path = Path("pgleap-changes.db")  # the change log (SQLite, WAL)
    durability: str = "commit"  # "commit": fsync per transaction; "batch": group commit
    batch_interval: float = 0.005  # seconds a batch waits for more transactions
    bypass_check_interval: float = 5.0  # seconds between looks for writers on the source that bypass pgleap
    ddl: str = "replay"  # schema changes while capturing: "block", "replay" or "queue" (held for the operator)
    replay_batch_size: int = 200  # source transactions per target transaction
    on_apply_error: str = "pause"  # a transaction the target refuses: "pause" or "skip_and_resync"
    change_log_retain: int = 100_000  # applied transactions the change log keeps behind replay


@dataclass(frozen=True)
class Config:
    """The whole configuration file."""

    proxy: ProxyConfig
    admin: AdminConfig
    users: tuple[UserConfig, ...]
    upgrades: tuple[UpgradeConfig, ...]
    path: Path | None = None

    def upgrade_for(self, database: str) -> UpgradeConfig | None:
        """The `[[auto_upgrade]]` entry clients reach with this database name."""
        for upgrade in self.upgrades:
            if upgrade.database == database:
                return upgrade
        return None

    def user(self, name: str) -> UserConfig | None:
        """The client user of this name."""
        for user in self.users:
            if user.name == name:
                return user
        return None
