"""Pinning a replayed statement's clock to the source transaction's `now()`.

`now()`, `CURRENT_TIMESTAMP` and friends return the transaction's start time. Replayed as they
are, they would return the target's clock; replaced by the literal the probe captured on the
source, they return exactly what they returned there (I3). `statement_timestamp()` becomes the
transaction's time too (close, not exact); `clock_timestamp()` and `timeofday()` are left alone:
verification catches what they change.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from pglast import ast, parse_sql
from pglast.enums import SQLValueFunctionOp
from pglast.parser import ParseError
from pglast.stream import RawStream
from pglast.visitors import Visitor

_PINNED_FUNCTIONS = frozenset(["now", "transaction_timestamp", "statement_timestamp"])
# The date/time input strings the server reads from its clock. Their type comes from the context (a column, a
# parameter's type), so they are not pinned: replay flags what they write instead.
_CLOCK_STRINGS = re.compile(r"'\s*(?:now|today|tomorrow|yesterday)\s*'", re.IGNORECASE)
_CLOCK_VALUES = frozenset([b"now", b"today", b"tomorrow", b"yesterday"])
# Parameter types such a string can be read as: unspecified (the server infers it), date, time, timestamp,
# timestamptz, timetz. A text parameter 'today' is a label, not a date.
_CLOCK_TYPES = frozenset([0, 1082, 1083, 1114, 1184, 1266])
_SQL_VALUE_TYPES = {
    SQLValueFunctionOp.SVFOP_CURRENT_DATE: "date",
    SQLValueFunctionOp.SVFOP_CURRENT_TIME: "timetz",
    SQLValueFunctionOp.SVFOP_CURRENT_TIME_N: "timetz",
    SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP: "timestamptz",
    SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP_N: "timestamptz",
    SQLValueFunctionOp.SVFOP_LOCALTIME: "time",
    SQLValueFunctionOp.SVFOP_LOCALTIME_N: "time",
    SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP: "timestamp",
    SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP_N: "timestamp",
}


def _cast(value: ast.Node, type_name: str, precision: int | None = None) -> ast.TypeCast:
    typmods = (ast.A_Const(val=ast.Integer(ival=precision)),) if precision is not None and precision >= 0 else None
    names = (ast.String(sval="pg_catalog"), ast.String(sval=type_name))
    return ast.TypeCast(arg=value, typeName=ast.TypeName(names=names, typmods=typmods))


class _Pin(Visitor):
    def __init__(self, source_now: str) -> None:
        self.source_now = source_now
        self.changed = False

    def _now(self) -> ast.TypeCast:
        self.changed = True
        return _cast(ast.A_Const(val=ast.String(sval=self.source_now)), "timestamptz")

    def visit_FuncCall(self, _ancestors: object, node: ast.FuncCall) -> ast.Node | None:
        names = [n.sval.lower() for n in node.funcname or ()]
        builtin = len(names) == 1 or (len(names) == 2 and names[0] == "pg_catalog")
        if builtin and names[-1] in _PINNED_FUNCTIONS and not node.args:
            return self._now()
        return None

    def visit_SQLValueFunction(self, _ancestors: object, node: ast.SQLValueFunction) -> ast.Node | None:
        type_name = _SQL_VALUE_TYPES.get(SQLValueFunctionOp(node.op)) if node.op is not None else None
        if type_name is None:
            return None  # CURRENT_USER and the like are not about time
        # The session TimeZone is replayed too, so the date/time parts come out as on the source.
        # CURRENT_TIMESTAMP(3) and the like round to their precision: keep it.
        precision = node.typmod if node.typmod is not None and node.typmod >= 0 else None
        return _cast(self._now(), type_name, precision)


@lru_cache(maxsize=4096)
def pin_time(sql: str, source_now: str) -> str:
    """`sql` with its transaction-time functions replaced by `source_now` (unchanged if it has none)."""
    lowered = sql.lower()
    if not any(word in lowered for word in ("now", "current_", "localtime", "_timestamp")):
        return sql
    try:
        statements = parse_sql(sql)
    except ParseError:
        return sql  # replayed as is; verification will tell if the clock mattered
    pin = _Pin(source_now)
    pieces = []
    for raw in statements:
        if raw.stmt is not None:
            pin(raw.stmt)
            pieces.append(RawStream()(raw.stmt))
    return "; ".join(pieces) if pin.changed else sql


def reads_the_clock_as_input(sql: str, params: Sequence[bytes | None] = (), types: Sequence[int] = ()) -> bool:
    """Whether a statement passes 'now', 'today', 'tomorrow' or 'yesterday', in its text (whatever it is read
    as: the catalog is not known here) or as a parameter of a time type or of none (`types`, by position)."""
    if "'" in sql and _CLOCK_STRINGS.search(sql):
        return True
    for i, value in enumerate(params):
        typed = types[i] if i < len(types) else 0
        if value is not None and len(value) < 16 and value.strip().lower() in _CLOCK_VALUES and typed in _CLOCK_TYPES:
            return True
    return False
