"""Bulk copy on real servers: PG 10 (with a replica) -> 18 and PG 15 -> 17, compared row by row."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgleap.config import ServerConfig, UpgradeConfig
from pgleap.lab import Lab, LabServer
from pgleap.store import StateStore
from pgleap.upgrade.copy import CopyJob, CopyOptions, CopyReport
from pgleap.upgrade.copy.compare import compare_database, database_differences
from pgleap.upgrade.copy.connect import connect

pytestmark = pytest.mark.integration

DATASET = r"""
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE DOMAIN positive AS int CHECK (VALUE > 0);
CREATE TABLE wide (id serial PRIMARY KEY, f8 float8, f4 float4, ts timestamptz DEFAULT now(), t timestamp,
                   d date, iv interval, j json, jb jsonb, b bytea, a int[], ta text[], n numeric, tx text,
                   u uuid, ip inet, m mood, p positive, bo bool);
INSERT INTO wide (f8, f4, t, d, iv, j, jb, b, a, ta, n, tx, u, ip, m, p, bo)
SELECT i / 3.0, i / 7.0, '2020-01-01'::timestamp + i * interval '1 minute', '2020-01-01'::date + i % 500,
       i * interval '1 second', ('{"k": ' || i || ', "s": "x"}')::json, '{"b": [1, 2]}', decode(md5(i::text), 'hex'),
       ARRAY[i, i + 1], ARRAY['a' || i, NULL], i * 1.5, repeat('row ', i % 20) || i,
       md5(i::text)::uuid, '10.0.0.1', CASE WHEN i % 2 = 0 THEN 'sad' ELSE 'happy' END::mood, i, i % 3 = 0
FROM generate_series(1, 6000) i;
INSERT INTO wide (f8, tx) VALUES ('NaN', 'nan'), ('Infinity', 'inf'), (1e-300, 'tiny'), (NULL, NULL);
CREATE TABLE nopk (x int, y text);
INSERT INTO nopk SELECT i % 50, 'dup' FROM generate_series(1, 500) i;
CREATE TABLE parent (id int, v text);
CREATE TABLE child (extra int) INHERITS (parent);
INSERT INTO parent VALUES (1, 'parent row');
INSERT INTO child VALUES (2, 'child row', 5);
CREATE TABLE meas (id int, d date, v int) PARTITION BY RANGE (d);
CREATE TABLE meas_a PARTITION OF meas FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
CREATE TABLE meas_b PARTITION OF meas FOR VALUES FROM ('2021-01-01') TO ('2022-01-01');
INSERT INTO meas SELECT i, '2020-06-01'::date + i, i FROM generate_series(1, 400) i;
CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY, v text);
INSERT INTO scratch VALUES (1, 'unlogged');
CREATE TABLE refs (id int PRIMARY KEY, wide_id int REFERENCES wide (id), CHECK (id > 0));
INSERT INTO refs SELECT i, i FROM generate_series(1, 100) i;
CREATE INDEX wide_tx ON wide (tx);
CREATE UNIQUE INDEX wide_u ON wide (u);
CREATE VIEW small_wide AS SELECT id, tx FROM wide WHERE id < 10;
CREATE MATERIALIZED VIEW wide_count AS SELECT count(*) AS n FROM wide;
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER wide_touch BEFORE UPDATE ON wide FOR EACH ROW EXECUTE PROCEDURE touch();
CREATE SEQUENCE counter START 100;
SELECT nextval('counter'), nextval('counter');
SELECT lo_from_bytea(0, 'a large object');
CREATE ROLE app_owner LOGIN PASSWORD 'owner-secret';
CREATE TABLE owned (id int PRIMARY KEY);
ALTER TABLE owned OWNER TO app_owner;
"""

OBJECTS = {
    "indexes": (
        "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' AND indexname IN "
        "('wide_pkey', 'wide_tx', 'wide_u', 'refs_pkey', 'owned_pkey')",
        5,
    ),
    "constraints": (
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'refs'::regclass AND contype IN ('p', 'f', 'c')",
        3,
    ),
    "views": ("SELECT count(*) FROM pg_views WHERE viewname = 'small_wide'", 1),
    "functions": ("SELECT count(*) FROM pg_proc WHERE proname = 'touch'", 1),
    "triggers": ("SELECT count(*) FROM pg_trigger WHERE tgname = 'wide_touch'", 1),
    "matview rows": ("SELECT n FROM wide_count", 6004),
    "large object": ("SELECT count(*) FROM pg_largeobject_metadata", 1),
    "owner": ("SELECT tableowner FROM pg_tables WHERE tablename = 'owned'", "app_owner"),
    "unlogged": ("SELECT relpersistence::text FROM pg_class WHERE relname = 'scratch'", "u"),
    # Statistics do not travel with a dump: each table and matview was analyzed on the target.
    "not analyzed": (
        "SELECT count(*) FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid "
        "WHERE c.relkind IN ('r', 'm') AND s.last_analyze IS NULL",
        0,
    ),
}


def server_config(server: LabServer, database: str = "app") -> ServerConfig:
    """The ServerConfig of a lab server (its superuser)."""
    return ServerConfig(
        host=server.host, port=server.port, database=database, user=server.superuser, password=server.password
    )


def run_copy(upgrade: UpgradeConfig, state: Path, **options: object) -> CopyReport:
    """Run a CopyJob to the end with small split sizes so tables get cut into ranges."""
    opts = CopyOptions(**{"parallel_workers": 2, "split_threshold_bytes": 200_000, "chunk_bytes": 200_000, **options})  # type: ignore[arg-type]
    store = StateStore(state)
    try:
        return asyncio.run(CopyJob(upgrade, store, opts).run())
    finally:
        store.close()


async def _check(source: ServerConfig, target: ServerConfig) -> list[str]:
    problems = []
    a = await connect(source, role="source")
    b = await connect(target, role="target")
    try:
        for diff in await compare_database(a, b):
            if not diff.equal:
                problems.append(
                    f"{diff.table}: {diff.source_rows} vs {diff.target_rows} rows; only source "
                    f"{diff.only_source[:3]}; only target {diff.only_target[:3]}"
                )
        for what, (query, expected) in OBJECTS.items():
            got = await b.fetchval(query)
            if got != expected:
                problems.append(f"{what}: {got!r} != {expected!r}")
        for seq in ("wide_id_seq", "counter"):
            src = await a.fetchval(f"SELECT last_value FROM {seq}")
            dst = await b.fetchval(f"SELECT last_value FROM {seq}")
            if src != dst:
                problems.append(f"sequence {seq}: {src} on the source, {dst} on the target")
    finally:
        await a.close()
        await b.close()
    return problems


def check_rows_equal(source: LabServer, target: LabServer) -> None:
    """Every table of the source equals the target's, row by row (multisets: duplicates count)."""
    problems = asyncio.run(database_differences(server_config(source), server_config(target)))
    assert not problems, "\n".join(problems)


def check_copy(source: LabServer, target: LabServer) -> None:
    """Every table equal row by row, and every kind of object present."""
    problems = asyncio.run(_check(server_config(source), server_config(target)))
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def pg10_pair(lab: Lab) -> Iterator[tuple[LabServer, LabServer]]:
    """A PG 10 primary (md5, like 9.x) with the dataset, and its streaming replica."""
    primary = lab.primary(10, auth="md5")
    primary.psql("CREATE DATABASE app")
    primary.psql(DATASET, dbname="app")
    replica = lab.replica(primary)
    yield primary, replica
    replica.stop()
    primary.stop()


def test_copy_10_to_18_from_replica(lab: Lab, pg10_pair: tuple[LabServer, LabServer], tmp_path: Path) -> None:
    primary, replica = pg10_pair
    target = lab.target(18)
    try:
        upgrade = UpgradeConfig(
            database="app", source=server_config(primary), replica=server_config(replica), target=server_config(target)
        )
        report = run_copy(upgrade, tmp_path / "state.db")
        assert report.mode == "replica" and not report.schema_errors
        check_copy(primary, target)
        # Replay was resumed at the end.
        assert replica.psql("SELECT pg_is_wal_replay_paused()") == "f"
        store = StateStore(tmp_path / "state.db")
        chunks = store.chunks("app")
        assert any(c.kind == "key" for c in chunks), "the wide table should have been split into key ranges"
        flags = {f"{c.schema_name}.{c.table_name}": c.flag_set for c in chunks}
        assert "no_pk" in flags["public.nopk"] and "unlogged" in flags["public.scratch"]
        assert "text_copy" in flags["public.wide"]  # enum and domain columns travel as text
        assert "public.meas" not in flags and "public.meas_a" in flags
        assert next(c for c in chunks if c.table_name == "scratch").snapshot  # read on the primary, own snapshot
        store.close()
    finally:
        target.stop()


def test_copy_15_to_17_from_primary(lab: Lab, tmp_path: Path) -> None:
    source = lab.primary(15)
    target = lab.target(17)
    try:
        source.psql("CREATE DATABASE app")
        source.psql(DATASET, dbname="app")
        upgrade = UpgradeConfig(database="app", source=server_config(source), target=server_config(target))
        report = run_copy(upgrade, tmp_path / "state.db")
        assert report.mode == "primary" and not report.schema_errors
        check_copy(source, target)
        # A second run starts over (dropping what it created) and still ends equal.
        again = run_copy(upgrade, tmp_path / "state.db")
        assert again.run_id == 2 and again.restart_reason
        check_copy(source, target)
    finally:
        target.stop()
        source.stop()


def test_copying_again_never_drops_a_target_that_replay_or_clients_write(lab: Lab, tmp_path: Path) -> None:
    """Once replay applies the log to the target (or clients were moved there), a second copy refuses."""
    from pgleap.upgrade.copy import CopyError

    source = lab.primary(15)
    target = lab.target(17)
    try:
        source.psql("CREATE DATABASE app")
        source.psql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)", dbname="app")
        upgrade = UpgradeConfig(database="app", source=server_config(source), target=server_config(target))
        oid_sql = "SELECT oid FROM pg_database WHERE datname = 'app'"
        run_copy(upgrade, tmp_path / "state.db")
        first = int(target.psql(oid_sql))
        run_copy(upgrade, tmp_path / "state.db")  # no upgrade recorded: copying again recreates the database
        second = int(target.psql(oid_sql))
        store = StateStore(tmp_path / "state.db")
        run = store.run("app")
        # Replay compares this with the database it connects to (test_replay: ..._created_again_under_it).
        assert run is not None and run.target_oid == second != first
        store.set_phase("app", "mirroring", "test: replay follows the source")
        store.close()
        with pytest.raises(CopyError, match="the upgrade is mirroring"):
            run_copy(upgrade, tmp_path / "state.db")
        store = StateStore(tmp_path / "state.db")
        store.set_phase("app", "rolled_back", "test")
        store.set_route("app", "target", "1:1:")
        store.close()
        with pytest.raises(CopyError, match="moved to the target"):
            run_copy(upgrade, tmp_path / "state.db")
        assert target.psql("SELECT count(*) FROM t", dbname="app") == "10"  # still there, never dropped
    finally:
        target.stop()
        source.stop()


def test_schema_error_stop_and_skip(lab: Lab, tmp_path: Path) -> None:
    """An object the target rejects is reported with its definition; stop stops, skip goes on."""
    from pgleap.upgrade.copy import SchemaObjectError, TargetNotEmptyError

    source = lab.primary(15)
    target = lab.target(17)
    try:
        source.psql("CREATE DATABASE app")
        source.psql(
            "CREATE TABLE ok (id int PRIMARY KEY); INSERT INTO ok VALUES (1);"
            "CREATE FUNCTION clash() RETURNS int LANGUAGE sql AS 'SELECT 1';",
            dbname="app",
        )
        upgrade = UpgradeConfig(database="app", source=server_config(source), target=server_config(target))
        target.psql("CREATE DATABASE app")
        target.psql("CREATE TABLE ok (x int)", dbname="app")
        with pytest.raises(TargetNotEmptyError, match="DROP DATABASE"):
            run_copy(upgrade, tmp_path / "state.db")
        # The target already has a function of that signature: CREATE FUNCTION is rejected there.
        target.psql("DROP TABLE ok; CREATE FUNCTION clash() RETURNS int LANGUAGE sql AS 'SELECT 2'", dbname="app")
        with pytest.raises(SchemaObjectError, match="clash"):
            run_copy(upgrade, tmp_path / "state.db", copy_roles=False)
        assert target.psql("SELECT count(*) FROM pg_class WHERE relname = 'ok'", dbname="app") == "0"
        report = run_copy(upgrade, tmp_path / "state2.db", copy_roles=False, on_schema_error="skip")
        assert len(report.schema_errors) == 1 and "clash" in report.schema_errors[0].object
        assert "already exists" in report.schema_errors[0].error
        assert "CREATE FUNCTION public.clash()" in report.schema_errors[0].definition
        assert target.psql("SELECT count(*) FROM ok", dbname="app") == "1"
    finally:
        target.stop()
        source.stop()


def test_post_data_error_stop_and_skip(lab: Lab, tmp_path: Path) -> None:
    """An index the target rejects while other tables still copy is reported on its own; stop, then skip."""
    from pgleap.upgrade.copy import SchemaObjectError

    source = lab.primary(15)
    target = lab.target(17)
    try:
        source.psql("CREATE DATABASE app")
        source.psql(
            "CREATE TABLE big (id int PRIMARY KEY, v text); "
            "INSERT INTO big SELECT i, 'v' || i FROM generate_series(1, 20000) i; "
            "CREATE INDEX big_v ON big (v); "
            "CREATE TABLE small (id int PRIMARY KEY, big_id int REFERENCES big (id)); "
            "INSERT INTO small SELECT i, i FROM generate_series(1, 100) i; "
            "CREATE INDEX small_clash ON small (big_id);",
            dbname="app",
        )
        upgrade = UpgradeConfig(database="app", source=server_config(source), target=server_config(target))

        async def clash(snapshot: str) -> None:
            # After the target was checked empty: a relation named like one of the source's indexes.
            conn = await connect(server_config(target), role="target")
            try:
                await conn.execute("CREATE SEQUENCE small_clash")
            finally:
                await conn.close()

        def copy(state: Path, on_schema_error: str) -> CopyReport:
            opts = CopyOptions(
                parallel_workers=2,
                split_threshold_bytes=200_000,
                chunk_bytes=200_000,
                copy_roles=False,
                on_schema_error=on_schema_error,
            )
            store = StateStore(state)
            try:
                return asyncio.run(CopyJob(upgrade, store, opts, on_snapshot=clash).run())
            finally:
                store.close()

        with pytest.raises(SchemaObjectError, match="small_clash"):
            copy(tmp_path / "stop.db", "stop")
        target.psql("DROP DATABASE app")
        report = copy(tmp_path / "skip.db", "skip")
        assert len(report.schema_errors) == 1
        error = report.schema_errors[0]
        assert error.section == "post-data"
        assert "small_clash" in error.object and "already exists" in error.error
        assert "CREATE INDEX small_clash" in error.definition
        # Everything else of post-data is there: both keys, the other index, the foreign key.
        assert (
            target.psql(
                "SELECT count(*) FROM pg_constraint WHERE conrelid IN ('big'::regclass, 'small'::regclass)",
                dbname="app",
            )
            == "3"
        )
        assert target.psql("SELECT count(*) FROM pg_indexes WHERE indexname = 'big_v'", dbname="app") == "1"
        check_rows_equal(source, target)
    finally:
        target.stop()
        source.stop()
