"""Config validation (no servers): valid files parse, every mistake is rejected with a message naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgleap.config import load_config, parse_config
from pgleap.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent

PGLEAP = """\
[pgleap]
listen_addr = "127.0.0.1"
listen_port = 6432
admin_user = "admin"
admin_password = "admin-pw"
"""
USERS = """\
[[users]]
name = "app"
password = "app-pw"
"""
UPGRADE = """\
[[auto_upgrade]]
database = "app"
source_host = "10.0.0.1"
source_port = 5432
source_database = "appdb"
source_user = "postgres"
source_password = "pw"
"""


def config(pgleap: str = PGLEAP, users: str = USERS, upgrade: str = UPGRADE, extra: str = "") -> str:
    """A valid config text, with parts replaced or appended."""
    return "\n".join([pgleap, users, upgrade, extra])


def rejected(text: str) -> str:
    """parse_config must reject `text`; returns the message."""
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return str(info.value)


def test_minimal_config_parses_with_defaults() -> None:
    """A minimal valid config parses; defaults fill the rest."""
    cfg = parse_config(config())
    assert cfg.proxy.listen_port == 6432 and cfg.proxy.metrics_port == 0
    assert cfg.admin.user == "admin"
    assert [u.name for u in cfg.users] == ["app"] and cfg.users[0].auth_method == "scram-sha-256"
    upgrade = cfg.upgrade_for("app")
    assert upgrade is not None
    assert (upgrade.source.host, upgrade.source.port, upgrade.source.database) == ("10.0.0.1", 5432, "appdb")
    assert upgrade.target is None and upgrade.replica is None


def test_target_and_replica_default_to_source_database() -> None:
    """target_*/replica_* entries without a database inherit the source database; database defaults too."""
    upgrade = (
        UPGRADE.replace('database = "app"\n', "", 1)
        + 'target_host = "t"\ntarget_user = "u"\nreplica_host = "r"\nreplica_user = "u"\n'
    )
    cfg = parse_config(config(upgrade=upgrade))
    entry = cfg.upgrades[0]
    assert entry.database == "appdb"
    assert entry.target is not None and entry.target.database == "appdb" and entry.target.port == 5432
    assert entry.replica is not None and entry.replica.host == "r"


def test_example_config_parses() -> None:
    """The annotated pgleap.example.toml at the repo root is a valid config."""
    example = REPO_ROOT / "pgleap.example.toml"
    if not example.is_file():
        pytest.fail(f"{example} does not exist: ship an annotated example config at the repo root")
    text = example.read_text()
    cfg = load_config(example)
    assert cfg.upgrades, "the example has no [[auto_upgrade]] entry"
    assert cfg.users, "the example has no [[users]] entry"
    assert text.count("#") >= 10, "the example config should be annotated with comments"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (config(extra="listen_port = 5\n"), "listen_port"),  # a [pgleap] key written at the top level
        (config(users=USERS.replace("[[users]]", "[[user]]")), "user"),  # typo of a table name
        (
            config(
                upgrade=UPGRADE.replace("[[auto_upgrade]]", "[[auto_upgarde]]"),
                extra=UPGRADE.replace('"app"', '"other"', 1),
            ),
            "auto_upgarde",
        ),
    ],
    ids=["misplaced-key", "users-typo", "auto_upgrade-typo"],
)
def test_unknown_top_level_key(text: str, names: str) -> None:
    """An unknown top-level key or table is rejected and named."""
    message = rejected(text)
    assert names in message and "unknown" in message, message


def test_misspelt_auto_upgrade_table_is_named() -> None:
    """A config whose only [[auto_upgrade]] table is misspelt names the misspelling, not just the missing table."""
    message = rejected(config(upgrade=UPGRADE.replace("[[auto_upgrade]]", "[[auto_upgarde]]")))
    assert "auto_upgarde" in message, message


def test_unknown_key_in_pgleap_section() -> None:
    """A typo in [pgleap] is named with its section, and the valid keys are listed."""
    message = rejected(config(pgleap=PGLEAP + "listen_prot = 7000\n"))
    assert "pgleap" in message and "listen_prot" in message and "listen_port" in message, message


def test_unknown_key_in_auto_upgrade() -> None:
    """A typo in an [[auto_upgrade]] entry is named with the entry's index."""
    message = rejected(config(upgrade=UPGRADE + 'source_pasword = "x"\n'))
    assert "auto_upgrade[0]" in message and "source_pasword" in message, message


def test_unknown_key_in_validation() -> None:
    """A typo in [auto_upgrade.validation] is named with its full path."""
    message = rejected(config(upgrade=UPGRADE + "[auto_upgrade.validation]\nerror_treshold = 0.1\n"))
    assert "auto_upgrade[0].validation" in message and "error_treshold" in message, message


def test_unknown_key_in_users() -> None:
    """A typo in a [[users]] entry is named."""
    message = rejected(config(users=USERS + 'auth_metod = "md5"\n'))
    assert "users[0]" in message and "auth_metod" in message, message


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (
            config(pgleap=PGLEAP.replace("listen_port = 6432", 'listen_port = "6432"')),
            "pgleap.listen_port",
            "expected int",
        ),
        (
            config(upgrade=UPGRADE.replace('source_host = "10.0.0.1"', "source_host = 10")),
            "auto_upgrade[0].source_host",
            "expected str",
        ),
        (config(pgleap=PGLEAP + "max_client_connections = true\n"), "pgleap.max_client_connections", "expected int"),
        (
            config(upgrade=UPGRADE + '[auto_upgrade.sync]\nresync_on_error = "yes"\n'),
            "auto_upgrade[0].sync.resync_on_error",
            "expected bool",
        ),
    ],
    ids=["port-as-string", "host-as-int", "bool-for-int", "string-for-bool"],
)
def test_wrong_type(text: str, key: str, words: str) -> None:
    """A value of the wrong type is rejected naming the key and the expected type."""
    message = rejected(text)
    assert key in message and words in message, message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (config(pgleap=PGLEAP.replace("6432", "65536")), "pgleap.listen_port"),
        (config(pgleap=PGLEAP.replace("6432", "-1")), "pgleap.listen_port"),
        (config(upgrade=UPGRADE.replace("source_port = 5432", "source_port = 0")), "auto_upgrade[0].source_port"),
        (config(upgrade=UPGRADE.replace("source_port = 5432", "source_port = 99999")), "auto_upgrade[0].source_port"),
        (config(pgleap=PGLEAP + "metrics_port = 70000\n"), "pgleap.metrics_port"),
    ],
    ids=["listen-65536", "listen-negative", "source-0", "source-99999", "metrics-70000"],
)
def test_port_out_of_range(text: str, key: str) -> None:
    """Ports outside 1-65535 (0 allowed only for listen/metrics) are rejected naming the key."""
    message = rejected(text)
    assert key in message and "not a TCP port" in message, message


def test_listen_port_zero_is_allowed() -> None:
    """listen_port 0 (pick a free port) is valid."""
    assert parse_config(config(pgleap=PGLEAP.replace("6432", "0"))).proxy.listen_port == 0


def test_missing_source_host() -> None:
    """An [[auto_upgrade]] entry without source_host is rejected naming it."""
    message = rejected(config(upgrade=UPGRADE.replace('source_host = "10.0.0.1"\n', "")))
    assert "auto_upgrade[0].source_host" in message and "missing" in message, message


def test_target_without_host() -> None:
    """A partial target (target_port without target_host) is rejected naming target_host."""
    message = rejected(config(upgrade=UPGRADE + "target_port = 5433\n"))
    assert "auto_upgrade[0].target_host" in message, message


def test_missing_admin_credentials() -> None:
    """[pgleap] without admin_password is rejected naming it."""
    message = rejected(config(pgleap=PGLEAP.replace('admin_password = "admin-pw"\n', "")))
    assert "pgleap.admin_password" in message, message


def test_no_auto_upgrade_entry() -> None:
    """A config without [[auto_upgrade]] says it needs one."""
    message = rejected(config(upgrade=""))
    assert "auto_upgrade" in message, message


def test_duplicate_database() -> None:
    """Two [[auto_upgrade]] entries for the same client database are rejected."""
    message = rejected(config(extra=UPGRADE.replace("10.0.0.1", "10.0.0.2")))
    assert "auto_upgrade" in message and "'app'" in message and "twice" in message, message


def test_duplicate_user_and_admin_collision() -> None:
    """Two users of one name, or a user named like the admin, are rejected."""
    assert "'app'" in rejected(config(users=USERS + USERS))
    assert "'admin'" in rejected(config(users=USERS.replace('"app"', '"admin"')))


@pytest.mark.parametrize("field", ["database", "source_database"])
def test_database_named_pgleap_is_reserved(field: str) -> None:
    """The client-facing database cannot be "pgleap" (the admin console), whether set directly or defaulted."""
    upgrade = UPGRADE.replace('database = "app"\n', "", 1) if field == "source_database" else UPGRADE
    upgrade = upgrade.replace(f'{field} = "{"appdb" if field == "source_database" else "app"}"', f'{field} = "pgleap"')
    message = rejected(config(upgrade=upgrade))
    assert "auto_upgrade[0].database" in message and "reserved" in message, message


def test_user_without_password() -> None:
    """A user with neither password nor verifier is rejected naming the entry and user."""
    message = rejected(config(users='[[users]]\nname = "bob"\n'))
    assert "users[0]" in message and "bob" in message and "password" in message, message
    message = rejected(config(users='[[users]]\nname = "bob"\nauth_method = "md5"\n'))
    assert "users[0]" in message and "md5" in message, message


def test_bad_auth_method() -> None:
    """An auth_method other than scram-sha-256 or md5 is rejected naming it."""
    message = rejected(config(users=USERS + 'auth_method = "trust"\n'))
    assert "users[0].auth_method" in message and "'trust'" in message, message


@pytest.mark.parametrize(
    "verifier",
    [
        "not-a-verifier",
        "SCRAM-SHA-256$4096:c2FsdHNhbHQ=",  # no keys
        "SCRAM-SHA-256$many:c2FsdHNhbHQ=$c3RvcmVk:c2VydmVy",  # iterations not a number
        "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$@@@@:####",  # keys not base64
        "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$c3RvcmVk:c2VydmVy",  # keys not 32 bytes
    ],
    ids=["no-prefix", "no-keys", "bad-iterations", "bad-base64", "short-keys"],
)
def test_malformed_scram_verifier(verifier: str) -> None:
    """A scram_verifier that is not a well-formed pg_authid SCRAM secret is rejected at load time, naming the key."""
    message = rejected(config(users=f'[[users]]\nname = "bob"\nscram_verifier = "{verifier}"\n'))
    assert "users[0].scram_verifier" in message, message


def test_valid_scram_verifier_accepted() -> None:
    """A well-formed verifier (computed with scramp) is accepted and kept verbatim."""
    import base64

    from scramp import ScramMechanism

    salt, stored, server, iterations = ScramMechanism("SCRAM-SHA-256").make_auth_info("pw", iteration_count=4096)
    verifier = (
        f"SCRAM-SHA-256${iterations}:{base64.b64encode(salt).decode()}"
        f"${base64.b64encode(stored).decode()}:{base64.b64encode(server).decode()}"
    )
    cfg = parse_config(config(users=f'[[users]]\nname = "bob"\nscram_verifier = "{verifier}"\n'))
    assert cfg.users[0].scram_verifier == verifier and cfg.users[0].auth_method == "scram-sha-256"


@pytest.mark.parametrize("md5_hash", ["md5abc", "0123456789abcdef0123456789abcdef", "md5" + "G" * 32, "md5" + "a" * 33])
def test_malformed_md5_hash(md5_hash: str) -> None:
    """An md5_hash that is not 'md5' + 32 hex digits is rejected naming the key."""
    message = rejected(config(users=f'[[users]]\nname = "bob"\nmd5_hash = "{md5_hash}"\n'))
    assert "users[0].md5_hash" in message, message


def test_md5_hash_alone_implies_md5() -> None:
    """A user with only md5_hash authenticates with md5."""
    cfg = parse_config(config(users='[[users]]\nname = "bob"\nmd5_hash = "md5' + "ab" * 16 + '"\n'))
    assert cfg.users[0].auth_method == "md5"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ('"500ms"', 0.5),
        ('"30s"', 30.0),
        ('"5m"', 300.0),
        ('"24h"', 86400.0),
        ("30", 30.0),
        ("2.5", 2.5),
        ('"1d"', 86400.0),
        ('"45"', 45.0),
    ],
)
def test_durations_parse(value: str, seconds: float) -> None:
    """Durations accept seconds as numbers and strings with ms/s/m/h/d units."""
    cfg = parse_config(
        config(
            pgleap=PGLEAP + f"shutdown_timeout = {value}\n",
            upgrade=UPGRADE + f"[auto_upgrade.validation]\nvalidation_duration = {value}\n",
        )
    )
    assert cfg.proxy.shutdown_timeout == pytest.approx(seconds)
    assert cfg.upgrades[0].validation.validation_duration == pytest.approx(seconds)


@pytest.mark.parametrize("value", ['"5 minutes"', '"soon"', '"10x"', "-3", '""', "true"])
def test_bad_duration(value: str) -> None:
    """A malformed or negative duration is rejected naming the key."""
    message = rejected(config(pgleap=PGLEAP + f"shutdown_timeout = {value}\n"))
    assert "pgleap.shutdown_timeout" in message, message


def test_tls_cert_without_key(tmp_path: Path) -> None:
    """tls_cert without tls_key (or the reverse) is rejected naming both keys."""
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    message = rejected(config(pgleap=PGLEAP + f'tls_cert = "{cert}"\n'))
    assert "tls_cert" in message and "tls_key" in message, message
    message = rejected(config(pgleap=PGLEAP + f'tls_key = "{cert}"\n'))
    assert "tls_cert" in message and "tls_key" in message, message


def test_tls_files_must_exist_relative_to_config(tmp_path: Path) -> None:
    """TLS paths resolve relative to the config file and must exist."""
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    path = tmp_path / "pgleap.toml"
    path.write_text(config(pgleap=PGLEAP + 'tls_cert = "cert.pem"\ntls_key = "key.pem"\n'))
    cfg = load_config(path)
    assert cfg.proxy.tls_cert == tmp_path.resolve() / "cert.pem"
    path.write_text(config(pgleap=PGLEAP + 'tls_cert = "cert.pem"\ntls_key = "missing.pem"\n'))
    with pytest.raises(ConfigError, match=r"pgleap\.tls_key.*does not exist"):
        load_config(path)


def test_fraction_out_of_range() -> None:
    """validation.error_threshold outside 0-1 is rejected naming the key."""
    message = rejected(config(upgrade=UPGRADE + "[auto_upgrade.validation]\nerror_threshold = 1.5\n"))
    assert "auto_upgrade[0].validation.error_threshold" in message, message


def test_invalid_toml() -> None:
    """Text that is not TOML is rejected as such, with the parser's location."""
    message = rejected(config() + "\n[pgleap\n")
    assert "not valid TOML" in message and "line" in message, message


def test_missing_file(tmp_path: Path) -> None:
    """load_config of a missing file names the path."""
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value) and "no such config file" in str(info.value)


def test_load_config_records_path(tmp_path: Path) -> None:
    """load_config keeps the resolved path, so RELOAD can re-read it."""
    path = tmp_path / "pgleap.toml"
    path.write_text(config())
    assert load_config(path).path == path.resolve()


def test_bypass_check_interval_is_a_positive_duration() -> None:
    """bypass_check_interval defaults to 5 s, takes a duration, and refuses 0 (a busy loop on the source)."""
    assert parse_config(config()).proxy.bypass_check_interval == 5.0
    cfg = parse_config(config(pgleap=PGLEAP + 'bypass_check_interval = "250ms"\n'))
    assert cfg.proxy.bypass_check_interval == 0.25
    assert "bypass_check_interval" in rejected(config(pgleap=PGLEAP + "bypass_check_interval = 0\n"))


def test_ddl_and_replay_keys() -> None:
    """ddl, replay_batch_size and on_apply_error: defaults, accepted values, and what a typo gets told."""
    proxy = parse_config(config()).proxy
    assert (proxy.ddl, proxy.replay_batch_size, proxy.on_apply_error) == ("replay", 200, "pause")
    cfg = parse_config(
        config(pgleap=PGLEAP + 'ddl = "queue"\nreplay_batch_size = 50\non_apply_error = "skip_and_resync"\n')
    ).proxy
    assert (cfg.ddl, cfg.replay_batch_size, cfg.on_apply_error) == ("queue", 50, "skip_and_resync")
    message = rejected(config(pgleap=PGLEAP + 'ddl = "allow"\n'))
    assert "ddl" in message and "block" in message and "queue" in message
    assert "replay_batch_size" in rejected(config(pgleap=PGLEAP + "replay_batch_size = 0\n"))
    assert "on_apply_error" in rejected(config(pgleap=PGLEAP + 'on_apply_error = "ignore"\n'))
    assert proxy.change_log_retain == 100_000
    assert parse_config(config(pgleap=PGLEAP + "change_log_retain = 500\n")).proxy.change_log_retain == 500
    assert "change_log_retain" in rejected(config(pgleap=PGLEAP + "change_log_retain = 0\n"))


def test_sync_keys_of_verification_and_splitting() -> None:
    """verify_chunk_rows, verify_chunks_per_round and split_policy: defaults, values, and what a typo gets told."""
    sync = parse_config(config()).upgrades[0].sync
    assert (sync.verify_chunk_rows, sync.verify_chunks_per_round, sync.split_policy) == (10000, 10, "makespan")
    table = '[auto_upgrade.sync]\nverify_chunk_rows = 500\nverify_chunks_per_round = 4\nsplit_policy = "always"\n'
    sync = parse_config(config(upgrade=UPGRADE + table)).upgrades[0].sync
    assert (sync.verify_chunk_rows, sync.verify_chunks_per_round, sync.split_policy) == (500, 4, "always")
    message = rejected(config(upgrade=UPGRADE + '[auto_upgrade.sync]\nsplit_policy = "sometimes"\n'))
    assert "split_policy" in message and "makespan" in message
    assert "verify_chunk_rows" in rejected(config(upgrade=UPGRADE + "[auto_upgrade.sync]\nverify_chunk_rows = 0\n"))


# -- [auto_upgrade.adapters] -------------------------------------------------------------------------------

ADAPTERS_RULES = """\
[auto_upgrade.adapters]
disable = ["force_parallel_mode"]
rules = [
  { name = "app_fn", since = 12, kind = "function", old = "old_total", new = "new_total" },
  { name = "col", since = "9.6", kind = "column", old = "waiting", new = "wait_event", relation = "pg_stat_activity" },
  { name = "ext_opt", since = "17", kind = "setting", old = "myext.old_opt", new = "myext.new_opt" },
]
"""


def test_adapters_default_all_builtin_rules_on() -> None:
    """Without the section every built-in rule is on, and the adapter the proxy would use is the built-in one."""
    from pgleap.upgrade.compat.adapters import ADAPTERS, adapter_for

    upgrade = parse_config(config()).upgrades[0]
    assert upgrade.adapters.enable == ("*",) and upgrade.adapters.rules == ()
    assert adapter_for(upgrade).rules == ADAPTERS
    assert adapter_for(upgrade).adapt("SELECT procpid FROM pg_stat_activity", 90125, 180000) == (
        "SELECT pid FROM pg_stat_activity"
    )


def test_adapters_user_rules_and_disabled_builtin() -> None:
    """User rules are read in the rules' data form; a disabled built-in rule no longer rewrites."""
    from pgleap.upgrade.compat.adapters import adapter_for

    upgrade = parse_config(config(extra=ADAPTERS_RULES)).upgrades[0]
    rules = {r.name: r for r in upgrade.adapters.rules}
    assert rules["app_fn"].since == 120000 and rules["col"].since == 90600 and rules["ext_opt"].since == 170000
    assert rules["col"].relation == "pg_stat_activity" and rules["app_fn"].relation is None
    adapter = adapter_for(upgrade)
    assert "force_parallel_mode" not in {r.name for r in adapter.rules}
    assert adapter.adapt("SET force_parallel_mode = on", 100000, 180000) == "SET force_parallel_mode = on"
    assert adapter.adapt("SELECT old_total(3)", 100000, 180000) == "SELECT new_total(3)"
    assert adapter.adapt("SELECT new_total(3)", 180000, 100000) == "SELECT old_total(3)"  # rollback direction
    assert adapter.adapt("SELECT old_total(3)", 120000, 180000) == "SELECT old_total(3)"  # 12 is not crossed
    assert adapter.adapt("SELECT waiting FROM pg_stat_activity", 90500, 100000) == (
        "SELECT wait_event FROM pg_stat_activity"
    )
    assert adapter.adapt("SHOW myext.old_opt", 100000, 170000) == "SHOW myext.new_opt"
    assert adapter.adapt("SELECT pg_current_xlog_location()", 90600, 180000) == "SELECT pg_current_wal_lsn()"
    assert adapter_for(upgrade) is adapter  # one adapter (and cache) per distinct config


def test_adapters_none_builtin() -> None:
    """enable = [] turns every built-in rule off; globs pick some."""
    from pgleap.upgrade.compat.adapters import adapter_for

    none = parse_config(config(extra="[auto_upgrade.adapters]\nenable = []\n")).upgrades[0]
    assert adapter_for(none).rules == ()
    xlog = parse_config(config(extra='[auto_upgrade.adapters]\nenable = ["xlog_*"]\n')).upgrades[0]
    assert {r.kind for r in adapter_for(xlog).rules} == {"function"} and len(adapter_for(xlog).rules) == 12


def rule(**changes: object) -> str:
    """A user rule as a TOML inline table: a valid function rule with fields changed (None: left out)."""
    fields: dict[str, object] = {"name": "r", "since": 12, "kind": "function", "old": "a_fn", "new": "b_fn"}
    fields.update(changes)
    items = [f"{k} = {json.dumps(v)}" for k, v in fields.items() if v is not None]
    return "{ " + ", ".join(items) + " }"


@pytest.mark.parametrize(
    ("section", "key", "words"),
    [
        ('enable = ["xlg_*"]', "adapters", "no built-in rule matches 'xlg_*'; the rules are pg_stat_activity_pid"),
        ('disable = ["nope"]', "adapters", "no built-in rule matches 'nope'"),
        ("enable = [1]", "adapters.enable", "list of built-in rule names or globs"),
        ('enable = "all"', "adapters.enable", "expected list"),
        ("rule = []", "adapters", "unknown key(s) rule"),
        ("rules = [1]", "adapters.rules[0]", "expected a table"),
        (f"rules = [{rule(kind=None)}]", "adapters.rules[0].kind", "required key is missing"),
        (f"rules = [{rule(kind='operator')}]", "adapters.rules[0].kind", "'operator' is not one of function"),
        (f"rules = [{rule(since=12.5)}]", "adapters.rules[0].since", "not a major; write 12"),
        (f"rules = [{rule(since=8)}]", "adapters.rules[0].since", "not a PostgreSQL major"),
        (f"rules = [{rule(since='9.7')}]", "adapters.rules[0].since", "not a PostgreSQL major"),
        (f"rules = [{rule(since='twelve')}]", "adapters.rules[0].since", "not a major"),
        (f"rules = [{rule(since=None)}]", "adapters.rules[0].since", "required key is missing"),
        (f"rules = [{rule(old='public.a_fn')}]", "adapters.rules[0].old", "unqualified function name"),
        (f"rules = [{rule(new='B_Fn')}]", "adapters.rules[0].new", "in lower case"),
        (f"rules = [{rule(new='a_fn')}]", "adapters.rules[0].new", "the same as old"),
        (f"rules = [{rule(kind='setting', new='a b')}]", "adapters.rules[0].new", "is not a setting name"),
        (f"rules = [{rule(name='r x')}]", "adapters.rules[0].name", "use letters, digits"),
        (f"rules = [{rule(relation='t')}]", "adapters.rules[0].relation", "only a column rule"),
        (f"rules = [{rule(kind='column')}]", "adapters.rules[0].relation", "needs the relation the column belongs to"),
        (f"rules = [{rule(kind='column', relation='s.t')}]", "adapters.rules[0].relation", "unqualified relation name"),
        (f"rules = [{rule(extra=1)}]", "adapters.rules[0]", "unknown key(s) extra"),
        (f"rules = [{rule(name='force_parallel_mode')}]", "adapters.rules[0].name", "a built-in rule's name"),
        (f"rules = [{rule()}, {rule(old='c_fn')}]", "adapters.rules[1].name", "the name of an earlier rule"),
        (
            f"rules = [{rule()}, {rule(name='s', new='d_fn')}]",
            "adapters.rules[1].old",
            "'a_fn' (function) is already renamed by rule r",
        ),
        (
            f"rules = [{rule(since=10, old='my_xlog', new='pg_switch_wal')}]",
            "adapters.rules[0].new",
            "already renamed by the built-in rule xlog_pg_switch_xlog; keep one (a built-in rule is turned off",
        ),
    ],
)
def test_adapters_bad_lines_are_named(section: str, key: str, words: str) -> None:
    """Each mistake in the adapters section is rejected with the key of the bad line and what is wrong."""
    message = rejected(config(extra=f"[auto_upgrade.adapters]\n{section}\n"))
    assert f"auto_upgrade[0].{key}" in message and words in message, message


def test_adapters_replacing_a_builtin_rule_once_it_is_disabled() -> None:
    """A user rule may take a built-in rule's names once that rule is off."""
    text = (
        '[auto_upgrade.adapters]\ndisable = ["xlog_pg_switch_xlog"]\n'
        'rules = [{ name = "x", since = 10, kind = "function", old = "my_xlog", new = "pg_switch_wal" }]\n'
    )
    upgrade = parse_config(config(extra=text)).upgrades[0]
    assert [r.name for r in upgrade.adapters.rules] == ["x"]
