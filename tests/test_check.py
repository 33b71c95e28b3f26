"""pgleap check on real servers: a PG 10 database with 30+ incompatibilities against PG 17 and 18, a clean one,
the workload check, and the HTML report rendered in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgleap.config import ServerConfig
from pgleap.lab import Lab, LabServer
from pgleap.upgrade.check import CheckReport, Severity, run_check
from pgleap.upgrade.check.html import render_html

from conftest import pgbench_database

pytestmark = pytest.mark.integration

# Server-wide settings of the dirty source that later majors removed (the lab adds wal_keep_segments = 16).
DIRTY_SERVER_SETTINGS = {
    "vacuum_defer_cleanup_age": "10",
    "old_snapshot_threshold": "10min",
    "trace_recovery_messages": "debug1",
}

DIRTY_SCHEMA = r"""
CREATE TABLE t_oids (a int) WITH OIDS;
CREATE TABLE t_times (a abstime, b reltime, c tinterval);
CREATE TABLE t_reg (p regproc, o regoperator, c regclass);
CREATE TABLE t_sqlid (n information_schema.sql_identifier);
CREATE OPERATOR !!! (leftarg = int8, procedure = numeric_fac);
CREATE AGGREGATE array_accum (anyelement) (sfunc = array_append, stype = anyarray, initcond = '{}');
CREATE VIEW v_oids AS SELECT relname, relhasoids FROM pg_class;
CREATE VIEW v_consrc AS SELECT conname, consrc FROM pg_constraint;
CREATE VIEW v_adsrc AS SELECT adsrc FROM pg_attrdef;
CREATE VIEW v_pkey AS SELECT relname FROM pg_class WHERE relhaspkey;
CREATE VIEW v_agg AS SELECT proname FROM pg_proc WHERE proisagg;
CREATE VIEW v_lastsys AS SELECT datlastsysoid FROM pg_database;
CREATE VIEW v_bgw AS SELECT checkpoints_timed, buffers_backend FROM pg_stat_bgwriter;
CREATE FUNCTION f_backup() RETURNS text LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_start_backup('x'); RETURN 'ok'; END $$;
CREATE EXTENSION chkpass;
CREATE EXTENSION timetravel;
CREATE EXTENSION adminpack;
CREATE EXTENSION pgcrypto;
CREATE EXTENSION hstore;
CREATE EXTENSION "uuid-ossp";
CREATE UNLOGGED TABLE up (a int) PARTITION BY RANGE (a);
CREATE TABLE par (a int);
CREATE TABLE chi () INHERITS (par);
SET password_encryption = 'md5';
CREATE ROLE chk_md5 LOGIN PASSWORD 'not-secret';
CREATE ROLE chk_manager CREATEROLE;
ALTER ROLE chk_md5 SET replacement_sort_tuples = 1000;
ALTER DATABASE chk_dirty SET default_with_oids = on;
ALTER DATABASE chk_dirty SET standard_conforming_strings = off;
ALTER DATABASE chk_dirty SET operator_precedence_warning = on;
ALTER DATABASE chk_dirty SET force_parallel_mode = on;
ALTER DATABASE chk_dirty SET bytea_output = 'escape';
ALTER DATABASE chk_dirty SET password_encryption = 'md5';
CREATE TABLE lookup (k int, v int);
CREATE FUNCTION f_path(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 + 1';
CREATE FUNCTION f_lookup(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT v FROM lookup WHERE k = $1';
CREATE TABLE t_idx (a int);
CREATE INDEX t_idx_path ON t_idx (f_path(a));
CREATE INDEX t_idx_lookup ON t_idx (f_lookup(a));
CREATE MATERIALIZED VIEW mv AS SELECT f_path(a) AS b FROM t_idx;
"""

# What each rule must report, with its severity, and one object it must name (written out here, not read
# from the rules table, so that a wrong severity in the table fails the test).
E, W, I = Severity.ERROR, Severity.WARNING, Severity.INFO  # noqa: E741
EXPECTED_BOTH: dict[str, tuple[Severity, str]] = {
    "tables_with_oids": (E, "table public.t_oids"),
    "removed_type_abstime": (E, "public.t_times.a (abstime)"),
    "removed_type_reltime": (E, "public.t_times.b (reltime)"),
    "removed_type_tinterval": (E, "public.t_times.c (tinterval)"),
    "postfix_operators": (E, "operator public.!!!(bigint, NONE)"),
    "polymorphic_anyarray": (E, "aggregate public.array_accum(anyelement)"),
    "removed_column_pg_class_relhasoids": (E, "view public.v_oids"),
    "removed_column_pg_constraint_consrc": (E, "view public.v_consrc"),
    "removed_column_pg_attrdef_adsrc": (E, "view public.v_adsrc"),
    "removed_column_pg_class_relhaspkey": (E, "view public.v_pkey"),
    "removed_column_pg_proc_proisagg": (E, "view public.v_agg"),
    "removed_column_pg_database_datlastsysoid": (E, "view public.v_lastsys"),
    "removed_column_pg_stat_bgwriter_checkpoints": (E, "view public.v_bgw"),
    "removed_function_exclusive_backup": (E, "function public.f_backup() calls pg_start_backup"),
    "removed_extension_chkpass": (E, "extension chkpass"),
    "removed_extension_timetravel": (E, "extension timetravel"),
    "removed_extension_adminpack": (E, "extension adminpack"),
    "reg_type_columns": (W, "public.t_reg.p (regproc)"),
    "sql_identifier_columns": (W, "public.t_sqlid.n"),
    "md5_passwords": (W, "role chk_md5"),
    "createrole_roles": (W, "role chk_manager"),
    "maintenance_search_path": (W, "index public.t_idx_lookup calls public.f_lookup()"),
    "changed_default_standard_conforming_strings": (W, "standard_conforming_strings = off"),
    "changed_default_bytea_output": (W, "bytea_output = escape"),
    "changed_default_password_encryption": (I, "password_encryption = md5"),
    "removed_setting_replacement_sort_tuples": (W, "ALTER ROLE chk_md5: replacement_sort_tuples = 1000"),
    "removed_setting_default_with_oids": (W, "ALTER DATABASE chk_dirty: default_with_oids = on"),
    "removed_setting_operator_precedence_warning": (W, "ALTER DATABASE chk_dirty: operator_precedence_warning"),
    "removed_setting_force_parallel_mode": (W, "ALTER DATABASE chk_dirty: force_parallel_mode = on"),
    "removed_setting_wal_keep_segments": (W, "server (configuration file): wal_keep_segments = 16"),
    "removed_setting_vacuum_defer_cleanup_age": (W, "vacuum_defer_cleanup_age = 10"),
    "removed_setting_old_snapshot_threshold": (W, "old_snapshot_threshold"),
    "removed_setting_trace_recovery_messages": (W, "trace_recovery_messages = debug1"),
}
EXPECTED_18_ONLY: dict[str, tuple[Severity, str]] = {
    "inheritance_vacuum": (I, "table public.par (1 child)"),
    "unlogged_partitioned": (I, "table public.up"),
}

WIDE_TABLE = """
CREATE TABLE wide (
    id bigserial PRIMARY KEY, bid int REFERENCES pgbench_branches (bid), c_int2 int2, c_int4 int4 NOT NULL DEFAULT 0,
    c_numeric numeric(12, 2), c_float8 float8, c_text text, c_varchar varchar(50), c_char char(10),
    c_bool bool, c_date date, c_ts timestamp, c_tstz timestamptz DEFAULT now(), c_interval interval,
    c_time time, c_timetz timetz, c_bytea bytea, c_uuid uuid, c_json json, c_jsonb jsonb, c_inet inet,
    c_cidr cidr, c_macaddr macaddr, c_ints int4[], c_texts text[], c_point point, c_tsv tsvector,
    c_bit bit(8), c_varbit varbit, c_range int4range, c_regclass regclass, c_money money, c_xml xml,
    CHECK (c_int2 >= 0)
);
CREATE INDEX wide_text ON wide (lower(c_text));
CREATE VIEW wide_recent AS SELECT id, c_text FROM wide WHERE c_tstz > now() - interval '1 day';
CREATE FUNCTION wide_count() RETURNS bigint LANGUAGE sql STABLE AS 'SELECT count(*) FROM public.wide';
INSERT INTO wide (bid, c_int2, c_text, c_regclass)
    SELECT 1, g, 'row ' || g, 'pgbench_accounts' FROM generate_series(1, 100) g;
"""


def cfg(server: LabServer, database: str) -> ServerConfig:
    """The lab server's superuser on `database`."""
    return ServerConfig(server.host, server.port, database, server.superuser, server.password)


@pytest.fixture(scope="module")
def dirty10(lab: Lab) -> Iterator[LabServer]:
    """A PG 10 server (SCRAM) with removed settings in its configuration and database chk_dirty."""
    server = lab.primary(10, settings=DIRTY_SERVER_SETTINGS)
    server.psql("CREATE DATABASE chk_dirty")
    server.psql(DIRTY_SCHEMA, dbname="chk_dirty")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clean10(lab: Lab) -> Iterator[LabServer]:
    """A PG 10 server (SCRAM) whose configuration sets no removed setting to a non-default value."""
    # The lab writes wal_keep_segments = 16 for replicas; 0 is its default, what a server without it has.
    server = lab.primary(10, settings={"wal_keep_segments": "0"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clean_db(clean10: LabServer) -> Iterator[str]:
    """pgbench's schema plus a wide table of 30+ column types."""
    yield from pgbench_database(clean10, "chk_clean", 1, WIDE_TABLE)


@pytest.fixture(scope="module", params=[17, 18])
def target(request: pytest.FixtureRequest, lab: Lab) -> Iterator[LabServer]:
    """A target of each new major."""
    server = lab.target(request.param)
    yield server
    server.stop()


def expected_for(target: LabServer) -> dict[str, tuple[Severity, str]]:
    """The expected findings against this target: its major's rules, and the extensions it cannot install."""
    expected = dict(EXPECTED_BOTH)
    if target.major >= 18:
        expected.update(EXPECTED_18_ONLY)
    available = set(target.psql("SELECT name FROM pg_available_extensions").split())
    missing = sorted({"pgcrypto", "hstore", "uuid-ossp"} - available)
    if missing:
        expected["extension_unavailable"] = (E, f"extension {missing[0]}")
    return expected


def check(source: ServerConfig, target: ServerConfig, **kwargs: object) -> CheckReport:
    """run_check, synchronously."""
    return asyncio.run(run_check(source, target, **kwargs))  # type: ignore[arg-type]


def test_dirty_database_reports_each_incompatibility(dirty10: LabServer, target: LabServer) -> None:
    report = check(cfg(dirty10, "chk_dirty"), cfg(target, "postgres"))
    expected = expected_for(target)
    found = {f.rule.name: f for f in report.findings}
    print(f"\nPG 10 -> {target.major}: {len(found)} distinct incompatibilities, {report.counts()}")
    assert set(found) == set(expected), (
        f"missing: {sorted(set(expected) - set(found))}, unexpected: {sorted(set(found) - set(expected))}"
    )
    assert len(found) >= 25
    for name, (severity, obj) in expected.items():
        finding = found[name]
        assert finding.severity is severity, f"{name}: {finding.severity} instead of {severity}"
        assert any(obj in o for o in finding.objects), f"{name}: {obj!r} not in {finding.objects}"
        assert finding.rule.fix and finding.rule.reference.startswith("https://www.postgresql.org/docs/")
    # Precise, not just loud: the index whose function only adds 1, and the matview over it, are fine.
    assert not any("t_idx_path" in o or "mv" in o for o in found["maintenance_search_path"].objects)
    # plpgsql is on every server; hstore on the target is reachable from 1.4: no version finding.
    assert "extension_version" not in found


def test_clean_database_gets_no_report(clean10: LabServer, clean_db: str, target: LabServer) -> None:
    report = check(cfg(clean10, clean_db), cfg(target, "postgres"))
    assert report.findings == [], [f.as_dict() for f in report.findings]
    assert report.rules_checked >= 30
    assert report.clean


def test_cli_json_and_exit_codes(dirty10: LabServer, clean10: LabServer, clean_db: str, target: LabServer) -> None:
    def url(server: LabServer, db: str) -> str:
        return f"postgresql://{server.superuser}:{server.password}@{server.host}:{server.port}/{db}"

    def cli(source: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "pgleap.cli.main", "check", "--source", source]
        argv += ["--target", url(target, "postgres"), "--format", "json"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    dirty = cli(url(dirty10, "chk_dirty"))
    assert dirty.returncode == 1, dirty.stderr
    data = json.loads(dirty.stdout)
    assert {f["rule"] for f in data["findings"]} == set(expected_for(target))
    assert data["target"]["live"] and data["source"]["version_num"] // 10000 == 10
    clean = cli(url(clean10, clean_db))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout)["findings"] == []


def test_target_major_only(dirty10: LabServer) -> None:
    report = asyncio.run(run_check(cfg(dirty10, "chk_dirty"), target_major=17))
    names = {f.rule.name for f in report.findings}
    assert names == set(EXPECTED_BOTH), sorted(names ^ set(EXPECTED_BOTH))
    assert any("major only" in n for n in report.notes)


# -- the workload check ----------------------------------------------------------------------------------

# (query, expected status on 17, on 18): "fails" = works on PG 10, fails on the target.
WORKLOAD: list[tuple[str, str, str]] = [
    ("SELECT a FROM t_idx WHERE a = $1", "ok", "ok"),
    ("UPDATE t_idx SET a = a + 1 WHERE a = $1", "ok", "ok"),
    ("INSERT INTO t_idx VALUES (1)", "ok", "ok"),
    ("DELETE FROM t_idx WHERE a > 5", "ok", "ok"),
    ("SELECT relname FROM pg_class WHERE relkind = 'r' ORDER BY 1 LIMIT 5", "ok", "ok"),
    ("WITH x AS (SELECT 1 AS a) SELECT a FROM x", "ok", "ok"),
    ("SELECT count(*) FROM par", "ok", "ok"),
    ("SELECT b FROM mv", "ok", "ok"),
    ("SELECT f_path(3)", "ok", "ok"),
    ("SELECT p, o FROM t_reg", "ok", "ok"),
    ("SELECT 1", "ok", "ok"),
    ("SELECT 2", "ok", "ok"),  # same fingerprint as SELECT 1: checked once, counted twice
    ("SHOW work_mem", "ok", "ok"),
    ("SET statement_timeout = 1000", "ok", "ok"),
    ("SELECT relhasoids FROM pg_class", "fails", "fails"),
    ("SELECT relname FROM pg_class WHERE relhaspkey AND relname = $1", "fails", "fails"),
    ("SELECT consrc FROM pg_constraint", "fails", "fails"),
    ("SELECT datlastsysoid FROM pg_database", "fails", "fails"),
    ("SELECT checkpoints_timed FROM pg_stat_bgwriter", "fails", "fails"),
    ("SELECT pg_start_backup('nightly')", "fails", "fails"),
    ("SELECT now()::abstime", "fails", "fails"),
    ("SELECT * FROM t_times", "fails", "fails"),  # the target rejected the table
    ("SELECT oid, a FROM t_oids", "fails", "fails"),
    ("SELECT 5 !", "fails", "fails"),
    ("SELECT !! 5", "fails", "fails"),
    ("SET default_with_oids = on", "fails", "fails"),
    ("SET operator_precedence_warning = on", "fails", "fails"),
    ("SELECT digest('x', 'sha256')", "ok", "pgcrypto"),  # pgcrypto: fails where the target lacks it
    ("SELECT procpid FROM pg_stat_activity", "fails_on_source_too", "fails_on_source_too"),
    ("SELECT * FROM no_such_table", "fails_on_source_too", "fails_on_source_too"),
    ("CREATE TABLE x (a int)", "skipped", "skipped"),
    ("VACUUM t_idx", "skipped", "skipped"),
    ("BEGIN", "skipped", "skipped"),
]


def test_workload_finds_every_failing_query_and_no_other(dirty10: LabServer, target: LabServer, tmp_path: Path) -> None:
    has_pgcrypto = "pgcrypto" in target.psql("SELECT name FROM pg_available_extensions").split()
    column = 1 if target.major == 17 else 2
    expected = {}
    for row in WORKLOAD:
        status = row[column]
        expected[row[0]] = ("ok" if has_pgcrypto else "fails") if status == "pgcrypto" else status
    expected.pop("SELECT 2")
    before = dirty10.psql("SELECT count(*) FROM t_idx", dbname="chk_dirty")
    report = check(cfg(dirty10, "chk_dirty"), cfg(target, "postgres"), queries=[q for q, _, _ in WORKLOAD])
    assert report.workload is not None
    got = {q.sql: q.status for q in report.workload}
    assert got == expected, {q: (got.get(q), s) for q, s in expected.items() if got.get(q) != s}
    assert next(q for q in report.workload if q.sql == "SELECT 1").count == 2
    failing = {q.sql for q in report.failing_queries}
    print(f"\nworkload on {target.major}: {len(report.workload)} distinct, {len(failing)} failing")
    assert all(q.sqlstate and q.error for q in report.failing_queries)
    # Nothing ran for real: the source's table is unchanged, and the scratch database is gone.
    assert dirty10.psql("SELECT count(*) FROM t_idx", dbname="chk_dirty") == before
    assert target.psql("SELECT count(*) FROM pg_database WHERE datname LIKE 'pgleap_check_%'") == "0"
    # The trial restore names what the target rejected (the same objects the rules report).
    rejected = " ".join(r.object for r in report.rejected or [])
    assert "t_times" in rejected and "v_oids" in rejected and "array_accum" in rejected


# -- the HTML report in headless Chromium ----------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no chromium found: run scripts/setup (it installs the Debian package chromium)")


@pytest.mark.parametrize("target", [18], indirect=True)  # one screenshot is enough
def test_html_report_renders_in_headless_chromium(dirty10: LabServer, target: LabServer, tmp_path: Path) -> None:
    report = check(cfg(dirty10, "chk_dirty"), cfg(target, "postgres"), queries=[q for q, _, _ in WORKLOAD])
    page = tmp_path / "pgleap-check.html"
    page.write_text(render_html(report))
    text = page.read_text()
    # Self-contained: no stylesheet, script, image or font fetched from anywhere.
    for marker in ("<link", "<script", "<img", "@import", "url("):
        assert marker not in text, marker
    shot = tmp_path / "pgleap-check.png"
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    run = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1280,3000", "--hide-scrollbars", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 3000) and len(data) > 50_000, (width, height, len(data))
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert "Incompatibilities" in dom.stdout and "tables_with_oids" in dom.stdout and "Workload" in dom.stdout
    print(f"\nscreenshot: {shot} ({len(data)} bytes)")
