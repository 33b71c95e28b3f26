"""Splitting the dump's post-data entries into each table's own key builds and the rest (no servers)."""

from __future__ import annotations

from pgleap.upgrade.copy.toc import parse_listing

LISTING = """;
; Archive created at 2026-12-01 22:04:57 UTC
;     Dumped from database version: 10.23
;
; Selected TOC Entries:
;
2689; 2606 16406 CONSTRAINT public pgbench_accounts pgbench_accounts_pkey postgres
2692; 1259 16415 INDEX public wide_created postgres
2700; 2606 16500 FK CONSTRAINT public refs refs_wide_id_fkey postgres
2701; 2620 16510 TRIGGER public wide wide_touch postgres
2702; 0 0 COMMENT public INDEX wide_created postgres
2703; 1259 16520 INDEX public meas_idx postgres
2704; 0 0 INDEX ATTACH public meas_a_idx postgres
2705; 1259 16530 INDEX public "odd name; with spaces" postgres
"""

ACCOUNTS, WIDE, MEAS, ODD = 16391, 16407, 16600, 16700


def test_keys_of_each_table_and_the_rest() -> None:
    # meas is a partitioned parent: its index is in the map but no table job will claim it.
    plan = parse_listing(
        LISTING,
        index_tables={16415: WIDE, 16520: MEAS, 16530: ODD},
        key_tables={16406: ACCOUNTS},
    )
    assert [e.dump_id for e in plan.entries_for(ACCOUNTS)] == [2689]
    assert [e.dump_id for e in plan.entries_for(WIDE)] == [2692]
    assert plan.entries_for(ODD)[0].line.endswith('"odd name; with spaces" postgres')
    # Foreign keys, triggers, comments and attachments never go with a single table.
    assert [e.dump_id for e in plan.rest] == [2700, 2701, 2702, 2704]
    # Tables no job built (meas) hand their entries back to the final pass, in dump order.
    assert [e.dump_id for e in plan.rest_without({ACCOUNTS, WIDE, ODD})] == [2700, 2701, 2702, 2703, 2704]


def test_unknown_objects_stay_in_the_rest() -> None:
    # An index the catalog query did not see (or a constraint that is not a key) is never lost.
    plan = parse_listing(LISTING, index_tables={}, key_tables={})
    assert not plan.by_table
    assert len(plan.rest_without(set())) == 8
