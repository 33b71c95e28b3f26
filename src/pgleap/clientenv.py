"""The environment pgleap gives the PostgreSQL client programs it runs (psql, pg_dump, pg_basebackup...)."""

from __future__ import annotations

import os
from collections.abc import Mapping

# libpq reads these: left in place they would silently point our own tool runs at another server.
LIBPQ_VARS = frozenset(
    [
        "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGPASSFILE",
        "PGSERVICE", "PGSERVICEFILE", "PGOPTIONS", "PGSSLMODE", "PGDATA",
    ]
)  # fmt: skip


def client_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment without libpq variables, with English messages (they are parsed), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LIBPQ_VARS}
    env["LC_ALL"] = "C"
    if extra:
        env.update(extra)
    return env
