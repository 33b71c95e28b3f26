"""Row images: the rows an INSERT really wrote on the source, returned by a RETURNING clause pgleap appends.

Replaying `INSERT ... VALUES (nextval(...), now())` as a statement gives other keys and other times
on the target: sequences advance in a different order under concurrency and rollbacks, and column
defaults run again. So capture appends `RETURNING <every column>` to each INSERT it can, hides those
rows from the client (or cuts them off the client's own RETURNING columns), and replay inserts exactly
those rows (I3). Floats come back through float4send/float8send: their text form is rounded on old
majors. What cannot carry an image (a table with rules, an ambiguous name, a writable CTE) is replayed
as a statement, as before.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import lru_cache

from pglast import ast, parse_sql
from pglast.enums import OnConflictAction
from pglast.parser import ParseError

from pgleap.protocol import codes
from pgleap.protocol.messages import data_row_values, message
from pgleap.store.records import RowImage
from pgleap.upgrade.capture.catalog import SourceCatalog, TableShape
from pgleap.upgrade.capture.classify import template
from pgleap.upgrade.copy.connect import quote_ident

_H = struct.Struct("!h")
_I = struct.Struct("!i")
_NO_DATA = message(codes.NO_DATA)


@dataclass(frozen=True)
class InsertTarget:
    """What an INSERT statement's text says about where it writes and what it returns."""

    schema: str | None
    name: str
    alias: str | None
    returning: tuple[bool, ...]  # per client RETURNING item: True for `*` / `t.*`
    upsert: bool  # ON CONFLICT ... DO UPDATE
    single_row: bool  # VALUES with one row: it writes (and returns) at most one


@lru_cache(maxsize=4096)
def insert_target(text: str) -> InsertTarget | None:
    """The INSERT a statement's text is, or None when it is something else (or has a writable CTE).

    Cached by text, then by template: capture asks twice per INSERT (wait for the catalog? rewrite?).
    """
    return _insert_target(template(text) or text)


@lru_cache(maxsize=4096)
def _insert_target(text: str) -> InsertTarget | None:
    try:
        raw = parse_sql(text)
    except ParseError:
        return None
    if len(raw) != 1 or not isinstance(raw[0].stmt, ast.InsertStmt):
        return None
    node = raw[0].stmt
    if node.withClause is not None or node.relation is None:
        return None  # a CTE may write elsewhere too: the statement is replayed whole
    stars = []
    returning = node.returningClause
    for item in (returning.exprs or ()) if returning is not None else ():
        value = getattr(item, "val", None)
        fields = (value.fields or ()) if isinstance(value, ast.ColumnRef) else ()
        stars.append(bool(fields) and isinstance(fields[-1], ast.A_Star))
    conflict = node.onConflictClause
    upsert = conflict is not None and conflict.action == OnConflictAction.ONCONFLICT_UPDATE
    rel = node.relation
    select = node.selectStmt
    single = isinstance(select, ast.SelectStmt) and len(select.valuesLists or ()) == 1
    return InsertTarget(
        rel.schemaname, rel.relname or "", rel.alias.aliasname if rel.alias else None, tuple(stars), upsert, single
    )


@dataclass(frozen=True)
class ImagePlan:
    """How one INSERT is rewritten, and how its answers are split between the client and the image."""

    shape: TableShape
    suffix: str  # appended to the statement's text
    client_columns: int  # columns of the client's own RETURNING list
    upsert: bool  # ON CONFLICT DO UPDATE: replay upserts the images by primary key
    single_row: bool  # returns at most one row

    @property
    def image_columns(self) -> int:
        """How many trailing columns of each row are the image."""
        return len(self.shape.columns)


def plan_insert(
    text: str, catalog: SourceCatalog | None, user: str, temporary: set[str] | frozenset[str] = frozenset()
) -> ImagePlan | None:
    """The rewrite for one statement, or None when it is not an INSERT row images can serve.

    `temporary` holds the names of the session's temporary tables: an unqualified name among them may
    be the temporary table, which the catalog does not describe.
    """
    if catalog is None or not catalog.usable:
        return None
    target = insert_target(text)
    if target is None or (target.schema is None and target.name in temporary):
        return None
    shape = catalog.resolve(target.schema, target.name)
    if shape is None or shape.unsafe is not None or user not in shape.readers:
        return None
    if target.upsert and not shape.key:
        return None
    return _plan(shape, target)


@lru_cache(maxsize=4096)
def _plan(shape: TableShape, target: InsertTarget) -> ImagePlan:
    ref = quote_ident(target.alias or target.name)
    items = []
    for column in shape.columns:
        value = f"{ref}.{quote_ident(column.name)}"
        items.append(f"pg_catalog.{column.float_send}send({value})" if column.float_send else value)
    lead = "\n, " if target.returning else "\nRETURNING "
    client = sum(shape.visible_columns if star else 1 for star in target.returning)
    return ImagePlan(shape, lead + ", ".join(items), client, target.upsert, target.single_row)


@dataclass
class ImageRows:
    """The image rows of one executing statement, as the source returned them."""

    plan: ImagePlan
    codec: str
    rows: list[list[str | None]] = field(default_factory=list)
    complete: bool = True  # False once a suspended portal left rows unseen

    def data_row(self, body: bytes) -> bytes | None:
        """Keep a DataRow's image; the client's part of it as a DataRow message, None when it gets nothing."""
        values, offsets = data_row_values(body)
        k = self.plan.client_columns
        self.rows.append([None if v is None else v.decode(self.codec) for v in values[k:]])
        if k == 0:
            return None
        head = body[2 : offsets[k]]
        return message(codes.DATA_ROW, _H.pack(k) + head)

    def image(self) -> RowImage:
        """The rows as the change log stores them; floats back to their exact text."""
        shape = self.plan.shape
        floats = [c.float_send for c in shape.columns]
        rows = tuple(
            tuple(_float_text(v, f) if f and v is not None else v for v, f in zip(row, floats, strict=True))
            for row in self.rows
        )
        key = shape.key if self.plan.upsert else ()
        return RowImage(
            shape.schema, shape.name, tuple(c.name for c in shape.columns), key, shape.identity_always, rows
        )


def client_row_description(body: bytes, plan: ImagePlan) -> bytes:
    """The RowDescription the client would have seen without the image columns (NoData when none)."""
    k = plan.client_columns
    if k == 0:
        return _NO_DATA
    offset = 2
    for _ in range(k):
        offset = body.index(b"\0", offset) + 1 + 18  # name, then table oid .. format code
    return message(codes.ROW_DESCRIPTION, _H.pack(k) + body[2:offset])


def client_bind(body: bytes, plan: ImagePlan) -> bytes:
    """A Bind body whose result formats give the client's columns what it asked and the image text."""
    offset = body.index(b"\0", body.index(b"\0") + 1) + 1
    (nformats,) = _H.unpack_from(body, offset)
    offset += 2 + 2 * nformats
    (nparams,) = _H.unpack_from(body, offset)
    offset += 2
    for _ in range(nparams):
        (length,) = _I.unpack_from(body, offset)
        offset += 4 + max(length, 0)
    (nresult,) = _H.unpack_from(body, offset)
    asked = struct.unpack_from(f"!{nresult}h", body, offset + 2) if nresult else ()
    k = plan.client_columns
    client = list(asked) if nresult == k else [asked[0] if asked else 0] * k
    formats = client + [0] * plan.image_columns
    return body[:offset] + struct.pack(f"!h{len(formats)}h", len(formats), *formats)


def _float_text(value: str, kind: str) -> str:
    """A floatNsend bytea (hex or escape output) back to the exact float's shortest text."""
    raw = _bytea(value)
    (number,) = struct.unpack("!f" if kind == "float4" else "!d", raw)
    return repr(number)


def _bytea(text: str) -> bytes:
    if text.startswith("\\x"):
        return bytes.fromhex(text[2:])
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and text[i + 1] == "\\":
            out.append(0x5C)
            i += 2
        elif ch == "\\":
            out.append(int(text[i + 1 : i + 4], 8))
            i += 4
        else:
            out += ch.encode("latin-1")
            i += 1
    return bytes(out)
