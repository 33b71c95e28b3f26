"""Detectors: given a rule's params, the source's inventory and the target, the objects the rule applies to.

Pure functions of catalog rows (model.Inventory), so every rule can be tested on rows a 9.x catalog would
return. Each returns human-readable object names, sorted, one per affected object.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.visitors import Visitor

from pgleap.upgrade.check.model import Detector, Inventory, Row, Rule, TargetInfo

# pg_settings sources that mean "set for the whole server": per-database and per-role values come from
# pg_db_role_setting instead (they would otherwise be counted twice), per-session ones are not the source's.
_SERVER_SOURCES = frozenset({"configuration file", "command line", "environment variable", "global"})
_DETECTORS: dict[str, Detector] = {}


def detect(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    """The objects `rule` finds."""
    return sorted(set(_DETECTORS[rule.kind](rule, inventory, target)))


def kinds() -> set[str]:
    """Every detector kind (rules must use one of them)."""
    return set(_DETECTORS)


def _q(schema: str, name: str) -> str:
    return name if schema in ("", None) else f"{schema}.{name}"


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z_][a-z0-9_$]*", text.lower()))


def _definitions(inventory: Inventory) -> Iterator[tuple[str, str]]:
    """(object label, text) of every view definition and function body."""
    for v in inventory.views:
        kind = "materialized view" if v["relkind"] == "m" else "view"
        yield f"{kind} {_q(v['schema'], v['name'])}", v["definition"] or ""
    for f in inventory.functions:
        if f["kind"] == "a":
            continue  # an aggregate's body is its support functions, checked themselves
        yield f"function {_q(f['schema'], f['name'])}({f['args']})", f["body"] or ""


def _with_oids(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    return [f"table {_q(r['schema'], r['name'])}" for r in inventory.relations if r["has_oids"]]


def _column_type(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    types = set(rule.param("types", ()))
    type_schema = rule.param("type_schema")
    found = []
    for c in inventory.columns:
        names = {c["type"], c.get("element_type"), c.get("base_type")}
        if not types & names:
            continue
        if type_schema is not None and c["type_schema"] != type_schema and c["type"] in types:
            continue
        what = "type" if c["relkind"] == "c" else "view" if c["relkind"] in ("v", "m") else "column"
        found.append(f"{what} {_q(c['schema'], c['relation'])}.{c['column']} ({c['type_text']})")
    if rule.param("signatures"):
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(types))) + r")\b", re.IGNORECASE)
        for f in inventory.functions:
            if pattern.search(f"{f['args']} {f['result'] or ''}"):
                found.append(f"function {_q(f['schema'], f['name'])}({f['args']})")
    return found


def _removed_catalog_column(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    # Both the catalog's name and the column's appear in the text: view definitions qualify columns
    # (pg_class.relhasoids), function bodies may alias the relation, so the pair of words is the test.
    relation = rule.param("relation")
    columns = set(rule.param("columns"))
    found = []
    for label, text in _definitions(inventory):
        words = _words(text)
        hit = sorted(columns & words)
        if relation in words and hit:
            found.append(f"{label} uses {', '.join(hit)}")
    return found


def _removed_function(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    names = rule.param("functions")
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\s*\(", re.IGNORECASE)
    found = []
    for label, text in _definitions(inventory):
        hits = sorted({m.group(1).lower() for m in pattern.finditer(text)})
        if hits:
            found.append(f"{label} calls {', '.join(hits)}")
    return found


def _operator_name(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    return [_operator(o) for o in inventory.operators if o["name"] == rule.param("operator")]


def _operator(o: Row) -> str:
    return f"operator {_q(o['schema'], o['name'])}({o['left_type'] or 'NONE'}, {o['right_type'] or 'NONE'})"


def _postfix_operator(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    return [_operator(o) for o in inventory.operators if o["kind"] == "r" or o["right_type"] is None]


def _normal_proc(text: str) -> str:
    return text.removeprefix("pg_catalog.").replace(" ", "")


def _polymorphic_functions(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    functions = {_normal_proc(f) for f in rule.param("functions")}
    found = []
    for a in inventory.aggregates:
        hits = sorted({_normal_proc(f) for f in a["functions"] or ()} & functions)
        if hits:
            found.append(f"aggregate {_q(a['schema'], a['name'])}({a['args']}) uses {', '.join(hits)}")
    for o in inventory.operators:
        if _normal_proc(o["function"] or "") in functions:
            found.append(f"{_operator(o)} uses {_normal_proc(o['function'])}")
    return found


def _removed_extension(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    name = rule.param("extension")
    return [f"extension {e['name']} {e['version']}" for e in inventory.extensions if e["name"] == name]


def _removed_extension_names() -> set[str]:
    from pgleap.upgrade.check.rules import RULES

    return {r.param("extension") for r in RULES if r.kind == "removed_extension"}


def _extension_unavailable(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    if target.available_extensions is None:
        return []
    removed = _removed_extension_names()  # those have their own rule, with a better fix
    return [
        f"extension {e['name']} {e['version']}"
        for e in inventory.extensions
        if e["name"] not in target.available_extensions and e["name"] not in removed
    ]


def _extension_version(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    if target.available_extensions is None:
        return []
    found = []
    for e in inventory.extensions:
        versions = target.available_extensions.get(e["name"])
        if versions and e["version"] not in versions:
            default = (target.default_extension_versions or {}).get(e["name"], "?")
            found.append(f"extension {e['name']} {e['version']} (the target installs {default})")
    return found


def _server_settings(inventory: Inventory) -> Iterator[tuple[str, str, str]]:
    """(name, value, where) of every setting the source sets explicitly, server-wide or per database/role."""
    for s in inventory.settings:
        if s["source"] in _SERVER_SOURCES and s["setting"] != s["boot_val"]:
            yield s["name"], s["setting"], f"server ({s['source']})"
    for d in inventory.db_role_settings:
        where = (
            f"ALTER ROLE {d['role']} IN DATABASE {d['database']}"
            if d["role"] and d["database"]
            else f"ALTER ROLE {d['role']}"
            if d["role"]
            else f"ALTER DATABASE {d['database']}"
        )
        for item in d["settings"] or ():
            name, _, value = item.partition("=")
            yield name, value, where


def _removed_setting(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    setting = rule.param("setting")
    return [f"{where}: {name} = {value}" for name, value, where in _server_settings(inventory) if name == setting]


def _unknown_setting(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    if target.settings is None:
        return []
    from pgleap.upgrade.check.rules import removed_settings

    covered = removed_settings()
    return [
        f"{where}: {name} = {value}"
        for name, value, where in _server_settings(inventory)
        if "." not in name and name not in covered and name.lower() not in target.settings
    ]


def _effective(inventory: Inventory, name: str) -> str | None:
    for s in inventory.settings:
        if s["name"] == name:
            value: str = s["setting"]
            if name == "password_encryption" and value in ("on", "off"):
                return "md5" if value == "on" else "plain"  # before 10 it was a boolean: on meant md5
            return value
    return None


def _changed_default(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    name = rule.param("setting")
    value = _effective(inventory, name)
    if value is None:
        return []
    new = rule.param("new")
    if target.settings is not None and name in target.settings:
        new = target.settings[name]["reset_val"]
    if value.lower() == str(new).lower():
        return []
    return [f"{name} = {value} on the source; a new session on the target gets {new}"]


def _md5_password(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    return [f"role {r['name']}" for r in inventory.roles if r["password"] == "md5"]


def _createrole(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    return [f"role {r['name']}" for r in inventory.roles if r["createrole"] and not r["superuser"]]


def _inheritance_parents(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    return [
        f"table {_q(r['schema'], r['name'])} ({r['children']} child{'ren' if r['children'] != 1 else ''})"
        for r in inventory.inheritance_parents
    ]


def _unlogged_partitioned(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    return [
        f"table {_q(r['schema'], r['name'])}"
        for r in inventory.relations
        if r["relkind"] == "p" and r["persistence"] == "u"
    ]


class _Names(Visitor):
    """Unqualified relation and function names of a statement."""

    def __init__(self) -> None:
        self.relations: set[str] = set()
        self.functions: set[str] = set()

    def visit_RangeVar(self, _ancestors: object, node: ast.RangeVar) -> None:
        if not node.schemaname:
            self.relations.add((node.relname or "").lower())

    def visit_FuncCall(self, _ancestors: object, node: ast.FuncCall) -> None:
        if node.funcname and len(node.funcname) == 1:
            self.functions.add(node.funcname[0].sval.lower())


@lru_cache(maxsize=1024)
def _unqualified_names(body: str) -> tuple[frozenset[str], frozenset[str]] | None:
    """Unqualified (relations, functions) a SQL-function body names; None when it does not parse."""
    try:
        statements = parse_sql(body)
    except ParseError:
        return None
    names = _Names()
    for s in statements:
        names(s)
    return frozenset(names.relations), frozenset(names.functions)


def _needs_search_path(row: Row, user_functions: set[str]) -> bool:
    if any(item.startswith("search_path=") for item in row["config"] or ()):
        return False  # the function pins its own search_path: maintenance cannot change it
    if row["language"] != "sql":
        return True  # a procedural body is not parsed here: assume it may name objects unqualified
    names = _unqualified_names(row["body"] or "")
    if names is None:
        return True
    relations, functions = names
    return bool(relations) or bool(functions & user_functions)


def _maintenance_search_path(rule: Rule, inventory: Inventory, target: TargetInfo) -> list[str]:
    user_functions = {f["name"].lower() for f in inventory.functions}
    found = []
    for row in inventory.maintenance_functions:
        if _needs_search_path(row, user_functions):
            kind = "index" if row["relkind"] == "i" else "materialized view"
            found.append(
                f"{kind} {_q(row['schema'], row['name'])} calls {_q(row['function_schema'], row['function'])}()"
            )
    return found


for _kind, _fn in {
    "with_oids": _with_oids,
    "column_type": _column_type,
    "removed_catalog_column": _removed_catalog_column,
    "removed_function": _removed_function,
    "operator_name": _operator_name,
    "postfix_operator": _postfix_operator,
    "polymorphic_functions": _polymorphic_functions,
    "removed_extension": _removed_extension,
    "extension_unavailable": _extension_unavailable,
    "extension_version": _extension_version,
    "removed_setting": _removed_setting,
    "unknown_setting": _unknown_setting,
    "changed_default": _changed_default,
    "md5_password": _md5_password,
    "createrole": _createrole,
    "inheritance_parents": _inheritance_parents,
    "unlogged_partitioned": _unlogged_partitioned,
    "maintenance_search_path": _maintenance_search_path,
}.items():
    _DETECTORS[_kind] = _fn
