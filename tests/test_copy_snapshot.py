"""S taken on a paused streaming replica: the transactions running there must not read as copied (real servers)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from pgleap.config import ServerConfig
from pgleap.lab import Lab, LabServer
from pgleap.lab.replica import wait_for_replay
from pgleap.upgrade.copy.readside import ReplicaReadSide
from pgleap.upgrade.replay.snapshot import parse_snapshot


def _config(server: LabServer) -> ServerConfig:
    return ServerConfig(server.host, server.port, "app", server.superuser, server.password)


@pytest.mark.parametrize("major", [10, 18])
def test_replica_snapshot_lists_the_transactions_running_at_the_pause(lab: Lab, major: int) -> None:
    primary = lab.primary(major)
    replica = None
    try:
        primary.psql("CREATE DATABASE app")
        primary.psql("CREATE TABLE t (a int)", dbname="app")
        replica = lab.replica(primary)
        with psycopg.connect(primary.dsn("app")) as running, psycopg.connect(primary.dsn("app")) as done:
            running.execute("INSERT INTO t VALUES (1)")
            (running_txid,) = running.execute("SELECT txid_current()").fetchone() or (None,)
            done.execute("INSERT INTO t VALUES (2)")
            (done_txid,) = done.execute("SELECT txid_current()").fetchone() or (None,)
            done.commit()  # after the running one began: it lies inside [xmin, xmax) of S
            wait_for_replay(primary, replica)

            async def take() -> tuple[str, list[int]]:
                side = ReplicaReadSide(_config(replica))
                info = await side.take()
                try:
                    session = await side.session()  # a reading session must see S, not fail as "moved"
                    try:
                        rows = [r[0] for r in await session.fetch("SELECT a FROM t ORDER BY a")]
                    finally:
                        await session.close()
                finally:
                    await side.close(success=True)
                return info.snapshot, rows

            text, copied = asyncio.run(take())
            snapshot = parse_snapshot(text)
            assert copied == [2], f"the copy at S read {copied}"
            # The running transaction's rows are not in the copy, so replay must apply it: not visible in S.
            assert not snapshot.visible(running_txid), (
                f"S = {text} counts the running transaction {running_txid} as copied: replay would skip it"
            )
            assert snapshot.visible(done_txid), f"S = {text} would replay the copied transaction {done_txid} again"
            running.commit()
        wait_for_replay(primary, replica)  # replay was resumed
        assert replica.psql("SELECT count(*) FROM t", dbname="app") == "2"
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()
