"""Session activity queries on the source, written per major (gates on Facts.version_num)."""

from __future__ import annotations

from pgleap.upgrade.compat.facts import PG10, PG92, Facts


def writing_sessions_sql(facts: Facts) -> str:
    """Client sessions of the current database that hold a transaction id (they have written), but this one.

    Columns: pid, client address (text, NULL for a unix socket), client port (-1 for a unix socket),
    user name, application_name.
    """
    # pg_stat_activity.pid was procpid before 9.2, and its query column current_query.
    pid = "a.pid" if facts.version_num >= PG92 else "a.procpid"
    # backend_xid only exists from 9.4; a granted ExclusiveLock on a transactionid is the session's own
    # xid on every version, and a session has one exactly when it has written.
    if facts.version_num >= PG10:
        clients_only = "a.backend_type = 'client backend'"
    else:
        # Before 10, autovacuum workers (ANALYZE takes an xid) are only recognisable by their query text.
        query = "a.query" if facts.version_num >= PG92 else "a.current_query"
        clients_only = f"coalesce({query}, '') NOT LIKE 'autovacuum:%'"
    return (
        f"SELECT DISTINCT {pid}, host(a.client_addr), a.client_port, a.usename::text, a.application_name "
        f"FROM pg_locks l JOIN pg_stat_activity a ON {pid} = l.pid "
        f"WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted "
        f"AND a.datname = current_database() AND l.pid <> pg_backend_pid() AND {clients_only}"
    )
