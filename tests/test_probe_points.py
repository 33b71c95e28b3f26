"""Where capture splices its probes into a client's query string (pure logic)."""

from __future__ import annotations

from pgleap.upgrade.capture import classify
from pgleap.upgrade.capture.forwarding import _PROBE, _SETTINGS, _settings_points, _with_probes
from pgleap.upgrade.capture.transaction import Pending

PROBE = "SELECT probe()"


def spliced(sql: str, wrote: bool, txid_at: int | None = None) -> tuple[str, list[str]]:
    """The string as sent, and its parts as the statements' texts and the markers, in answer order."""
    infos = classify(sql)
    points = _settings_points(infos, wrote)
    if txid_at is not None:
        points = [*points, (txid_at, _PROBE)]
    text, parts = _with_probes(sql, [i.start for i in infos], [Pending(i) for i in infos], points, PROBE)
    return text, [p if isinstance(p, str) else p.info.text.strip() for p in parts]


def test_a_set_after_a_write_of_the_same_transaction_is_probed_on_both_sides() -> None:
    sql = "update t set v = 1; set search_path = s2; update t set v = 2"
    text, parts = spliced(sql, wrote=False, txid_at=3)
    assert text == f"update t set v = 1; {PROBE};set search_path = s2; {PROBE};update t set v = 2\n;{PROBE}"
    assert parts == [
        "update t set v = 1",
        _SETTINGS,
        "set search_path = s2",
        _SETTINGS,
        "update t set v = 2",
        _PROBE,
    ]


def test_sets_before_any_write_of_their_transaction_are_left_alone() -> None:
    """Before a write, after its COMMIT, or of a setting not captured; in a block that has not written either:
    the probe's SELECT would take the transaction's snapshot, which a SET does not."""
    for sql, wrote in (
        ("set search_path = s2; update t set v = 1", False),
        ("set search_path = s2", False),
        ("begin; update t set v = 1; commit; set time zone 'UTC'; update t set v = 2", False),
        ("update t set v = 1; set statement_timeout = 5", False),
        ("update t set v = 1", True),
        ("set local search_path = s1; set transaction isolation level repeatable read", False),
        ("begin; set search_path = s2; lock table t; select 1", True),
        ("commit and chain; set search_path = s2", True),
    ):
        text, parts = spliced(sql, wrote)
        assert (text, len(parts)) == (sql, len(classify(sql))), sql


def test_after_a_write_every_set_of_a_captured_setting_is_probed_and_the_txid_probe_keeps_its_place() -> None:
    """Two SETs in a row share the probe between them; the txid probe before COMMIT comes after the last one."""
    sql = "set local search_path = s1; reset all; commit"
    text, parts = spliced(sql, wrote=True, txid_at=2)
    assert text == f"{PROBE};set local search_path = s1; {PROBE};reset all; {PROBE};{PROBE};commit"
    assert parts == [_SETTINGS, "set local search_path = s1", _SETTINGS, "reset all", _SETTINGS, _PROBE, "commit"]
