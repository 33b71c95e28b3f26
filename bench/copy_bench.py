"""bench/copy.py: pgleap copy vs pg_dump/pg_restore vs pgcopydb vs the raw COPY floor, side by side in one run.

    .venv/bin/python bench/copy.py [--scale 30] [--wide-rows 500000] [--workers 2] [--rounds 1] [--profile]

A PostgreSQL 10 primary gets `pgbench -i -s <scale>` plus a `wide` table (text, numeric, timestamptz,
float8, json, bytea, int[]); a streaming replica of it is made, and a PostgreSQL 18 target. Then each
contender copies the database into a freshly created, empty target database on the same target server:

1. `pgleap copy` (its own process) reading from the replica at a paused-replay snapshot;
2. `pg_dump -Fd -j N` from the primary + `pg_restore -j N` (pre-data, data, post-data as three runs);
3. `pgcopydb clone --table-jobs N --index-jobs N` from the primary;
4. the physical floor: N parallel raw `COPY ... TO STDOUT | COPY ... FROM STDIN` psql pipes into a
   pre-created schema without indexes, then the index and primary-key builds, N at a time.

Each contender's result is checked (row count and per-column aggregates of every table, index count)
against the source. The last lines printed are `ratio_<a>_<b>_<what>: <x>`, one per ratio.

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pgleap
from _common import (
    LOCALHOST,
    BenchError,
    HostCpu,
    TimedRun,
    children_cpu_seconds,
    median,
    process_tree_cpu_seconds,
    progress,
    ratio,
    run_timed,
    stop_on_signals,
)
from _profile import find_py_spy, read_folded, summarize, write_folded
from pgleap.lab import Lab, LabServer, client_tool, wait_for_replay, wait_streaming
from pgleap.lab import config as lab_config
from pgleap.lab.osuser import give_to_server_user

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATABASE = "bench"
CONTENDERS = ("pgleap", "pgdump", "pgcopydb", "floor")
LABELS = {
    "pgleap": "pgleap copy (from the replica)",
    "pgdump": "pg_dump -Fd + pg_restore",
    "pgcopydb": "pgcopydb clone",
    "floor": "floor: raw COPY pipes + index builds",
}


def bulk_settings() -> dict[str, str]:
    """postgresql.conf for every server of the bench (fsync is already off in the lab): bulk-load friendly."""
    return {
        "shared_buffers": "512MB",
        "maintenance_work_mem": "512MB",  # index builds sort in memory
        "work_mem": "64MB",
        "max_wal_size": "8GB",  # no checkpoint in the middle of a load
        "min_wal_size": "1GB",
        "checkpoint_timeout": "30min",
        "checkpoint_completion_target": "0.9",
        "autovacuum": "off",  # no autovacuum racing the contenders on freshly loaded tables
        "max_connections": "100",
    }


# -- command line ------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The command line."""

    scale: int
    wide_rows: int
    workers: int
    rounds: int
    source_major: int
    target_major: int
    contenders: tuple[str, ...]
    floor_format: str
    profile: bool
    profile_rate: int
    pgleap_options: tuple[str, ...] = ()


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=30, help="pgbench -i -s")
    parser.add_argument("--wide-rows", type=int, default=500_000, help="rows of the wide table")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="parallelism of every contender (pgleap workers, -j, --table-jobs/--index-jobs, pipes)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="copies per contender, the order rotating from round to round (times: median)",
    )
    parser.add_argument("--source-major", type=int, default=10, help="PostgreSQL major of the source and replica")
    parser.add_argument("--target-major", type=int, default=18, help="PostgreSQL major of the target")
    parser.add_argument(
        "--contenders", default=",".join(CONTENDERS), help="comma-separated subset of " + ", ".join(CONTENDERS)
    )
    parser.add_argument(
        "--floor-format", choices=("binary", "text"), default="binary", help="COPY format of the floor's pipes"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the measured rounds, copy once more with pgleap under py-spy; "
        "writes bench/results/copy-pgleap.folded and copy-pgleap-top.txt",
    )
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument(
        "--pgleap-option",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `pgleap copy` (repeat it), e.g. "
        "--pgleap-option=--split-threshold-mb "
        "--pgleap-option=100000 to copy every table whole",
    )
    args = parser.parse_args(argv)
    contenders = tuple(c for c in args.contenders.split(",") if c)
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    if min(args.scale, args.workers, args.rounds) < 1 or args.wide_rows < 0:
        parser.error("--scale, --workers and --rounds must be positive, --wide-rows not negative")
    return Settings(
        scale=args.scale,
        wide_rows=args.wide_rows,
        workers=args.workers,
        rounds=args.rounds,
        source_major=args.source_major,
        target_major=args.target_major,
        contenders=contenders,
        floor_format=args.floor_format,
        profile=args.profile,
        profile_rate=args.profile_rate,
        pgleap_options=tuple(args.pgleap_option),
    )


# -- servers and the data set --------------------------------------------------------------


def libpq_env(server: LabServer) -> dict[str, str]:
    """Environment for a client program talking to a lab server: its password, no stray libpq variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=server.password, LC_ALL="C", PGCONNECT_TIMEOUT="10")
    return env


def conninfo(server: LabServer, dbname: str = DATABASE) -> str:
    """libpq keyword/value string without the password (that is in PGPASSWORD)."""
    return f"host={server.host} port={server.port} dbname={dbname} user={server.superuser}"


def uri(server: LabServer, dbname: str = DATABASE) -> str:
    """postgres:// URI with the password (pgcopydb takes URIs)."""
    return f"postgres://{server.superuser}:{server.password}@{server.host}:{server.port}/{dbname}"


def check_run(run: TimedRun, what: str) -> TimedRun:
    """Raise BenchError with the tail of its stderr when a setup command failed."""
    if run.returncode != 0:
        raise BenchError(
            f"{what} failed (exit {run.returncode}): {' '.join(run.argv)}\n{(run.stderr or run.stdout)[-3000:]}"
        )
    return run


WIDE_SQL = """
CREATE TABLE wide (
    id integer PRIMARY KEY,
    label text NOT NULL,
    amount numeric(14,4),
    created timestamptz NOT NULL,
    score float8,
    doc json,
    blob bytea,
    tags integer[]
);
INSERT INTO wide
SELECT i,
       'item ' || i || ' ' || repeat(md5(i::text), 6),
       (i * 1.2345)::numeric(14,4),
       timestamptz '2020-01-01 00:00:00+00' + i * interval '1 second',
       i::float8 * 0.37 / 7,
       json_build_object('id', i, 'name', 'customer ' || i, 'active', i % 2 = 0,
                         'tags', json_build_array('a', 'b', i % 10), 'note', md5((i * 3)::text)),
       decode(md5(i::text) || md5((i * 7)::text), 'hex'),
       ARRAY[i, i * 2, i % 1000, i % 7, i % 13]
FROM generate_series(1, {rows}) AS i;
CREATE INDEX wide_created ON wide (created);
"""


def load_dataset(primary: LabServer, settings: Settings, workdir: Path) -> None:
    """pgbench -i -s <scale> plus the wide table, vacuumed (hint bits set, visibility map) and checkpointed."""
    primary.psql(f"CREATE DATABASE {DATABASE}")
    progress(f"pgbench -i -s {settings.scale} on {primary.name} (port {primary.port}) ...")
    check_run(
        run_timed(
            [
                client_tool("pgbench"),
                "-i",
                "-q",
                "-s",
                str(settings.scale),
                "-h",
                LOCALHOST,
                "-p",
                str(primary.port),
                "-U",
                primary.superuser,
                DATABASE,
            ],
            env=libpq_env(primary),
            timeout=3600,
            log_path=workdir / "pgbench-init",
        ),
        "pgbench -i",
    )
    progress(f"wide table: {settings.wide_rows:,} rows ...")
    check_run(
        run_timed(
            [
                client_tool("psql"),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                conninfo(primary),
                "-c",
                WIDE_SQL.format(rows=settings.wide_rows),
            ],
            env=libpq_env(primary),
            timeout=3600,
        ),
        "creating the wide table",
    )
    primary.psql("VACUUM ANALYZE", DATABASE)
    primary.psql("CHECKPOINT")


def make_replica(lab: Lab, primary: LabServer) -> LabServer:
    """A streaming replica with the same settings as the primary (the lab's replica gets its defaults)."""
    progress("pg_basebackup: streaming replica of the source ...")
    replica = lab.replica(primary)
    lab_config.update_settings(replica.datadir, bulk_settings())
    lab.stop(replica)
    lab.start(replica)
    wait_streaming(primary, replica)
    wait_for_replay(primary, replica)
    return replica


# -- the source, and checking a copy -------------------------------------------------------


@dataclass
class SourceInfo:
    """Sizes and fingerprints of the source database."""

    tables: list[str]
    fingerprints: dict[str, str]
    rows: int
    table_bytes: int  # heap + TOAST (+ FSM/VM) of every table: what COPY moves
    index_bytes: int
    database_bytes: int
    indexes: int

    @property
    def table_mb(self) -> float:
        """table_bytes in MB (10^6)."""
        return self.table_bytes / 1e6


TABLES_SQL = (
    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY c.relname"
)
INDEXES_SQL = (
    "SELECT count(*) FROM pg_index x JOIN pg_class c ON c.oid = x.indrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
)
COLUMNS_SQL = (
    "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
    "WHERE a.attrelid = 'public.{table}'::regclass AND a.attnum > 0 AND NOT a.attisdropped "
    "ORDER BY a.attnum"
)


NUMBER_TYPES = ("integer", "bigint", "smallint", "double precision", "real")


def fingerprint_sql(server: LabServer, table: str) -> str:
    """One row per table, equal on source and target when the copy is right: the row count and, per column,
    the non-null count and a sum that reads the same on 10 and 18 (numbers as numeric, others by length)."""
    parts = ["count(*)::text"]
    for line in server.psql(COLUMNS_SQL.format(table=table), DATABASE).splitlines():
        name, type_name = line.split("|", 1)
        col = '"' + name.replace('"', '""') + '"'
        parts.append(f"count({col})::text")
        if type_name in NUMBER_TYPES or type_name.startswith("numeric"):
            parts.append(f"coalesce(sum({col}::numeric), 0)::text")
        elif type_name.startswith("timestamp"):
            # extract() is float8 on 10 and numeric on 14+: whole seconds and microseconds as integers.
            parts.append(f"coalesce(sum(extract(epoch FROM date_trunc('second', {col}))::bigint), 0)::text")
            parts.append(f"coalesce(sum(extract(microseconds FROM {col})::bigint), 0)::text")
        elif type_name in ("text", "bytea") or type_name.startswith("character"):
            parts.append(f"coalesce(sum(octet_length({col})), 0)::text")
        else:
            parts.append(f"coalesce(sum(octet_length({col}::text)), 0)::text")
    return f"SELECT concat_ws(' ', {', '.join(parts)}) FROM public.\"{table}\""


def describe_source(primary: LabServer) -> SourceInfo:
    """Tables, sizes and fingerprints of the source database (read on the primary)."""
    tables = primary.psql(TABLES_SQL, DATABASE).splitlines()
    fingerprints = {t: primary.psql(fingerprint_sql(primary, t), DATABASE) for t in tables}
    sizes = primary.psql(
        "SELECT coalesce(sum(pg_table_size(c.oid)), 0), coalesce(sum(pg_indexes_size(c.oid)), 0), "
        "pg_database_size(current_database()) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind = 'r'",
        DATABASE,
    )
    table_bytes, index_bytes, database_bytes = (int(v) for v in sizes.split("|"))
    return SourceInfo(
        tables=tables,
        fingerprints=fingerprints,
        rows=sum(int(f.split()[0]) for f in fingerprints.values()),
        table_bytes=table_bytes,
        index_bytes=index_bytes,
        database_bytes=database_bytes,
        indexes=int(primary.psql(INDEXES_SQL, DATABASE)),
    )


def check_copy(name: str, source: SourceInfo, primary: LabServer, target: LabServer) -> tuple[bool, str]:
    """Compare the target database with the source: every table's fingerprint, the number of indexes."""
    problems: list[str] = []
    target_tables = target.psql(TABLES_SQL, DATABASE).splitlines()
    if target_tables != source.tables:
        problems.append(f"tables {target_tables} != {source.tables}")
    equal = 0
    for table in source.tables:
        if table not in target_tables:
            continue
        got = target.psql(fingerprint_sql(primary, table), DATABASE)
        if got == source.fingerprints[table]:
            equal += 1
        else:
            problems.append(f"{table}: source [{source.fingerprints[table]}] target [{got}]")
    indexes = int(target.psql(INDEXES_SQL, DATABASE))
    if indexes != source.indexes:
        problems.append(f"{indexes} indexes, the source has {source.indexes}")
    summary = (
        f"{equal}/{len(source.tables)} tables with equal row counts and column aggregates "
        f"({source.rows:,} rows), {indexes}/{source.indexes} indexes"
    )
    if problems:
        return False, f"check {name}: FAILED: {summary}; " + "; ".join(problems)
    return True, f"check {name}: OK: {summary}"


def reset_target(target: LabServer, primary: LabServer) -> None:
    """A fresh, empty target database; dirty pages of the previous contender written out first."""
    target.psql(f"DROP DATABASE IF EXISTS {DATABASE}")
    target.psql(f"CREATE DATABASE {DATABASE} TEMPLATE template0 ENCODING 'UTF8'")
    for server in (target, primary):
        server.psql("CHECKPOINT")
    os.sync()  # fsync is off: the kernel would otherwise write the last contender's files during this one
    time.sleep(1.0)


# -- the contenders -----------------------------------------------------------------------


@dataclass
class Result:
    """One copy by one contender."""

    name: str
    seconds: float = float("nan")
    data_seconds: float = float("nan")
    index_seconds: float = float("nan")
    other_seconds: float = float("nan")
    client_cpu: float = float("nan")
    own_cpu: float = float("nan")  # the contender's main process alone (pgleap: the Python process)
    host_busy: float = float("nan")
    source_cpu: float = float("nan")  # CPU of the source-side servers' processes (primary + replica)
    target_cpu: float = float("nan")  # CPU of the target server's processes
    details: list[str] = field(default_factory=list)
    check: str = ""
    ok: bool = False
    unavailable: str = ""  # why this contender could not run at all


@dataclass
class Env:
    """Everything a contender needs."""

    lab: Lab
    primary: LabServer
    replica: LabServer
    target: LabServer
    settings: Settings
    workdir: Path
    source: SourceInfo


def _tool(name: str, major: int) -> Path:
    return client_tool(name, min_major=major)


def pgleap_config(env: Env) -> str:
    """pgleap.toml for the copy: source = the primary, replica = Bob, target = Charles (all as superuser)."""

    def s(value: str) -> str:
        return json.dumps(value)

    lines = [
        "[pgleap]",
        f"listen_addr = {s(LOCALHOST)}",
        "listen_port = 6432",
        'admin_user = "bench_admin"',
        'admin_password = "bench-admin-secret"',
        "",
        # A client user is required by the config, though `pgleap copy` serves no clients.
        "[[users]]",
        'name = "bench"',
        'password = "bench-secret"',
        'auth_method = "scram-sha-256"',
        "",
        "[[auto_upgrade]]",
        f"database = {s(DATABASE)}",
    ]
    for prefix, server in (("source", env.primary), ("replica", env.replica), ("target", env.target)):
        lines += [
            f"{prefix}_host = {s(server.host)}",
            f"{prefix}_port = {server.port}",
            f"{prefix}_database = {s(DATABASE)}",
            f"{prefix}_user = {s(server.superuser)}",
            f"{prefix}_password = {s(server.password)}",
        ]
    lines += ["", "[auto_upgrade.sync]", f"parallel_workers = {env.settings.workers}", ""]
    return "\n".join(lines)


def pgleap_executable() -> Path:
    """The `pgleap` console script of the running venv."""
    path = Path(sys.executable).parent / "pgleap"
    if not path.exists():
        raise BenchError(f"{path} not found; install pgleap into the venv (pip install -e .)")
    return path


def pgleap_argv(env: Env, tag: str) -> tuple[list[str], Path]:
    """`pgleap copy` argv with a fresh state store; returns it and the store's path."""
    config = env.workdir / "pgleap.toml"
    config.write_text(pgleap_config(env))
    state = env.workdir / f"pgleap-state-{tag}.db"
    for path in env.workdir.glob(f"pgleap-state-{tag}*"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return [
        str(pgleap_executable()),
        "copy",
        "-c",
        str(config),
        "--state",
        str(state),
        "--no-progress",
        "--workers",
        str(env.settings.workers),
        *env.settings.pgleap_options,
    ], state


def read_store(state: Path) -> tuple[dict[str, float], list[tuple[str, str, int, int, float]]]:
    """Per-step seconds and per-chunk (id, kind, rows, bytes, seconds) from pgleap's state store."""
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    try:
        steps = {
            step: finished - started
            for step, started, finished in db.execute(
                "SELECT step, started_at, finished_at FROM copy_step WHERE finished_at IS NOT NULL ORDER BY started_at"
            )
        }
        chunks = [
            (str(c), str(k), int(r), int(b), float(s))
            for c, k, r, b, s in db.execute(
                "SELECT chunk_id, kind, rows, bytes, seconds FROM copy_chunk ORDER BY finished_at"
            )
        ]
    finally:
        db.close()
    return steps, chunks


def read_step_spans(state: Path) -> float:
    """Wall seconds covered by the copy's steps, from the first start to the last finish."""
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    try:
        first, last = db.execute("SELECT min(started_at), max(finished_at) FROM copy_step").fetchone()
    finally:
        db.close()
    return float(last - first) if first is not None and last is not None else 0.0


def resume_replay(replica: LabServer) -> None:
    """Resume replay on the replica if a failed pgleap run left it paused."""
    with contextlib.suppress(Exception):
        replica.psql("SELECT pg_wal_replay_resume()" if replica.major >= 10 else "SELECT pg_xlog_replay_resume()")


def run_pgleap(env: Env) -> Result:
    """`pgleap copy` from the replica, its own process."""
    argv, state = pgleap_argv(env, "measured")
    run = run_timed(argv, env={**os.environ, "LC_ALL": "C"}, timeout=7200, log_path=env.workdir / "pgleap")
    result = Result("pgleap", seconds=run.seconds, client_cpu=run.tree_cpu_seconds, own_cpu=run.self_cpu_seconds)
    if run.returncode != 0:
        resume_replay(env.replica)
        raise BenchError(f"pgleap copy failed (exit {run.returncode}):\n{(run.stderr + run.stdout)[-3000:]}")
    all_steps, chunks = read_store(state)
    # "post_data <table>" (keys + ANALYZE of one table, overlapping the data step) and "analyze <table>"
    # are per-table entries; the others are the copy's steps. Some steps run concurrently (roles and
    # dump; large_objects and sequences), so the start-up line is the wall time outside every step.
    steps = {k: v for k, v in all_steps.items() if " " not in k}
    per_table = {k.split(" ", 1)[1]: v for k, v in all_steps.items() if k.startswith("post_data ")}
    result.data_seconds = steps.get("data", 0.0)
    result.index_seconds = steps.get("post_data", 0.0)
    result.other_seconds = run.seconds - result.data_seconds - result.index_seconds
    spans = read_step_spans(state)
    result.details.append(
        "steps: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in steps.items())
        + f"; process start-up, config and exit (outside every step) {run.seconds - spans:.2f}s"
    )
    if per_table:
        result.details.append(
            "  keys + ANALYZE per table, each started once its data was in (overlapping the data step; "
            "index s is only the post_data step that waited for the last ones): "
            + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(per_table.items(), key=lambda kv: -kv[1]))
        )
    by_table: dict[str, list[tuple[str, str, int, int, float]]] = {}
    for chunk in chunks:
        by_table.setdefault(chunk[0].split("#")[0], []).append(chunk)
    for table, parts in sorted(by_table.items(), key=lambda kv: -sum(c[3] for c in kv[1])):
        rows, nbytes, secs = sum(c[2] for c in parts), sum(c[3] for c in parts), sum(c[4] for c in parts)
        result.details.append(
            f"  {table}: {len(parts)} chunk(s) ({parts[0][1]}), {rows:,} rows, {nbytes / 1e6:.1f} MB of COPY data, "
            f"{secs:.2f}s summed over chunks ({nbytes / 1e6 / secs if secs else 0:.1f} MB/s per session)"
            + ("; chunk seconds " + " ".join(f"{c[4]:.2f}" for c in parts) if len(parts) > 1 else "")
        )
    result.details.append(
        f"pgleap process CPU {run.self_cpu_seconds:.2f}s (its pg_dump/pg_restore/pg_dumpall "
        f"children included: {run.tree_cpu_seconds:.2f}s)"
    )
    for line in (run.stdout.strip().splitlines())[:3]:
        result.details.append(f"  | {line}")
    return result


def run_pgdump(env: Env) -> Result:
    """pg_dump -Fd -j N from the primary, then pg_restore: pre-data, data -j N, post-data -j N."""
    jobs = str(env.settings.workers)
    dump_dir = env.workdir / "dump"
    shutil.rmtree(dump_dir, ignore_errors=True)
    pg_dump = _tool("pg_dump", env.settings.target_major)
    pg_restore = _tool("pg_restore", env.settings.target_major)
    phases: list[tuple[str, TimedRun]] = []
    phases.append(
        (
            "pg_dump",
            check_run(
                run_timed(
                    [pg_dump, "-Fd", "-j", jobs, "-f", dump_dir, "-d", conninfo(env.primary)],
                    env=libpq_env(env.primary),
                    timeout=7200,
                ),
                "pg_dump",
            ),
        )
    )
    for section, section_jobs in (("pre-data", None), ("data", jobs), ("post-data", jobs)):
        argv: list[str | Path] = [pg_restore, "--section", section, "-d", conninfo(env.target), "--exit-on-error"]
        if section_jobs:
            argv += ["-j", section_jobs]
        phases.append(
            (
                f"pg_restore {section}",
                check_run(
                    run_timed([*argv, dump_dir], env=libpq_env(env.target), timeout=7200),
                    f"pg_restore --section={section}",
                ),
            )
        )
    seconds = {name: run.seconds for name, run in phases}
    result = Result("pgdump", seconds=sum(seconds.values()), client_cpu=sum(run.tree_cpu_seconds for _, run in phases))
    result.data_seconds = seconds["pg_dump"] + seconds["pg_restore data"]
    result.index_seconds = seconds["pg_restore post-data"]
    result.other_seconds = seconds["pg_restore pre-data"]
    dump_mb = sum(p.stat().st_size for p in dump_dir.iterdir()) / 1e6
    result.details.append(
        "phases: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items())
        + f"; dump directory {dump_mb:.1f} MB (default compression)"
    )
    shutil.rmtree(dump_dir, ignore_errors=True)
    return result


_PGCOPYDB_STEP = re.compile(r"^\s*(.+?)\s{2,}(source|target|both)\s+(\S+)\s+(\S.*?)\s*$")


def parse_pgcopydb_duration(text: str) -> float:
    """pgcopydb's durations: '310ms', '1s234', '2m03s', '1h02m' -> seconds (NaN when unknown)."""
    if text.endswith("ms") and text[:-2].isdigit():
        return int(text[:-2]) / 1000
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(\d+)?", text)
    if not match or not text:
        return float("nan")
    hours, minutes, secs, millis = (int(g) if g else 0 for g in match.groups())
    if not match.group(3) and match.group(4):  # '2m03' style: the tail is seconds
        return hours * 3600 + minutes * 60 + int(match.group(4))
    return hours * 3600 + minutes * 60 + secs + millis / 1000


def find_pgcopydb() -> Path | None:
    """/usr/bin/pgcopydb, a PostgreSQL bindir's, or PATH's."""
    candidates = [Path("/usr/bin/pgcopydb"), *sorted(Path("/usr/lib/postgresql").glob("*/bin/pgcopydb"))]
    found = shutil.which("pgcopydb")
    if found:
        candidates.append(Path(found))
    return next((c for c in candidates if c.exists()), None)


def run_pgcopydb(env: Env) -> Result:
    """pgcopydb clone from the primary (it exports its snapshot there) with the target's pg_dump/pg_restore."""
    binary = find_pgcopydb()
    if binary is None:
        return Result("pgcopydb", unavailable="pgcopydb is not installed (Debian: apt-get install -y pgcopydb)")
    version = [
        line
        for line in subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.splitlines()
        if line.startswith("pgcopydb version")
    ]
    workdir = env.workdir / "pgcopydb"
    shutil.rmtree(workdir, ignore_errors=True)
    bindir = _tool("pg_dump", env.settings.target_major).parent
    tool_env = libpq_env(env.target)
    tool_env.pop("PGPASSWORD")
    tool_env["PATH"] = f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"  # pg_dump/pg_restore of the target
    tool_env["PG_CONFIG"] = str(bindir / "pg_config")
    jobs = str(env.settings.workers)
    run = run_timed(
        [
            binary,
            "clone",
            "--source",
            uri(env.primary),
            "--target",
            uri(env.target),
            "--dir",
            workdir,
            "--table-jobs",
            jobs,
            "--index-jobs",
            jobs,
        ],
        env=tool_env,
        timeout=7200,
        log_path=env.workdir / "pgcopydb-log",
    )
    if run.returncode != 0:
        errors = [line for line in run.stderr.splitlines() if "ERROR" in line or "FATAL" in line]
        return Result(
            "pgcopydb",
            unavailable=f"pgcopydb clone exited {run.returncode} against PostgreSQL "
            f"{env.primary.install.version} -> {env.target.install.version}: "
            + (" | ".join(errors[-5:]) or run.stderr.strip()[-800:]),
        )
    steps: dict[str, float] = {}
    for line in run.stdout.splitlines():
        match = _PGCOPYDB_STEP.match(line)
        if match:
            steps[match.group(1).strip()] = parse_pgcopydb_duration(match.group(3))
    result = Result("pgcopydb", seconds=run.seconds, client_cpu=run.tree_cpu_seconds)
    copy_cumulative = steps.get("COPY (cumulative)", float("nan"))
    index_cumulative = steps.get("CREATE INDEX, CONSTRAINTS (cumulative)", float("nan"))
    result.details.append(
        f"{(version or ['pgcopydb ?'])[-1]}; its summary: " + ", ".join(f"{k} {v:.2f}s" for k, v in steps.items())
    )
    result.details.append(
        f"  COPY, CREATE INDEX and VACUUM ANALYZE overlap (table by table): data and index "
        f"columns are pgcopydb's cumulative COPY {copy_cumulative:.2f}s and CREATE INDEX "
        f"{index_cumulative:.2f}s divided by {jobs} jobs"
    )
    result.data_seconds = copy_cumulative / env.settings.workers
    result.index_seconds = index_cumulative / env.settings.workers
    shutil.rmtree(workdir, ignore_errors=True)
    return result


FLOOR_INDEXES_SQL = """
SELECT CASE WHEN con.oid IS NOT NULL
            THEN 'ALTER TABLE ONLY ' || c.oid::regclass::text || ' ADD CONSTRAINT ' || quote_ident(con.conname)
                 || ' ' || pg_get_constraintdef(con.oid)
            ELSE pg_get_indexdef(i.oid) END
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class c ON c.oid = x.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_constraint con ON con.conindid = i.oid AND con.conrelid = c.oid AND con.contype IN ('p', 'u', 'x')
WHERE n.nspname = 'public'
ORDER BY pg_relation_size(c.oid) DESC, i.relname
"""

_PIPE = 'set -o pipefail; "$PSQL" -X -q -d "$SRC" -c "$OUT" | "$PSQL" -X -q -d "$DST" -c "$IN"'


def _parallel(jobs: list[tuple[str, Callable[[], TimedRun]]], workers: int) -> list[tuple[str, TimedRun]]:
    """Run labelled callables `workers` at a time, in list order; the first error is raised once all stopped."""
    pending: queue.Queue[tuple[str, Callable[[], TimedRun]]] = queue.Queue()
    for job in jobs:
        pending.put(job)
    results: list[tuple[str, TimedRun]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        while not errors:
            try:
                label, job = pending.get_nowait()
            except queue.Empty:
                return
            try:
                run = job()
            except BaseException as exc:  # re-raised in the main thread
                with lock:
                    errors.append(exc)
                return
            with lock:
                results.append((label, run))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _index_name(statement: str) -> str:
    match = re.search(r"(?:CONSTRAINT|INDEX) (\S+)", statement)
    return match.group(1) if match else statement[:40]


def run_floor(env: Env) -> Result:
    """N parallel psql COPY pipes (largest table first) into a schema without indexes, then the index builds."""
    psql = _tool("psql", env.settings.target_major)
    pg_dump = _tool("pg_dump", env.settings.target_major)
    # Schema without indexes and constraints (untimed): the pre-data section.
    schema = env.workdir / "pre-data.sql"
    check_run(
        run_timed(
            [pg_dump, "--schema-only", "--section=pre-data", "-f", schema, "-d", conninfo(env.primary)],
            env=libpq_env(env.primary),
            timeout=600,
        ),
        "pg_dump --section=pre-data",
    )
    check_run(
        run_timed(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo(env.target), "-f", schema],
            env=libpq_env(env.target),
            timeout=600,
        ),
        "restoring the pre-data schema",
    )
    tables = env.primary.psql(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY pg_table_size(c.oid) DESC",
        DATABASE,
    ).splitlines()
    statements = env.primary.psql(FLOOR_INDEXES_SQL, DATABASE).splitlines()
    fmt = " (FORMAT binary)" if env.settings.floor_format == "binary" else ""
    pipe_env = {**libpq_env(env.target), "PSQL": str(psql), "SRC": conninfo(env.primary), "DST": conninfo(env.target)}

    def pipe(table: str) -> Callable[[], TimedRun]:
        quoted = f'public."{table}"'
        return lambda: check_run(
            run_timed(
                ["bash", "-c", _PIPE],
                env={**pipe_env, "OUT": f"COPY {quoted} TO STDOUT{fmt}", "IN": f"COPY {quoted} FROM STDIN{fmt}"},
                timeout=7200,
            ),
            f"COPY pipe of {table}",
        )

    def build(statement: str) -> Callable[[], TimedRun]:
        return lambda: check_run(
            run_timed(
                [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo(env.target), "-c", statement],
                env=libpq_env(env.target),
                timeout=7200,
            ),
            f"index build: {statement}",
        )

    cpu_before, host_before, started = children_cpu_seconds(), HostCpu.read(), time.monotonic()
    data_runs = _parallel([(t, pipe(t)) for t in tables], env.settings.workers)
    data_seconds = time.monotonic() - started
    index_runs = _parallel([(_index_name(s), build(s)) for s in statements], env.settings.workers)
    seconds = time.monotonic() - started
    result = Result(
        "floor",
        seconds=seconds,
        data_seconds=data_seconds,
        index_seconds=seconds - data_seconds,
        other_seconds=0.0,
        client_cpu=children_cpu_seconds() - cpu_before,
        host_busy=HostCpu.read().busy_percent_since(host_before),
    )
    result.details.append(
        f"{len(tables)} tables through {env.settings.workers} psql | psql pipes "
        f"({env.settings.floor_format} COPY, whole tables, largest first), then "
        f"{len(statements)} "
        f"index/key builds {env.settings.workers} at a time; schema (pre-data) created "
        f"beforehand, untimed"
    )
    result.details.append("  pipes: " + ", ".join(f"{label} {run.seconds:.2f}s" for label, run in data_runs))
    result.details.append("  builds: " + ", ".join(f"{label} {run.seconds:.2f}s" for label, run in index_runs))
    return result


RUNNERS: dict[str, Callable[[Env], Result]] = {
    "pgleap": run_pgleap,
    "pgdump": run_pgdump,
    "pgcopydb": run_pgcopydb,
    "floor": run_floor,
}


def run_contender(env: Env, name: str) -> Result:
    """One copy by `name` into a fresh target database, checked against the source."""
    reset_target(env.target, env.primary)
    progress(f"{LABELS[name]} ...")
    host_before = HostCpu.read()
    source_before, target_before = server_cpu(env.primary, env.replica), server_cpu(env.target)
    result = RUNNERS[name](env)
    time.sleep(0.2)  # let the contender's backends exit, so that their CPU is counted in the postmaster's
    result.source_cpu = server_cpu(env.primary, env.replica) - source_before
    result.target_cpu = server_cpu(env.target) - target_before
    if result.unavailable:
        progress(f"{name}: n/a: {result.unavailable}")
        return result
    if result.host_busy != result.host_busy:
        result.host_busy = HostCpu.read().busy_percent_since(host_before)
    result.ok, result.check = check_copy(name, env.source, env.primary, env.target)
    progress(
        f"{name}: {result.seconds:.2f}s (data {result.data_seconds:.2f}s, "
        f"indexes {result.index_seconds:.2f}s); "
        f"{result.check}"
    )
    return result


def server_cpu(*servers: LabServer) -> float:
    """CPU seconds the servers' postmasters and all their backends (live or exited) have used so far."""
    return sum(process_tree_cpu_seconds(pid) for pid in (server.pid() for server in servers) if pid is not None)


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """`items` starting at index shift (mod len)."""
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def profile_pgleap(env: Env, measured: Result | None) -> str:
    """One more pgleap copy (not measured) under py-spy; writes the folded stacks and their summary."""
    reset_target(env.target, env.primary)
    RESULTS_DIR.mkdir(exist_ok=True)
    raw = RESULTS_DIR / "copy-pgleap.raw"
    argv, _ = pgleap_argv(env, "profiled")
    progress("pgleap copy under py-spy (not measured) ...")
    run = run_timed(
        [
            find_py_spy(),
            "record",
            "--rate",
            str(env.settings.profile_rate),
            "--format",
            "raw",
            "--output",
            raw,
            "--nonblocking",
            "--",
            *argv,
        ],
        env={**os.environ, "LC_ALL": "C"},
        timeout=7200,
        log_path=env.workdir / "py-spy",
    )
    if run.returncode != 0 or not raw.exists():
        resume_replay(env.replica)
        raise BenchError(f"py-spy record of pgleap copy failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    stacks: Counter[str] = read_folded(raw)
    raw.unlink()
    folded = RESULTS_DIR / "copy-pgleap.folded"
    write_folded(stacks, folded)
    cpu = 100.0 * measured.own_cpu / measured.seconds if measured and measured.seconds else float("nan")
    text = summarize(stacks, seconds=run.seconds, rate=env.settings.profile_rate, cpu_percent=cpu)
    (RESULTS_DIR / "copy-pgleap-top.txt").write_text(text + "\n")
    progress(f"profile: {folded} (speedscope.app or flamegraph.pl); summary in {RESULTS_DIR / 'copy-pgleap-top.txt'}")
    return f"pgleap copy under py-spy took {run.seconds:.2f}s\n{text}"


@dataclass
class Outcome:
    """Everything the report needs."""

    settings: Settings
    primary_version: str
    target_version: str
    source: SourceInfo
    results: dict[str, list[Result]]
    profile_text: str
    load_average: str


def run_benchmark(settings: Settings) -> Outcome:
    """Build the servers and the data set, run every contender `rounds` times, stop everything."""
    with open("/proc/loadavg") as handle:
        load = " ".join(handle.read().split()[:3])
    results: dict[str, list[Result]] = {name: [] for name in settings.contenders}
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="pgleap-bench-copy-") as tmp:
        workdir = Path(tmp)
        give_to_server_user(workdir)
        primary = lab.primary(settings.source_major, settings=bulk_settings())
        load_dataset(primary, settings, workdir)
        replica = make_replica(lab, primary)
        target = lab.target(settings.target_major, settings=bulk_settings())
        source = describe_source(primary)
        progress(
            f"source: {len(source.tables)} tables, {source.rows:,} rows, {source.table_mb:.1f} MB of tables, "
            f"{source.index_bytes / 1e6:.1f} MB of indexes"
        )
        env = Env(lab, primary, replica, target, settings, workdir, source)
        # Untimed warm-up: the target's first bulk write pays for creating its WAL segments (later ones
        # recycle them), and every cache (OS, replica) is warmed once, so no contender is penalised for
        # coming first.
        progress("warm-up (untimed): one floor copy into the target, and a read of every table on the replica")
        reset_target(target, primary)
        run_floor(env)
        for table in source.tables:
            replica.psql(f'SELECT count(*) FROM public."{table}"', DATABASE)
        for round_number in range(settings.rounds):
            for name in rotated(settings.contenders, round_number):
                results[name].append(run_contender(env, name))
        profile_text = ""
        if settings.profile:
            measured = median_result(results["pgleap"]) if results.get("pgleap") else None
            profile_text = profile_pgleap(env, measured)
        return Outcome(settings, primary.install.version, target.install.version, source, results, profile_text, load)


# -- reporting -----------------------------------------------------------------------------


def median_result(runs: list[Result]) -> Result:
    """The round with the median wall time (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.seconds)
    return ordered[(len(ordered) - 1) // 2]


def fmt(value: float, digits: int = 2) -> str:
    """A number, or '-' for NaN."""
    return "-" if value != value else f"{value:,.{digits}f}"


def report(outcome: Outcome) -> tuple[str, bool]:
    """The report (its last lines are the ratio lines) and whether every copy checked out."""
    s, src = outcome.settings, outcome.source
    lines = [
        f"pgleap {pgleap.__version__} copy bench: PostgreSQL {outcome.primary_version} primary + streaming replica "
        f"-> PostgreSQL {outcome.target_version}; {os.cpu_count()} CPUs, load average at start "
        f"{outcome.load_average}",
        f"data set: pgbench -i -s {s.scale} + wide ({s.wide_rows:,} rows: text, numeric, timestamptz, float8, "
        f"json, "
        f"bytea, int[]): {len(src.tables)} tables, {src.rows:,} rows, {src.table_mb:.1f} MB of tables "
        f"(heap + TOAST), "
        f"{src.index_bytes / 1e6:.1f} MB of indexes ({src.indexes}), database {src.database_bytes / 1e6:.1f} MB",
        f"parallelism {s.workers} for every contender"
        + (f" (pgleap copy {' '.join(s.pgleap_options)})" if s.pgleap_options else "")
        + f"; {s.rounds} round(s), order rotating (times: the median round); each copy into a fresh empty "
        "database on the same target; all servers: "
        + ", ".join(f"{k}={v}" for k, v in bulk_settings().items())
        + ", fsync=off (lab)",
        "MB/s = source table MB / wall; data = COPY phase, index = index/constraint builds, other = schema, "
        "roles, sequences, ANALYZE, start-up; CPU s = CPU seconds used by the contender's own processes "
        "(client), by the source servers' processes (primary + replica) and by the target server's",
        "",
    ]
    header = (
        f"{'contender':<40} {'wall s':>8} {'rows/s':>11} {'MB/s':>7} {'data s':>7} {'index s':>7} "
        f"{'other s':>7} {'CPU s: client':>13} {'source':>6} {'target':>6} {'host busy%':>10}"
    )
    lines += [header, "-" * len(header)]
    chosen: dict[str, Result] = {}
    all_ok = True
    for name in s.contenders:
        runs = outcome.results.get(name) or []
        if not runs:
            continue
        if runs[0].unavailable:
            lines.append(f"{LABELS[name]:<40} {'n/a':>8}  ({runs[0].unavailable})")
            continue
        best = median_result(runs)
        chosen[name] = best
        wall = median(r.seconds for r in runs)
        label = LABELS[name] + (f" -j{s.workers}" if name == "pgdump" else "")
        lines.append(
            f"{label:<40} {fmt(wall):>8} {fmt(src.rows / wall, 0):>11} {fmt(src.table_mb / wall, 1):>7} "
            f"{fmt(median(r.data_seconds for r in runs)):>7} {fmt(median(r.index_seconds for r in runs)):>7} "
            f"{fmt(median(r.other_seconds for r in runs)):>7} {fmt(median(r.client_cpu for r in runs)):>13} "
            f"{fmt(median(r.source_cpu for r in runs), 1):>6} {fmt(median(r.target_cpu for r in runs), 1):>6} "
            f"{fmt(median(r.host_busy for r in runs), 1):>10}"
            + (f"  (rounds: {', '.join(fmt(r.seconds) for r in runs)})" if len(runs) > 1 else "")
        )
    lines += ["", "details (median round):"]
    for name, result in chosen.items():
        lines.append(f"{name}:")
        lines += [f"  {d}" for d in result.details]
    if outcome.profile_text:
        lines += ["", outcome.profile_text]
    lines += [""]
    for name in s.contenders:
        for result in outcome.results.get(name) or []:
            if result.unavailable:
                lines.append(f"check {name}: not run: {result.unavailable}")
            else:
                lines.append(result.check)
                all_ok &= result.ok
    lines += ["", "ratios (wall time of the first / wall time of the second; below 1: the first is faster):"]
    for name, value in ratios(chosen, s.contenders):
        lines.append(f"{name}: {value}")
    return "\n".join(lines), all_ok


def ratios(chosen: dict[str, Result], contenders: Sequence[str]) -> list[tuple[str, str]]:
    """(name, '0.123' or 'n/a'), the three required pgleap wall ratios first."""

    def value(a: str, b: str, what: str = "seconds") -> str:
        if a not in chosen or b not in chosen:
            return "n/a"
        x = ratio(getattr(chosen[a], what), getattr(chosen[b], what))
        return "n/a" if x != x else f"{x:.3f}"

    pairs = [
        ("ratio_pgleap_pgdump_wall", value("pgleap", "pgdump")),
        ("ratio_pgleap_pgcopydb_wall", value("pgleap", "pgcopydb")),
        ("ratio_pgleap_floor_wall", value("pgleap", "floor")),
        ("ratio_pgleap_floor_data", value("pgleap", "floor", "data_seconds")),
        ("ratio_pgleap_floor_index", value("pgleap", "floor", "index_seconds")),
        ("ratio_pgdump_floor_wall", value("pgdump", "floor")),
        ("ratio_pgcopydb_floor_wall", value("pgcopydb", "floor")),
    ]
    if "pgleap" not in contenders:
        pairs = [p for p in pairs if not p[0].startswith("ratio_pgleap")]
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report; exit 1 when a contender's copy did not match the source."""
    settings = parse_args(argv)
    stop_on_signals()
    try:
        outcome = run_benchmark(settings)
    except BenchError as exc:
        print(f"bench/copy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/copy: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    text, ok = report(outcome)
    print(text, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
