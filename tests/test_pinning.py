"""Pinning replayed statements to the source transaction's clock, checked on a real server."""

from __future__ import annotations

import psycopg
import pytest

from pgleap.lab import LabServer
from pgleap.upgrade.capture.pinning import pin_time, reads_the_clock_as_input

SOURCE_NOW = "2026-11-25T04:00:00.123456+00"


@pytest.mark.parametrize(
    "sql",
    [
        "select now()",
        "select current_timestamp",
        "select current_timestamp(3)",
        "select current_date",
        "select localtimestamp",
        "select localtimestamp(0)",
        "select current_time",
        "select localtime(2)",
        "select transaction_timestamp()",
        "select pg_catalog.now()",
        "select now() + interval '1 day'",
    ],
)
@pytest.mark.integration
def test_pinned_statement_returns_what_the_source_returned(pg_new: LabServer, sql: str) -> None:
    """The pinned text, run later on another server, gives what the original gave at SOURCE_NOW."""
    with psycopg.connect(pg_new.dsn(), autocommit=True) as conn:
        conn.execute("set timezone = 'Europe/Paris'")  # replay sets the captured TimeZone too
        with conn.transaction():
            # What the statement returned on the "source": run it in a transaction whose now() is SOURCE_NOW
            # is impossible, so compare with the same expression evaluated on the literal explicitly.
            pinned = conn.execute(pin_time(sql, SOURCE_NOW)).fetchone()
            expected = conn.execute(
                sql.replace("pg_catalog.now()", "now()")
                .replace("now()", f"'{SOURCE_NOW}'::timestamptz")
                .replace("transaction_timestamp()", f"'{SOURCE_NOW}'::timestamptz")
                .replace("current_timestamp(3)", f"'{SOURCE_NOW}'::timestamptz(3)")
                .replace("current_timestamp", f"'{SOURCE_NOW}'::timestamptz")
                .replace("current_date", f"'{SOURCE_NOW}'::timestamptz::date")
                .replace("localtimestamp(0)", f"'{SOURCE_NOW}'::timestamptz::timestamp(0)")
                .replace("localtimestamp", f"'{SOURCE_NOW}'::timestamptz::timestamp")
                .replace("current_time", f"'{SOURCE_NOW}'::timestamptz::timetz")
                .replace("localtime(2)", f"'{SOURCE_NOW}'::timestamptz::time(2)")
            ).fetchone()
    assert pinned == expected


def test_statements_without_time_functions_are_unchanged() -> None:
    for sql in ["insert into t (v) values ($1)", "update t set who = current_user", "select clock_timestamp()"]:
        assert pin_time(sql, SOURCE_NOW) == sql


def test_user_functions_named_now_are_left_alone() -> None:
    assert "my.now()" in pin_time("update t set a = my.now(), b = now()", SOURCE_NOW).lower().replace(
        "my.now ()", "my.now()"
    )
    assert "CAST(" in pin_time("update t set a = my.now(), b = now()", SOURCE_NOW)


def test_unparseable_statements_are_returned_as_is() -> None:
    assert (
        pin_time("update t set a = now() with oids garbage", SOURCE_NOW) == "update t set a = now() with oids garbage"
    )


def test_the_clocks_input_strings_are_told_in_text_and_parameters() -> None:
    """'now', 'today', 'tomorrow' and 'yesterday' are not pinned (their type is the context's): replay flags them."""
    assert reads_the_clock_as_input("update t set at = 'now' where id = 1")
    assert reads_the_clock_as_input("insert into t values (1, ' Today '::date)")
    assert reads_the_clock_as_input("update t set at = $1 where id = $2", (b"tomorrow", b"1"))
    assert reads_the_clock_as_input("update t set at = $1", (b" YESTERDAY",))
    assert not reads_the_clock_as_input("update t set note = 'nowhere', at = now() where id = 1")
    assert not reads_the_clock_as_input("update t set note = $1 where id = $2", (b"now and then", None))
    # A parameter typed as text is a label; one typed as a timestamp or date, or not typed, reads the clock.
    assert not reads_the_clock_as_input("update t set label = $1", (b"today",), (25,))
    assert reads_the_clock_as_input("update t set at = $1", (b"today",), (1114,))
