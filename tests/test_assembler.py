"""The transaction assembler: which statements of a session end up committed (pure logic)."""

from __future__ import annotations

from pgleap.store.records import CapturedTransaction
from pgleap.upgrade.capture import classify
from pgleap.upgrade.capture.transaction import Pending, TransactionAssembler

I, T, E = ord("I"), ord("T"), ord("E")  # noqa: E741 (the ReadyForQuery status bytes)


def run(assembler: TransactionAssembler, sql: str, tags: list[str | None], status: int) -> None:
    """Send a query string; each statement gets its tag (None = it failed, and the rest are skipped)."""
    infos = classify(sql)
    for info in infos:
        assembler.sending(info)
    for info, tag in zip(infos, tags, strict=False):
        if tag is None:
            assembler.failed_statement()
            break
        assembler.completed(Pending(info), tag)
    assembler.ready(status)


def take_committed(assembler: TransactionAssembler) -> list[CapturedTransaction]:
    return [e.transaction for e in assembler.take_ended() if e.committed and e.transaction is not None]


def committed_sql(assembler: TransactionAssembler) -> list[list[str]]:
    return [[s.sql for s in tx.statements] for tx in take_committed(assembler)]


def test_implicit_single_statement_commits() -> None:
    a = TransactionAssembler("app", 1)
    run(a, "insert into t values (1)", ["INSERT 0 1"], I)
    assert committed_sql(a) == [["insert into t values (1)"]]


def test_reads_are_not_logged() -> None:
    a = TransactionAssembler("app", 1)
    run(a, "select * from t", ["SELECT 3"], I)
    assert committed_sql(a) == []


def test_failed_implicit_multi_statement_string_logs_nothing() -> None:
    """An error in a multi-statement string rolls back the statements before it too."""
    a = TransactionAssembler("app", 1)
    run(a, "insert into t values (1); insert into t values (1/0)", ["INSERT 0 1", None], I)
    assert committed_sql(a) == []


def test_explicit_transaction_across_queries_with_savepoint_rollback() -> None:
    a = TransactionAssembler("app", 1)
    run(a, "begin", ["BEGIN"], T)
    run(a, "insert into t values (1)", ["INSERT 0 1"], T)
    run(a, "savepoint s1", ["SAVEPOINT"], T)
    run(a, "insert into t values (2)", ["INSERT 0 1"], T)
    run(a, "insert into t values (2)", [None], E)  # a duplicate key, say
    run(a, "rollback to savepoint s1", ["ROLLBACK"], T)
    run(a, "insert into t values (3)", ["INSERT 0 1"], T)
    assert committed_sql(a) == []  # nothing before COMMIT
    run(a, "commit", ["COMMIT"], I)
    assert committed_sql(a) == [["insert into t values (1)", "insert into t values (3)"]]


def test_release_keeps_statements() -> None:
    a = TransactionAssembler("app", 1)
    run(
        a,
        "begin; savepoint a; insert into t values (1); release savepoint a; commit",
        ["BEGIN", "SAVEPOINT", "INSERT 0 1", "RELEASE", "COMMIT"],
        I,
    )
    assert committed_sql(a) == [["insert into t values (1)"]]


def test_nested_savepoints_rollback_to_outer() -> None:
    a = TransactionAssembler("app", 1)
    run(
        a,
        "begin; insert into t values (1); savepoint a; insert into t values (2); savepoint b; "
        "insert into t values (3); rollback to savepoint a; insert into t values (4); commit",
        [
            "BEGIN",
            "INSERT 0 1",
            "SAVEPOINT",
            "INSERT 0 1",
            "SAVEPOINT",
            "INSERT 0 1",
            "ROLLBACK",
            "INSERT 0 1",
            "COMMIT",
        ],
        I,
    )
    assert committed_sql(a) == [["insert into t values (1)", "insert into t values (4)"]]


def test_rollback_and_failed_commit_log_nothing() -> None:
    a = TransactionAssembler("app", 1)
    run(a, "begin; insert into t values (1); rollback", ["BEGIN", "INSERT 0 1", "ROLLBACK"], I)
    run(a, "begin", ["BEGIN"], T)
    run(a, "insert into t values (1/0)", [None], E)
    run(a, "commit", ["ROLLBACK"], I)  # COMMIT of an aborted transaction answers ROLLBACK
    assert committed_sql(a) == []


def test_commit_inside_a_string_then_implicit_statement() -> None:
    """'begin; ...; commit; insert ...': two transactions, the second implicit."""
    a = TransactionAssembler("app", 1)
    run(
        a,
        "begin; insert into t values (1); commit; insert into t values (2)",
        ["BEGIN", "INSERT 0 1", "COMMIT", "INSERT 0 1"],
        I,
    )
    assert committed_sql(a) == [["insert into t values (1)"], ["insert into t values (2)"]]


def test_probe_values_travel_with_the_transaction() -> None:
    a = TransactionAssembler("app", 7)
    run(a, "begin; insert into t values (1)", ["BEGIN", "INSERT 0 1"], T)
    assert a.needs_probe()
    a.probe(12345, "2026-11-25 04:00:00+00", (("TimeZone", "UTC"),))
    run(a, "commit", ["COMMIT"], I)
    (tx,) = take_committed(a)
    assert (tx.txid, tx.source_now, tx.settings, tx.session_id, tx.database) == (
        12345,
        "2026-11-25 04:00:00+00",
        (("TimeZone", "UTC"),),
        7,
        "app",
    )
    assert tx.statements[0].tag == "INSERT 0 1"
    assert not a.needs_probe()  # a new transaction starts clean


def test_extended_parameters_and_copy_data_are_kept() -> None:
    a = TransactionAssembler("app", 1)
    (insert,) = classify("insert into t values ($1, $2)")
    a.sending(insert)
    a.completed(Pending(insert, params=(b"1", None), param_formats=(0,), param_types=(23, 25)), "INSERT 0 1")
    (copy,) = classify("copy t from stdin")
    a.completed(Pending(copy, copy_data=[b"1\n", b"2\n"]), "COPY 2")
    a.ready(I)
    (tx,) = take_committed(a)
    assert tx.statements[0].params == (b"1", None) and tx.statements[0].param_types == (23, 25)
    assert tx.statements[1].copy_data == b"1\n2\n" and tx.statements[1].tag == "COPY 2"


def test_set_local_is_replayed_but_not_set_local_client_encoding() -> None:
    """Replay re-runs a transaction's SET LOCAL; its session stays UTF-8, which capture re-encodes to."""
    a = TransactionAssembler("app", 1)
    run(a, "begin", ["BEGIN"], T)
    run(a, "set local statement_timeout = '5s'", ["SET"], T)
    run(a, "set local client_encoding = 'LATIN1'", ["SET"], T)
    run(a, "set local names 'LATIN1'", ["SET"], T)
    run(a, "insert into t values (1)", ["INSERT 0 1"], T)
    run(a, "commit", ["COMMIT"], I)
    assert committed_sql(a) == [["set local statement_timeout = '5s'", "insert into t values (1)"]]


def test_a_set_local_of_a_captured_setting_before_the_first_write_is_left_to_the_settings_read() -> None:
    """BEGIN; SET LOCAL search_path = a; SET search_path = b; INSERT: the INSERT ran under b, which the probe
    reads; the SET LOCAL replayed after the settings would put a back."""
    a = TransactionAssembler("app", 1)
    run(a, "begin", ["BEGIN"], T)
    run(a, "set local search_path = a", ["SET"], T)
    run(a, "set search_path = b", ["SET"], T)
    run(a, "insert into t values (1)", ["INSERT 0 1"], T)
    a.probe(5, "2020-01-01T00:00:00+00", (("search_path", "b"),))
    run(a, "commit", ["COMMIT"], I)
    (tx,) = take_committed(a)
    assert tx.settings == (("search_path", "b"),) and [s.sql for s in tx.statements] == ["insert into t values (1)"]


def test_a_read_only_transaction_with_set_local_logs_nothing() -> None:
    """SET LOCAL statement_timeout before reads is common: kept for replay only when the transaction writes."""
    a = TransactionAssembler("app", 1)
    run(a, "begin", ["BEGIN"], T)
    run(a, "set local statement_timeout = 5000", ["SET"], T)
    run(a, "select * from t", ["SELECT 3"], T)
    run(a, "commit", ["COMMIT"], I)
    ended = a.take_ended()
    assert [e.transaction for e in ended if e.transaction is not None] == []
    assert all(e.read_only for e in ended)
    # FOR UPDATE gives it a txid, which the probe sees: still nothing to log, nothing to hold the COMMIT for.
    run(a, "begin", ["BEGIN"], T)
    run(a, "set local lock_timeout = '1s'", ["SET"], T)
    run(a, "select * from t for update", ["SELECT 3"], T)
    a.probe(777, "2024-05-01 12:00:00+00", ())
    assert a.current() is None and not a.has_writes


def test_commit_and_chain_keeps_the_next_transaction_explicit() -> None:
    """After COMMIT AND CHAIN a transaction is open at once: its writes commit at the next COMMIT, not at each Sync."""
    a = TransactionAssembler("app", 1)
    run(a, "begin", ["BEGIN"], T)
    run(a, "insert into t values (1)", ["INSERT 0 1"], T)
    run(a, "commit and chain", ["COMMIT"], T)
    assert a.explicit
    run(a, "insert into t values (2)", ["INSERT 0 1"], T)
    run(a, "insert into t values (3)", ["INSERT 0 1"], T)
    run(a, "rollback and chain", ["ROLLBACK"], T)
    assert a.explicit
    run(a, "insert into t values (4)", ["INSERT 0 1"], T)
    run(a, "commit", ["COMMIT"], I)
    assert not a.explicit
    assert committed_sql(a) == [["insert into t values (1)"], ["insert into t values (4)"]]


def test_a_setting_changed_after_a_write_is_kept_at_its_place_and_taken_back_with_its_savepoint() -> None:
    """The first read of the settings is the transaction's; a change read later is a set_config() among its
    statements, for the statements after it, and a ROLLBACK TO SAVEPOINT takes it back with them."""
    a = TransactionAssembler("app", 1)
    s1 = (("search_path", "s1"), ("TimeZone", "UTC"))
    s2 = (("search_path", "s2"), ("TimeZone", "UTC"))
    tokyo = (("search_path", "s2"), ("TimeZone", "Asia/Tokyo"))
    run(a, "begin", ["BEGIN"], T)
    a.settings_seen(s2)  # read before any statement: the transaction's own, whatever it read before
    a.settings_seen(s1)
    run(a, "update t set v = 1", ["UPDATE 1"], T)
    a.probe(42, "2020-01-01T00:00:00+00", s1)
    a.settings_seen(s1)  # around `set search_path = s2`
    run(a, "set search_path = s2", ["SET"], T)
    a.settings_seen(s2)
    run(a, "update t set v = 2", ["UPDATE 1"], T)
    run(a, "savepoint p", ["SAVEPOINT"], T)
    a.settings_seen(tokyo)
    run(a, "update t set v = 3", ["UPDATE 1"], T)
    run(a, "rollback to savepoint p", ["ROLLBACK"], T)
    a.settings_seen(tokyo)  # set again after the rollback: a change from s2 again, kept again
    run(a, "update t set v = 4", ["UPDATE 1"], T)
    run(a, "commit", ["COMMIT"], I)
    (tx,) = take_committed(a)
    assert tx.settings == s1
    statements = [(s.sql, s.params, s.tag) for s in tx.statements]
    set_one = "SELECT set_config($1, $2, true)"
    assert statements == [
        ("update t set v = 1", (), "UPDATE 1"),
        (set_one, (b"search_path", b"s2"), "SELECT 1"),
        ("update t set v = 2", (), "UPDATE 1"),
        (set_one, (b"TimeZone", b"Asia/Tokyo"), "SELECT 1"),
        ("update t set v = 4", (), "UPDATE 1"),
    ]
    assert all(s.param_types == (25, 25) for s in tx.statements if s.sql == set_one)
    # The next transaction starts from its own first read.
    run(a, "begin", ["BEGIN"], T)
    run(a, "update t set v = 5", ["UPDATE 1"], T)
    a.probe(43, "2020-01-01T00:00:00+00", tokyo)
    run(a, "commit", ["COMMIT"], I)
    (tx,) = take_committed(a)
    assert tx.settings == tokyo and [s.sql for s in tx.statements] == ["update t set v = 5"]


def test_settings_read_inside_a_savepoint_are_taken_back_by_its_rollback() -> None:
    """Read after a SET the ROLLBACK TO SAVEPOINT undoes: the server is back at the earlier value, and so is capture."""
    a = TransactionAssembler("app", 1)
    public = (("search_path", "public"),)
    other = (("search_path", "b"),)
    run(a, "begin", ["BEGIN"], T)
    run(a, "savepoint s", ["SAVEPOINT"], T)
    run(a, "insert into t values (1)", ["INSERT 0 1"], T)
    run(a, "rollback to savepoint s", ["ROLLBACK"], T)  # nothing kept: the write is undone
    run(a, "savepoint u", ["SAVEPOINT"], T)
    a.settings_seen(public)  # around `set search_path = b` (a write was sent)
    run(a, "set search_path = b", ["SET"], T)
    a.settings_seen(other)
    run(a, "rollback to savepoint u", ["ROLLBACK"], T)
    run(a, "insert into t values (2)", ["INSERT 0 1"], T)
    assert a.needs_probe()  # the settings were read after both savepoints: read again
    a.probe(44, "2020-01-01T00:00:00+00", public)
    run(a, "commit", ["COMMIT"], I)
    (tx,) = take_committed(a)
    assert tx.settings == public and [s.sql for s in tx.statements] == ["insert into t values (2)"]
    assert a.last_settings == public


def test_a_rollback_to_a_savepoint_set_before_the_first_read_keeps_the_settings_and_asks_again() -> None:
    """BEGIN; SAVEPOINT; INSERT (probed); ROLLBACK TO; INSERT: the txid is known, the settings are read again."""
    a = TransactionAssembler("app", 1)
    zone = (("search_path", "app"), ("TimeZone", "Asia/Tokyo"))
    run(a, "begin", ["BEGIN"], T)
    run(a, "savepoint s", ["SAVEPOINT"], T)
    run(a, "insert into t values (1)", ["INSERT 0 1"], T)
    a.probe(1234, "2020-01-01T00:00:00+00", zone)
    run(a, "rollback to savepoint s", ["ROLLBACK"], T)
    run(a, "insert into t values (2)", ["INSERT 0 1"], T)
    assert a.needs_probe()
    run(a, "commit", ["COMMIT"], I)  # had the probe not come: the settings read inside the savepoint, not none
    (tx,) = take_committed(a)
    assert (tx.txid, tx.settings, [s.sql for s in tx.statements]) == (1234, zone, ["insert into t values (2)"])
