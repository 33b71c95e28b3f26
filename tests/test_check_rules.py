"""The rules table and its detectors on hand-written catalog rows, including the 9.x-only incompatibilities
no PG 10 server can hold (unknown columns, => operators, procpid, the xlog functions, removed 9.x settings)."""

from __future__ import annotations

import pytest
from pglast import parse_sql

from pgleap.upgrade.check.detect import detect, kinds
from pgleap.upgrade.check.inspect import evaluate
from pgleap.upgrade.check.model import Inventory, Severity, TargetInfo, major_label, major_num
from pgleap.upgrade.check.rules import RULES, by_major, rule, rules_for
from pgleap.upgrade.check.workload import distinct, plan
from pgleap.upgrade.compat import check_queries as q
from pgleap.upgrade.compat.facts import Facts

PG91, PG93, PG96, PG10, PG17, PG18 = 90124, 90325, 90624, 100023, 170006, 180001


def test_table_is_well_formed() -> None:
    assert len(RULES) >= 40
    assert len({r.name for r in RULES}) == len(RULES)
    for r in RULES:
        assert r.kind in kinds(), f"{r.name}: no detector {r.kind}"
        assert r.reference.startswith("https://www.postgresql.org/docs/"), r.name
        assert r.fix and r.title, r.name
        if r.since is not None:
            assert r.reference.endswith(f"/release/{major_label(r.since)}.0/") or "#" in r.reference, r.name
    majors = list(by_major())
    assert majors[0] == "9.0" and majors[-1] == "any"
    assert [major_num(m) for m in majors[:-1]] == sorted(major_num(m) for m in majors[:-1])


def test_issue_list_is_covered() -> None:
    kinds_present = {r.kind for r in RULES}
    for kind in ("with_oids", "postfix_operator", "operator_name", "md5_password", "changed_default"):
        assert kind in kinds_present
    names = {r.name for r in RULES}
    for name in (
        "removed_type_abstime",
        "removed_type_reltime",
        "removed_type_tinterval",
        "unknown_type_columns",
        "reg_type_columns",
        "extension_unavailable",
        "extension_version",
        "removed_setting_checkpoint_segments",
        "removed_column_pg_stat_activity_procpid",
        "changed_default_standard_conforming_strings",
    ):
        assert name in names


def test_rules_apply_by_the_majors_crossed() -> None:
    from_91 = {r.name for r in rules_for(PG91, PG17)}
    from_93 = {r.name for r in rules_for(PG93, PG17)}
    from_10 = {r.name for r in rules_for(PG10, PG17)}
    assert "removed_column_pg_stat_activity_procpid" in from_91
    assert "removed_column_pg_stat_activity_procpid" not in from_93
    assert "operator_named_arrow" in from_93 and "operator_named_arrow" not in from_10
    assert "inheritance_vacuum" not in from_10 and "inheritance_vacuum" in {r.name for r in rules_for(PG10, PG18)}
    # A changed default matters whenever the source runs with the old value: no crossing needed.
    assert "changed_default_standard_conforming_strings" in from_10
    assert "extension_unavailable" in from_10


def inv(version_num: int = PG91, **rows: object) -> Inventory:
    """An inventory of the given rows, with empty lists for the rest."""
    return Inventory(version_num=version_num, database={"name": "app"}, **rows)  # type: ignore[arg-type]


def names(inventory: Inventory, target: TargetInfo | None = None) -> dict[str, tuple[str, ...]]:
    findings, _ = evaluate(inventory, target or TargetInfo(PG17))
    return {f.rule.name: f.objects for f in findings}


def test_nine_x_catalog_rows() -> None:
    # What a 9.3 catalog returns for objects that cannot be created on 10.
    found = names(
        inv(
            columns=[
                dict(
                    schema="public",
                    relation="t",
                    relkind="r",
                    column="c",
                    type="unknown",
                    type_schema="pg_catalog",
                    element_type=None,
                    base_type=None,
                    type_text="unknown",
                ),
            ],
            operators=[
                dict(
                    schema="public",
                    name="=>",
                    kind="b",
                    left_type="text",
                    right_type="text",
                    function="public.kv(text,text)",
                ),
            ],
            views=[
                dict(
                    schema="public",
                    name="busy",
                    relkind="v",
                    definition="SELECT pg_stat_activity.procpid, pg_stat_activity.current_query FROM pg_stat_activity;",
                ),
                dict(
                    schema="public",
                    name="lag",
                    relkind="v",
                    definition="SELECT pg_stat_replication.replay_location FROM pg_stat_replication;",
                ),
            ],
            functions=[
                dict(
                    schema="public",
                    name="wal_pos",
                    args="",
                    result="text",
                    kind="f",
                    language="plpgsql",
                    body="BEGIN RETURN pg_current_xlog_location()::text; END",
                    config=None,
                ),
                dict(
                    schema="public",
                    name="waits",
                    args="",
                    result="bigint",
                    kind="f",
                    language="sql",
                    body="SELECT count(*) FROM pg_stat_activity WHERE waiting",
                    config=None,
                ),
            ],
            extensions=[dict(name="tsearch2", version="1.0", schema="public")],
            settings=[
                dict(
                    name="checkpoint_segments", setting="32", boot_val="3", reset_val="32", source="configuration file"
                ),
                dict(
                    name="ssl_renegotiation_limit",
                    setting="0",
                    boot_val="524288",
                    reset_val="0",
                    source="configuration file",
                ),
                dict(
                    name="replication_timeout",
                    setting="60000",
                    boot_val="60000",
                    reset_val="60000",
                    source="configuration file",
                ),
                dict(
                    name="standard_conforming_strings", setting="off", boot_val="on", reset_val="off", source="database"
                ),
                dict(name="password_encryption", setting="on", boot_val="on", reset_val="on", source="default"),
            ],
            db_role_settings=[dict(database="app", role=None, settings=["sql_inheritance=off"])],
        )
    )
    assert found["unknown_type_columns"] == ("column public.t.c (unknown)",)
    assert found["operator_named_arrow"] == ("operator public.=>(text, text)",)
    assert found["removed_column_pg_stat_activity_procpid"] == ("view public.busy uses current_query, procpid",)
    assert found["removed_column_pg_stat_replication_location"] == ("view public.lag uses replay_location",)
    assert found["removed_function_xlog"] == ("function public.wal_pos() calls pg_current_xlog_location",)
    assert found["removed_column_pg_stat_activity_waiting"] == ("function public.waits() uses waiting",)
    assert found["removed_extension_tsearch2"] == ("extension tsearch2 1.0",)
    assert found["removed_setting_checkpoint_segments"] == ("server (configuration file): checkpoint_segments = 32",)
    assert found["removed_setting_ssl_renegotiation_limit"]
    assert "removed_setting_replication_timeout" not in found  # set to its default: nothing is lost
    assert found["removed_setting_sql_inheritance"] == ("ALTER DATABASE app: sql_inheritance = off",)
    assert found["changed_default_standard_conforming_strings"]
    # Before 10, password_encryption was a boolean; on meant md5.
    assert found["changed_default_password_encryption"] == (
        "password_encryption = md5 on the source; a new session on the target gets scram-sha-256",
    )
    assert rule("operator_named_arrow").severity is Severity.ERROR


def test_live_target_rules() -> None:
    target = TargetInfo(
        PG18,
        "18.1",
        available_extensions={"hstore": ["1.4", "1.8"], "citext": ["1.6"], "plpgsql": ["1.0"]},
        default_extension_versions={"hstore": "1.8", "citext": "1.6"},
        settings={"work_mem": {"name": "work_mem", "reset_val": "4096"}},
    )
    found = names(
        inv(
            PG96,
            extensions=[
                dict(name="hstore", version="1.4", schema="public"),
                dict(name="citext", version="1.3", schema="public"),
                dict(name="postgis", version="2.5.0", schema="public"),
                dict(name="chkpass", version="1.0", schema="public"),
                dict(name="plpgsql", version="1.0", schema="pg_catalog"),
            ],
            settings=[
                dict(name="work_mem", setting="8192", boot_val="4096", reset_val="8192", source="configuration file"),
                dict(name="my_old_knob", setting="1", boot_val="0", reset_val="1", source="configuration file"),
                dict(name="app.tenant", setting="x", boot_val="", reset_val="x", source="configuration file"),
            ],
        ),
        target,
    )
    # chkpass has its own rule, with its own fix: not repeated as "unavailable".
    assert found["extension_unavailable"] == ("extension postgis 2.5.0",)
    assert found["removed_extension_chkpass"]
    assert found["extension_version"] == ("extension citext 1.3 (the target installs 1.6)",)
    assert found["unknown_setting"] == ("server (configuration file): my_old_knob = 1",)


def test_roles_and_maintenance_functions() -> None:
    found = names(
        inv(
            PG10,
            roles=[
                dict(name="app", superuser=False, createrole=False, login=True, password="md5"),
                dict(name="ops", superuser=False, createrole=True, login=True, password="scram-sha-256"),
                dict(name="postgres", superuser=True, createrole=True, login=True, password="md5"),
                dict(name="nopass", superuser=False, createrole=False, login=True, password=None),
            ],
            functions=[
                dict(
                    schema="public",
                    name="norm",
                    args="text",
                    result="text",
                    kind="f",
                    language="sql",
                    body="SELECT lower($1)",
                    config=None,
                )
            ],
            maintenance_functions=[
                dict(
                    schema="public",
                    name="i_pinned",
                    relkind="i",
                    function_schema="public",
                    function="lookup",
                    language="sql",
                    body="SELECT v FROM t",
                    config=["search_path=public"],
                ),
                dict(
                    schema="public",
                    name="i_pure",
                    relkind="i",
                    function_schema="public",
                    function="plus",
                    language="sql",
                    body="SELECT $1 + 1",
                    config=None,
                ),
                dict(
                    schema="public",
                    name="i_nested",
                    relkind="i",
                    function_schema="public",
                    function="wrap",
                    language="sql",
                    body="SELECT norm($1)",
                    config=None,
                ),
                dict(
                    schema="public",
                    name="mv",
                    relkind="m",
                    function_schema="public",
                    function="calc",
                    language="plpgsql",
                    body="BEGIN RETURN 1; END",
                    config=None,
                ),
            ],
        ),
        TargetInfo(PG17),
    )
    assert found["md5_passwords"] == ("role app", "role postgres")
    assert found["createrole_roles"] == ("role ops",)
    assert found["maintenance_search_path"] == (
        "index public.i_nested calls public.wrap()",
        "materialized view public.mv calls public.calc()",
    )


@pytest.mark.parametrize("version_num", [90025, 90125, 90325, 90624, 100023, 110022, 120020, 170006])
def test_inventory_queries_parse_and_gate(version_num: int) -> None:
    facts = Facts(version_num)
    texts = [
        q.relations_sql(facts),
        q.columns_sql(facts),
        q.functions_sql(facts),
        q.views_sql(facts),
        q.operators_sql(facts),
        q.aggregates_sql(facts),
        q.roles_sql(facts, read_passwords=True),
        q.roles_sql(facts, read_passwords=False),
        q.settings_sql(),
        q.db_role_settings_sql(),
        q.inheritance_parents_sql(),
        q.maintenance_functions_sql(),
        q.database_sql(),
    ]
    extensions = q.extensions_sql(facts)
    assert (extensions is None) == (version_num < 90100)
    for text in [*texts, *([extensions] if extensions else [])]:
        parse_sql(text)
    assert ("relhasoids" in q.relations_sql(facts)) == (version_num < 120000)
    assert ("prokind" in q.functions_sql(facts)) == (version_num >= 110000)
    assert ("proisagg" in q.functions_sql(facts)) == (version_num < 110000)
    assert ("aggmtransfn" in q.aggregates_sql(facts)) == (version_num >= 90400)
    assert ("relpersistence" in q.relations_sql(facts)) == (version_num >= 90100)
    assert ("pg_extension" in q.relations_sql(facts)) == (version_num >= 90100)


def test_workload_plans() -> None:
    assert plan("SELECT * FROM t WHERE a = $1").how == "prepare"
    assert plan("SELECT 1").how == "explain"
    assert plan("UPDATE t SET a = 1").how == "explain"
    assert plan("SET work_mem = '8MB'").how == "execute"
    assert plan("SHOW work_mem").how == "execute"
    assert plan("COMMIT").how == "skipped"
    assert plan("CREATE TABLE x (a int)").how == "skipped"
    assert plan("SELECT 5 !").how == "explain"  # our grammar rejects it: the target decides
    assert distinct(["SELECT 1", "SELECT a FROM t", "SELECT 'x'"]) == [("SELECT 1", 2), ("SELECT a FROM t", 1)]


def test_detect_sorts_and_dedupes() -> None:
    inventory = inv(
        relations=[
            dict(schema="s", name=n, relkind="r", persistence="p", has_oids=True, owner="o") for n in ("b", "a", "a")
        ]
    )
    assert detect(rule("tables_with_oids"), inventory, TargetInfo(PG17)) == ["table s.a", "table s.b"]
