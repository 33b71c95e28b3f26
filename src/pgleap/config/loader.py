"""Read a TOML file into `Config`, failing with errors that name the key and the problem."""

from __future__ import annotations

import base64
import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pgleap.config.schema import (
    ADMIN_DATABASE,
    AdapterRule,
    AdaptersConfig,
    AdminConfig,
    Config,
    CutoverConfig,
    ProxyConfig,
    ServerConfig,
    SyncConfig,
    UpgradeConfig,
    UserConfig,
    ValidationConfig,
)
from pgleap.errors import ConfigError

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
AUTH_METHODS = ("scram-sha-256", "md5")


class _Table:
    """A TOML table being read: remembers its path and which keys were used."""

    def __init__(self, path: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a table, got {type(data).__name__}")
        self.path = path
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type[T], default: T | None = None, *, required: bool = False) -> T | None:
        self.used.add(name)
        if name not in self.data:
            if required:
                raise ConfigError(f"{self.key(name)}: required key is missing")
            return default
        value = self.data[name]
        # TOML integers are acceptable where a float is expected; bools are not ints here.
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{self.key(name)}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return value

    def require(self, name: str, kind: type[T]) -> T:
        value = self.get(name, kind, required=True)
        assert value is not None
        return value

    def port(self, name: str, default: int | None = None, *, allow_zero: bool = False) -> int | None:
        value = self.get(name, int, default)
        if value is None:
            return None
        low = 0 if allow_zero else 1
        if not low <= value <= 65535:
            raise ConfigError(f"{self.key(name)}: {value} is not a TCP port ({low}-65535)")
        return value

    def duration(self, name: str, default: float) -> float:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION.match(value)):
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        else:
            raise ConfigError(
                f"{self.key(name)}: {value!r} is not a duration; "
                'write seconds (30) or a string like "500ms", "30s", "5m", "24h"'
            )
        if seconds < 0:
            raise ConfigError(f"{self.key(name)}: a duration cannot be negative")
        return seconds

    def positive(self, name: str, default: int) -> int:
        value = self.get(name, int, default)
        assert value is not None
        if value < 1:
            raise ConfigError(f"{self.key(name)}: must be at least 1, got {value}")
        return value

    def fraction(self, name: str, default: float) -> float:
        value = self.get(name, float, default)
        assert value is not None
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{self.key(name)}: must be between 0 and 1, got {value}")
        return value

    def percent(self, name: str, default: float) -> float:
        value = self.get(name, float, default)
        assert value is not None
        if not 0.0 <= value <= 100.0:
            raise ConfigError(f"{self.key(name)}: must be a percentage between 0 and 100, got {value}")
        return value

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default)
        assert value is not None
        if value not in allowed:
            raise ConfigError(f"{self.key(name)}: {value!r} is not one of {', '.join(allowed)}")
        return value

    def size_mb(self, name: str, default: float) -> float:
        value = self.get(name, float, default)
        assert value is not None
        if value <= 0:
            raise ConfigError(f"{self.key(name)}: must be more than 0 MB, got {value}")
        return value

    def sub(self, name: str) -> _Table:
        self.used.add(name)
        return _Table(self.key(name), self.data.get(name, {}))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            where = self.path or "the top level"
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(self.used))}"
            )


def _server(table: _Table, prefix: str, *, required: bool, default_database: str | None = None) -> ServerConfig | None:
    present = [k for k in table.data if k.startswith(prefix + "_")]
    if not present and not required:
        return None
    host = table.get(f"{prefix}_host", str, required=True)
    port = table.port(f"{prefix}_port", 5432)
    database = table.get(f"{prefix}_database", str, default_database, required=default_database is None)
    user = table.get(f"{prefix}_user", str, required=True)
    password = table.get(f"{prefix}_password", str)
    assert host is not None and port is not None and database is not None and user is not None
    return ServerConfig(host=host, port=port, database=database, user=user, password=password)


def _upgrade(table: _Table) -> UpgradeConfig:
    source_database = table.get("source_database", str, required=True)
    assert source_database is not None
    database = table.get("database", str, source_database)
    assert database is not None
    if database == ADMIN_DATABASE:
        raise ConfigError(f"{table.key('database')}: {ADMIN_DATABASE!r} is reserved for the admin console")
    source = _server(table, "source", required=True)
    assert source is not None
    replica = _server(table, "replica", required=False, default_database=source.database)
    target = _server(table, "target", required=False, default_database=source.database)

    v = table.sub("validation")
    validation = ValidationConfig(
        error_threshold=v.fraction("error_threshold", ValidationConfig.error_threshold),
        validation_duration=v.duration("validation_duration", ValidationConfig.validation_duration),
        compare_results=bool(v.get("compare_results", bool, True)),
        sample_rate=v.fraction("sample_rate", ValidationConfig.sample_rate),
        sample_queue_size=v.positive("sample_queue_size", ValidationConfig.sample_queue_size),
        sample_max_rows=v.positive("sample_max_rows", ValidationConfig.sample_max_rows),
        compare_timeout=v.duration("compare_timeout", ValidationConfig.compare_timeout),
    )
    v.finish()
    s = table.sub("sync")
    sync = SyncConfig(
        parallel_workers=s.positive("parallel_workers", SyncConfig.parallel_workers),
        copy_batch_size=s.positive("copy_batch_size", SyncConfig.copy_batch_size),
        resync_on_error=bool(s.get("resync_on_error", bool, True)),
        max_resync_attempts=s.positive("max_resync_attempts", SyncConfig.max_resync_attempts),
        on_schema_error=s.choice("on_schema_error", ("stop", "skip"), SyncConfig.on_schema_error),
        split_threshold_mb=s.size_mb("split_threshold_mb", SyncConfig.split_threshold_mb),
        chunk_mb=s.size_mb("chunk_mb", SyncConfig.chunk_mb),
        split_policy=s.choice("split_policy", ("makespan", "always"), SyncConfig.split_policy),
        copy_roles=bool(s.get("copy_roles", bool, True)),
        copy_binary=bool(s.get("copy_binary", bool, True)),
        verify_chunk_rows=s.positive("verify_chunk_rows", SyncConfig.verify_chunk_rows),
        verify_chunks_per_round=s.positive("verify_chunks_per_round", SyncConfig.verify_chunks_per_round),
    )
    s.finish()
    c = table.sub("cutover")
    cutover = CutoverConfig(
        switch_timeout=c.duration("switch_timeout", CutoverConfig.switch_timeout),
        session_wait=c.duration("session_wait", CutoverConfig.session_wait),
        read_shift_percent=c.percent("read_shift_percent", CutoverConfig.read_shift_percent),
        rollback_error_rate=c.fraction("rollback_error_rate", CutoverConfig.rollback_error_rate),
        rollback_window=c.duration("rollback_window", CutoverConfig.rollback_window),
        rollback_min_queries=c.positive("rollback_min_queries", CutoverConfig.rollback_min_queries),
    )
    c.finish()
    adapters = _adapters(table.sub("adapters"))
    table.finish()
    return UpgradeConfig(
        database=database,
        source=source,
        replica=replica,
        target=target,
        validation=validation,
        sync=sync,
        cutover=cutover,
        adapters=adapters,
    )


# -- [auto_upgrade.adapters] -------------------------------------------------------------------------

_IDENTIFIER = r"[a-z_][a-z0-9_$]*"
_NAME_FORMS = {
    "function": (re.compile(_IDENTIFIER), "an unqualified function name in lower case, e.g. pg_current_wal_lsn"),
    "column": (re.compile(_IDENTIFIER), "a column name in lower case, e.g. pid"),
    "setting": (
        re.compile(rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})?"),
        "a setting name in lower case, e.g. debug_parallel_query or myext.option",
    ),
}
_RULE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_MAJOR = re.compile(r"(\d+)(?:\.(\d+))?")


def _adapters(table: _Table) -> AdaptersConfig:
    """The adapters section: built-in rules on (all by default), and user rename rules, each validated."""
    enable = _patterns(table, "enable", AdaptersConfig.enable)
    disable = _patterns(table, "disable", AdaptersConfig.disable)
    raw_rules = table.get("rules", list, [])
    assert raw_rules is not None
    table.finish()
    if not table.data:
        return AdaptersConfig()  # nothing to validate: do not import the rewriter (pglast) for every config load
    from pgleap.upgrade.compat.adapters import builtin_names, select_builtin

    try:
        builtin = select_builtin(enable, disable)
    except ValueError as exc:
        raise ConfigError(f"{table.path}: enable/disable: {exc}") from None
    rules = tuple(_adapter_rule(_Table(f"{table.key('rules')}[{i}]", raw)) for i, raw in enumerate(raw_rules))
    names = set(builtin_names())
    # Each name is renamed by one rule in each direction: with two, the rewrite (or its rollback) would
    # depend on which came first.
    taken: dict[tuple[str, str, str | None, str], str] = {
        (side, a.kind, a.relation, value): f"the built-in rule {a.name}"
        for a in builtin
        for side, value in (("old", a.old), ("new", a.new))
    }
    for i, rule in enumerate(rules):
        where = f"{table.key('rules')}[{i}]"
        if rule.name in names:
            what = "a built-in rule's name" if rule.name in builtin_names() else "the name of an earlier rule"
            raise ConfigError(f"{where}.name: {rule.name!r} is {what}; give the rule a name of its own")
        names.add(rule.name)
        for side, value in (("old", rule.old), ("new", rule.new)):
            key = (side, rule.kind, rule.relation, value)
            if key in taken:
                of = f" of {rule.relation}" if rule.relation else ""
                raise ConfigError(
                    f"{where}.{side}: {value!r} ({rule.kind}{of}) is already renamed by {taken[key]}; keep one "
                    "(a built-in rule is turned off with disable = [its name])"
                )
            taken[key] = f"rule {rule.name}"
    return AdaptersConfig(enable=enable, disable=disable, rules=rules)


def _patterns(table: _Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = table.get(name, list, list(default))
    assert value is not None
    if not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f'{table.key(name)}: expected a list of built-in rule names or globs, e.g. ["xlog_*"]')
    return tuple(value)


def _adapter_rule(table: _Table) -> AdapterRule:
    """One user rule: { name, since, kind, old, new, relation } as in compat/adapters.py's table."""
    name = table.require("name", str)
    if not _RULE_NAME.fullmatch(name):
        raise ConfigError(f"{table.key('name')}: {name!r}: use letters, digits, '_', '-' and '.'")
    kind = table.require("kind", str)
    if kind not in _NAME_FORMS:
        raise ConfigError(f"{table.key('kind')}: {kind!r} is not one of {', '.join(_NAME_FORMS)}")
    since = _since(table)
    pattern, form = _NAME_FORMS[kind]
    old, new = table.require("old", str), table.require("new", str)
    for key, value in (("old", old), ("new", new)):
        if not pattern.fullmatch(value):
            raise ConfigError(f"{table.key(key)}: {value!r} is not {form}")
    if old == new:
        raise ConfigError(f"{table.key('new')}: the same as old ({old!r}); the rule would rename nothing")
    relation = table.get("relation", str)
    table.finish()
    if kind == "column" and relation is None:
        raise ConfigError(f"{table.key('relation')}: a column rule needs the relation the column belongs to")
    if kind != "column" and relation is not None:
        raise ConfigError(f"{table.key('relation')}: only a column rule has a relation (this one is a {kind} rule)")
    if relation is not None and not re.fullmatch(_IDENTIFIER, relation):
        raise ConfigError(f"{table.key('relation')}: {relation!r} is not an unqualified relation name in lower case")
    return AdapterRule(name=name, since=since, kind=kind, old=old, new=new, relation=relation)


def _since(table: _Table) -> int:
    """`since` as server_version_num: 12 or "12" -> 120000, "9.2" -> 90200."""
    table.used.add("since")
    if "since" not in table.data:
        raise ConfigError(f"{table.key('since')}: required key is missing (the first major with the new name)")
    value = table.data["since"]
    match = _MAJOR.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        major, minor = value, 0
    elif match is not None:
        major, minor = int(match.group(1)), int(match.group(2) or 0)
    else:
        raise ConfigError(f'{table.key("since")}: {value!r} is not a major; write 12, or a string like "9.2"')
    if not (9 <= major < 100 and (minor == 0 or (major == 9 and minor <= 6))):
        raise ConfigError(f"{table.key('since')}: {value!r} is not a PostgreSQL major (9.0 to 9.6, then 10, 11, ...)")
    return major * 10000 + minor * 100


def _user(table: _Table) -> UserConfig:
    name = table.require("name", str)
    password = table.get("password", str)
    verifier = table.get("scram_verifier", str)
    md5_hash = table.get("md5_hash", str)
    default_method = "md5" if (md5_hash and not password and not verifier) else "scram-sha-256"
    method = table.get("auth_method", str, default_method)
    table.finish()
    if method not in AUTH_METHODS:
        raise ConfigError(f"{table.key('auth_method')}: {method!r} is not one of {', '.join(AUTH_METHODS)}")
    if method == "scram-sha-256" and not (password or verifier):
        raise ConfigError(f"{table.path} ({name}): scram-sha-256 needs password or scram_verifier")
    if method == "md5" and not (password or md5_hash):
        raise ConfigError(f"{table.path} ({name}): md5 needs password or md5_hash")
    if verifier:
        _check_scram_verifier(table.key("scram_verifier"), verifier)
    if md5_hash and not re.fullmatch(r"md5[0-9a-f]{32}", md5_hash):
        raise ConfigError(
            f"{table.key('md5_hash')}: expected 'md5' followed by 32 hex digits (as in pg_authid.rolpassword)"
        )
    return UserConfig(name=name, auth_method=method, password=password, scram_verifier=verifier, md5_hash=md5_hash)


def _check_scram_verifier(key: str, verifier: str) -> None:
    form = "'SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>' (as in pg_authid.rolpassword)"
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$:]+)\$([^$:]+):([^$:]+)", verifier)
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(f"{key}: expected {form}")
    try:
        salt, stored, server = (base64.b64decode(match.group(i), validate=True) for i in (2, 3, 4))
    except ValueError:
        raise ConfigError(f"{key}: salt and keys must be base64; expected {form}") from None
    if not salt or len(stored) != 32 or len(server) != 32:
        raise ConfigError(f"{key}: StoredKey and ServerKey must be 32-byte SHA-256 values; expected {form}")


def _proxy(table: _Table, base: Path | None) -> tuple[ProxyConfig, AdminConfig]:
    def path(name: str) -> Path | None:
        value = table.get(name, str)
        if value is None:
            return None
        p = Path(value)
        return p if p.is_absolute() or base is None else base / p

    proxy = ProxyConfig(
        listen_addr=table.get("listen_addr", str, ProxyConfig.listen_addr) or ProxyConfig.listen_addr,
        listen_port=table.port("listen_port", ProxyConfig.listen_port, allow_zero=True) or 0,
        max_client_connections=table.positive("max_client_connections", ProxyConfig.max_client_connections),
        shutdown_timeout=table.duration("shutdown_timeout", ProxyConfig.shutdown_timeout),
        connect_timeout=table.duration("connect_timeout", ProxyConfig.connect_timeout),
        max_message_size=table.positive("max_message_size", ProxyConfig.max_message_size),
        tls_cert=path("tls_cert"),
        tls_key=path("tls_key"),
        metrics_addr=table.get("metrics_addr", str, ProxyConfig.metrics_addr) or ProxyConfig.metrics_addr,
        metrics_port=table.port("metrics_port", 0, allow_zero=True) or 0,
        state_path=path("state_path") or (base / "pgleap-state.db" if base else ProxyConfig.state_path),
        changelog_path=path("changelog_path") or (base / "pgleap-changes.db" if base else ProxyConfig.changelog_path),
        durability=table.choice("durability", ("commit", "batch"), ProxyConfig.durability),
        batch_interval=table.duration("batch_interval", ProxyConfig.batch_interval),
        bypass_check_interval=table.duration("bypass_check_interval", ProxyConfig.bypass_check_interval),
        ddl=table.choice("ddl", ("block", "replay", "queue"), ProxyConfig.ddl),
        replay_batch_size=table.positive("replay_batch_size", ProxyConfig.replay_batch_size),
        on_apply_error=table.choice("on_apply_error", ("pause", "skip_and_resync"), ProxyConfig.on_apply_error),
        change_log_retain=table.positive("change_log_retain", ProxyConfig.change_log_retain),
    )
    admin = AdminConfig(user=table.require("admin_user", str), password=table.require("admin_password", str))
    table.finish()
    if proxy.bypass_check_interval <= 0:
        raise ConfigError('pgleap.bypass_check_interval: must be more than 0 (for example "5s")')
    if (proxy.tls_cert is None) != (proxy.tls_key is None):
        raise ConfigError("pgleap.tls_cert and pgleap.tls_key: set both or neither")
    for key, p in (("tls_cert", proxy.tls_cert), ("tls_key", proxy.tls_key)):
        if p is not None and not p.is_file():
            raise ConfigError(f"pgleap.{key}: file {p} does not exist")
    return proxy, admin


def parse_config(text: str, path: Path | None = None) -> Config:
    """Parse and validate configuration text."""
    where = str(path) if path else "config"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    root = _Table("", data)
    unknown = sorted(set(data) - {"pgleap", "users", "auto_upgrade"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown table(s) {', '.join(unknown)}; valid are [pgleap], [[users]], [[auto_upgrade]]"
        )
    proxy, admin = _proxy(root.sub("pgleap"), path.parent if path else None)

    users_raw = root.get("users", list, [])
    assert users_raw is not None
    users = tuple(_user(_Table(f"users[{i}]", raw)) for i, raw in enumerate(users_raw))
    upgrades_raw = root.get("auto_upgrade", list, required=True)
    assert upgrades_raw is not None
    if not upgrades_raw:
        raise ConfigError("auto_upgrade: at least one [[auto_upgrade]] entry is required")
    upgrades = tuple(_upgrade(_Table(f"auto_upgrade[{i}]", raw)) for i, raw in enumerate(upgrades_raw))
    root.finish()

    _unique("users", [u.name for u in users] + [admin.user], "user name (admin_user counts too)")
    _unique("auto_upgrade", [u.database for u in upgrades], "database")
    if not users:
        raise ConfigError("users: no [[users]] entry; clients could not log in (add one with name and password)")
    return Config(proxy=proxy, admin=admin, users=users, upgrades=upgrades, path=path)


def _unique(where: str, names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{where}: {what} {name!r} appears twice")
        seen.add(name)


def load_config(path: str | Path) -> Config:
    """Read and validate a configuration file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file (see pgleap.example.toml)") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from exc
    return parse_config(text, p.resolve())
