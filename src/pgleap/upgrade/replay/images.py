"""Replaying row images: the rows an INSERT wrote on the source, inserted as they are on the target.

The images come from capture/images.py. Values travel as text parameters of unspecified type, so the
target infers each from its column, as it would for the literals of the original INSERT; floats were
turned back into their exact shortest text at capture. A large image is sent as several INSERTs,
each under PostgreSQL's limit on Bind parameters; their row counts add up to the source's tag.
"""

from __future__ import annotations

from collections.abc import Iterator

from pgleap.store.records import RowImage
from pgleap.upgrade.copy.connect import qualified, quote_ident

MAX_PARAMS = 30_000  # a Bind carries at most 32767 parameters (an int16 count)


def image_statements(image: RowImage) -> Iterator[tuple[str, tuple[bytes | None, ...]]]:
    """(sql, text parameters) of the INSERTs that write the image's rows on the target."""
    width = len(image.columns)
    if width == 0 or not image.rows:
        return
    per_statement = max(1, MAX_PARAMS // width)
    head = f"INSERT INTO {qualified(image.schema, image.table)} ({', '.join(map(quote_ident, image.columns))})"
    if image.identity_always:
        head += " OVERRIDING SYSTEM VALUE"
    tail = ""
    if image.upsert_key:
        others = [c for c in image.columns if c not in image.upsert_key] or list(image.upsert_key)
        tail = f" ON CONFLICT ({', '.join(map(quote_ident, image.upsert_key))}) DO UPDATE SET " + ", ".join(
            f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in others
        )
    for start in range(0, len(image.rows), per_statement):
        rows = image.rows[start : start + per_statement]
        groups = ("(" + ", ".join(f"${r * width + c + 1}" for c in range(width)) + ")" for r in range(len(rows)))
        params = tuple(None if v is None else v.encode() for row in rows for v in row)
        yield f"{head} VALUES {', '.join(groups)}{tail}", params


def combined_tag(tags: list[str | None]) -> str | None:
    """The one INSERT tag several image INSERTs add up to (None when one has no tag)."""
    total = 0
    for tag in tags:
        if tag is None:
            return None
        parts = tag.split()
        total += int(parts[-1])
    return f"INSERT 0 {total}"
