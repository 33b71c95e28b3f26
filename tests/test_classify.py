"""Statement classification for capture (pure logic, no server)."""

from __future__ import annotations

import pytest

from pgleap.upgrade.capture import Kind, classify


@pytest.mark.parametrize(
    ("sql", "kinds"),
    [
        ("select 1", [Kind.READ]),
        ("select now(), lower(x), count(*) from t where a = $1", [Kind.READ]),
        ("select * from t for update", [Kind.READ]),
        ("insert into t values (1) returning id", [Kind.WRITE]),
        ("update t set a = a + 1 where id = $1", [Kind.WRITE]),
        ("delete from t", [Kind.WRITE]),
        ("copy t (a, b) from stdin", [Kind.WRITE]),
        ("copy t to stdout", [Kind.READ]),
        ("select nextval('s')", [Kind.MAYBE_WRITE]),
        ("select my_schema.audit(1)", [Kind.MAYBE_WRITE]),
        ("call proc()", [Kind.MAYBE_WRITE]),
        ("do $$ begin perform 1; end $$", [Kind.MAYBE_WRITE]),
        ("execute prepared_insert(1)", [Kind.MAYBE_WRITE]),
        ("with gone as (delete from t returning *) select count(*) from gone", [Kind.WRITE]),
        ("explain analyze update t set a = 1", [Kind.WRITE]),
        ("explain update t set a = 1", [Kind.READ]),
        ("select * into t2 from t", [Kind.DDL]),
        ("create table t2 (a int)", [Kind.DDL]),
        ("alter table t add column c int", [Kind.DDL]),
        ("truncate t", [Kind.DDL]),
        ("create index concurrently i on t (a)", [Kind.DDL]),
        ("set search_path = app, public", [Kind.SESSION]),
        ("reset all", [Kind.SESSION]),
        ("discard all", [Kind.SESSION]),
        ("listen ch", [Kind.SESSION]),
        ("set constraints all deferred", [Kind.SESSION]),  # to the end of its transaction: replayed with it
        ("notify ch, 'x'", [Kind.READ]),
        ("vacuum analyze t", [Kind.UTILITY]),
        ("lock table t in exclusive mode", [Kind.UTILITY]),
        ("begin", [Kind.BEGIN]),
        ("start transaction isolation level serializable", [Kind.BEGIN]),
        ("commit", [Kind.COMMIT]),
        ("end", [Kind.COMMIT]),
        ("rollback", [Kind.ROLLBACK]),
        ("abort", [Kind.ROLLBACK]),
        ("savepoint a", [Kind.SAVEPOINT]),
        ("release savepoint a", [Kind.RELEASE]),
        ("rollback to savepoint a", [Kind.ROLLBACK_TO]),
        ("prepare transaction 'x'", [Kind.TWO_PHASE]),
        ("begin; update t set a = 1; commit", [Kind.BEGIN, Kind.WRITE, Kind.COMMIT]),
        ("", []),
    ],
)
def test_kinds(sql: str, kinds: list[Kind]) -> None:
    assert [info.kind for info in classify(sql)] == kinds


def test_unparseable_counts_as_write() -> None:
    """Old syntax pglast's grammar rejects (WITH OIDS was removed in 12) is captured, never dropped."""
    (info,) = classify("create table old_style (a int) with oids")
    assert info.kind is Kind.WRITE and info.command == "Unparseable" and info.writes


def test_statement_texts_and_relations_in_multi_statement_strings() -> None:
    infos = classify("select 'éé'; insert into app.accounts values (2); update t set a = 1; select 'ü'")
    texts = ["select 'éé'", "insert into app.accounts values (2)", "update t set a = 1", "select 'ü'"]
    assert [i.text for i in infos] == texts
    assert [i.relations for i in infos] == [(), ("app.accounts",), ("t",), ()]


@pytest.mark.parametrize(
    ("sql", "unrepeatable"),
    [
        ("update t set a = a + 1 where id = 7", False),
        ("update t set ts = now(), d = current_date where id = 7", False),  # pinned at replay
        ("delete from t where id in (select g from generate_series(1, 9) g order by g limit 5)", False),
        ("delete from t where id in (select g from generate_series(1, 9) g limit all)", False),
        ("update t set a = random() where id = 1", True),
        ("update t set u = gen_random_uuid(), c = clock_timestamp()", True),
        ("update t set changed_by = current_user where id = 1", True),
        ("delete from q where ctid in (select ctid from q limit 100)", True),
        ("delete from t where id in (select id from t limit 5)", True),
        ("delete from t where id in (select id from t offset 5)", True),
        ("delete from t where id in (select g from generate_series(1, 9) g order by g offset 5)", False),
        ("delete from t where id in (select g from generate_series(1, 9) g offset null)", False),
        ("update jobs set s = 1 where id = (select id from jobs order by id limit 1 for update skip locked)", True),
        ("delete from t where id in (select id from t tablesample system (1))", True),
        ("with d as (delete from t where id in (select id from t limit 3) returning *) select * from d", True),
        # A table read: replay in commit order may see a transaction the source's statement did not.
        ("update stats set total = (select count(*) from orders)", True),
        ("insert into t select * from u", True),
        ("delete from t using u where t.id = u.id", True),
        ("update t set a = t2.a from t t2 where t.id = t2.id", True),  # its own table, other rows
        ("update t set a = 1 where id in (select id from t where b = 2)", True),
        ("with x as (select 1 as a) insert into t select a from x", False),
        ("with d as (delete from q returning *) insert into log select * from d", False),
        ("insert into t select g from generate_series(1, 3) g", False),
        ("insert into t (a) values (1) returning (select max(x) from u)", False),
        ("insert into t values (1) on conflict (id) do update set a = excluded.a", False),
        ("with orders as (select * from orders where s = 1) update stats set n = (select count(*) from orders)", True),
        (
            "with i as (insert into t values (1) returning (select max(x) from u) m) insert into log select m from i",
            True,
        ),
        (
            "with recursive r(n) as (select 1 union all select n + 1 from r where n < 5) insert into t select n from r",
            False,
        ),
        ("with x as (select 1 as a), y as (select a from x) insert into t select a from y", False),
    ],
)
def test_writes_replay_cannot_repeat_exactly(sql: str, unrepeatable: bool) -> None:
    """Replay flags their tables for re-sync: run again on the target they may write other values or rows."""
    (info,) = classify(sql)
    assert info.writes and info.unrepeatable is unrepeatable


def test_a_write_names_the_functions_capture_does_not_know() -> None:
    """Replay asks the target which of them are volatile (a user's order-number function, say)."""
    (info,) = classify("update t set n = next_order_no(), m = lower(x), r = random() where id = 1")
    assert info.calls == ("next_order_no",) and info.unrepeatable
    (info,) = classify("with w as (insert into t select f(1) returning id) select count(*) from w")
    assert info.writes and info.calls == ("f",)


def test_merge_names_its_target() -> None:
    """Re-sync flags and the copy stitch (a table copied at its own snapshot) go by the relations written."""
    (info,) = classify("merge into app.t using s on t.id = s.id when not matched then insert values (s.id)")
    assert info.kind is Kind.WRITE and info.relations == ("app.t",)


def test_savepoint_names_and_settings() -> None:
    assert classify("rollback to savepoint sp_1")[0].savepoint == "sp_1"
    assert classify("set local timezone = 'UTC'")[0].setting == ("timezone", True)
    assert classify("set datestyle to iso")[0].setting == ("datestyle", False)


def test_results_are_cached_by_text() -> None:
    assert classify("select 42") is classify("select 42")


TEMPLATED = [
    "UPDATE pgbench_accounts SET abalance = abalance + -4021 WHERE aid = 77;",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 77, -4021, CURRENT_TIMESTAMP);",
    "  SELECT abalance FROM pgbench_accounts WHERE aid = 12 ; ",
    "INSERT INTO t (a, b) VALUES (1.5e3, 'it''s') ON CONFLICT (a) DO UPDATE SET b = 'x'",
    "SELECT nextval('orders_id_seq')",
    "SET LOCAL statement_timeout = 5000",
    "SAVEPOINT s1",
    "CREATE TEMP TABLE t2 AS SELECT 1",
    "ALTER TABLE items ADD COLUMN qty numeric(10,2) DEFAULT 0",
    "DELETE FROM t WHERE ts < now() - interval '3 days'",
]


@pytest.mark.parametrize("sql", TEMPLATED)
def test_template_cache_answers_as_a_full_parse(sql: str) -> None:
    """A one-statement string classified through its literal-free template gets what parsing it gives."""
    from pgleap.upgrade.capture.classify import _classify_text, template

    assert template(sql) is not None
    assert classify(sql) == _classify_text(sql)


@pytest.mark.parametrize(
    "sql",
    ['SELECT "it\'s" FROM t', "SELECT $$a;b$$", "INSERT INTO t VALUES ('a\\b')", "SELECT 1; SELECT 2", "SELECT 1 -- c"],
)
def test_strings_the_template_cannot_read_are_parsed_as_they_are(sql: str) -> None:
    from pgleap.upgrade.capture.classify import template

    assert template(sql) is None
