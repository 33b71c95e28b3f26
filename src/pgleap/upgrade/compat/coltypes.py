"""Which column types may travel in binary COPY between two majors."""

from __future__ import annotations

# Built-in types whose binary send/recv format has not changed from 9.0 to 18. Arrays of them are
# safe too: an array's binary form names its element type by OID, and built-in OIDs are fixed.
# Left out on purpose: money (depends on lc_monetary), user types, enums, composites and domains
# (their OIDs differ between the two servers), and anything newer or rarer (text COPY is always safe).
_STABLE = frozenset(
    {
        "bool",
        "bytea",
        "char",
        "name",
        "int2",
        "int4",
        "int8",
        "oid",
        "text",
        "varchar",
        "bpchar",
        "float4",
        "float8",
        "numeric",
        "uuid",
        "json",
        "jsonb",
        "inet",
        "cidr",
        "macaddr",
        "bit",
        "varbit",
        "tid",
        "xid",
        "point",
        "box",
        "lseg",
        "path",
        "polygon",
        "circle",
        "interval",
        "date",
        "time",
        "timetz",
        "timestamp",
        "timestamptz",
    }
)
# Their binary form is an int64 of microseconds only with integer_datetimes = on; a 9.x server
# built with --disable-integer-datetimes sends float8 seconds, which 10+ (always on) misreads.
_DATETIME = frozenset({"date", "time", "timetz", "timestamp", "timestamptz", "interval"})


def binary_safe(type_name: str, type_schema: str, element_name: str | None, *, integer_datetimes: bool) -> bool:
    """Whether a column of this type can be binary COPYed from the source major to the target major."""
    if type_schema != "pg_catalog":
        return False
    base = element_name if element_name else type_name
    if base not in _STABLE:
        return False
    return integer_datetimes or base not in _DATETIME
