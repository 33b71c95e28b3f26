"""`ddl = "block"`: schema changes are refused while capture runs, by the source itself.

The refusal must leave the session exactly as a failed statement would: inside a transaction block
the transaction is aborted, so that a later COMMIT answers ROLLBACK on the source just as it does to
the client. pgleap therefore does not answer the client itself; it sends the source a statement that
raises the error (a DO block, 9.0+), in place of the DDL.
"""

from __future__ import annotations

from pgleap.upgrade.capture.classify import StatementInfo

BLOCKED_SQLSTATE = "55000"  # object_not_in_prerequisite_state: the upgrade is the prerequisite


def blocked_command(infos: tuple[StatementInfo, ...]) -> str | None:
    """The command the block refuses in this string (e.g. "ALTER TABLE"), None when none."""
    for info in infos:
        if info.changes_schema:
            return " ".join(info.text.split()[:2]).upper()
    return None


def refusal_sql(command: str) -> str:
    """A statement whose error tells the client its DDL was refused, and what to do."""
    message = f'pgleap: {command} refused while an upgrade captures this database (ddl = "block")'
    hint = (
        'Run schema changes after the upgrade, or set ddl = "replay" (replayed on the new server) or '
        '"queue" (held for review) in the [pgleap] section of pgleap.toml and run RELOAD on the admin console.'
    )
    quoted = ", ".join(f"{k} = '{v.replace(chr(39), chr(39) * 2)}'" for k, v in (("MESSAGE", message), ("HINT", hint)))
    return f"DO $pgleap$BEGIN RAISE EXCEPTION USING ERRCODE = '{BLOCKED_SQLSTATE}', {quoted}; END$pgleap$"
