"""Moving a database's clients from one server to the other with a pause well under a second: cutover
(source → target) and rollback after it (target → source), both the same procedure.

1. Before the pause: the catalog the new direction's capture needs for row images loads from the new server.
2. PAUSE: new transactions wait at their boundary; the ones running finish (past `timeout` the switch is
   aborted and clients resume where they were: nothing happened yet). Then each session's connection is
   asked what it holds (proxy/session_state.py): one holding a temporary table, a cursor WITH HOLD or a
   session advisory lock cannot move, so the switch resumes and waits for it, without a pause, for up to
   `session_wait` (then it is refused, naming the sessions).
3. What was captured reaches the log, and replay applies all of it: the new server holds every write.
4. Sequences are set on the new server from the old one (their values do not travel with replayed rows).
5. The new server's txid_current_snapshot() is taken: the log of the new direction starts there.
6. Capture switches to the new direction's log, the route to the new server; both are persisted; replay of
   the old direction stops, replay of the new one starts (into the old server: the way back stays open).
   A session that listens moves now, its LISTENs with it: it may never send a transaction, and once
   clients resume, a NOTIFY on the new server must reach it.
7. RESUME: each other session moves at its next transaction, its prepared statements and settings with
   it (proxy/session_state.py).

Nothing a client sent is lost or doubled: no transaction runs during the switch, and each is logged in
exactly one direction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from pgleap.config import ServerConfig, UpgradeConfig
from pgleap.errors import PgleapError
from pgleap.proxy.route import Database, reverse_name
from pgleap.proxy.session_state import STATE_TIMEOUT, ServerState
from pgleap.upgrade.compat.facts import facts_for
from pgleap.upgrade.copy.connect import connect, version_num
from pgleap.upgrade.copy.sequences import copy_sequences
from pgleap.upgrade.replay.journal import flag_label

if TYPE_CHECKING:
    from pgleap.proxy.forward import Forwarder
    from pgleap.proxy.server import Proxy

log = logging.getLogger(__name__)

Side = Literal["source", "target"]
CATALOG_WAIT = 10.0  # seconds the new direction's catalog may take to load, before the pause
HOLDER_POLL = 0.5  # seconds between asking the sessions that cannot move yet


class SwitchAbortedError(PgleapError):
    """The switch could not finish within its timeout; clients were resumed on the server they were using."""


@dataclass(frozen=True)
class SwitchReport:
    """One switch, measured."""

    database: str
    to: Side
    pause_seconds: float  # from PAUSE to RESUME
    drain_seconds: float  # waiting for running transactions
    asking_seconds: float  # asking each session's connection what it holds
    catch_up_seconds: float  # waiting for replay to apply the rest
    sequences: int
    snapshot: str  # the new server's snapshot at the switch


def direction(upgrade: UpgradeConfig, to: Side) -> UpgradeConfig:
    """The replay entry of the direction that starts when clients move `to` a side: it applies their writes
    on the other side (after cutover: the reverse log, target → source)."""
    assert upgrade.target is not None
    if to == "target":
        return replace(upgrade, database=reverse_name(upgrade.database), source=upgrade.target, target=upgrade.source)
    return upgrade


async def switch(proxy: Proxy, name: str, to: Side, timeout: float, *, force: bool = False) -> SwitchReport:
    """Move `name`'s clients `to` the source or the target (see the module docstring); `force`: even though
    replay requires re-syncs first (see _check_resyncs)."""
    from pgleap.upgrade.capture.capture import Capture
    from pgleap.upgrade.capture.catalog import SourceCatalog

    database = proxy.databases[name]
    upgrade = database.upgrade
    assert upgrade.target is not None and proxy.replay is not None
    if database.route.role == to:
        raise PgleapError(f"database {name}: clients are already on its {to}")
    new_server: ServerConfig = upgrade.target if to == "target" else upgrade.source
    old_server = database.route.server
    closing = database.log_name
    opening = direction(upgrade, to)
    _check_resyncs(proxy, closing, to, force, database.route.role)  # before clients pause for nothing
    catalog = SourceCatalog(upgrade.database, new_server)
    catalog.start()
    deadline = time.monotonic() + CATALOG_WAIT
    while not catalog.loaded and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    holders_deadline = time.monotonic() + upgrade.cutover.session_wait
    try:
        while True:
            await _wait_movable(proxy, database, new_server, holders_deadline)
            started = time.monotonic()
            proxy.gate.pause()
            left = await proxy.gate.wait_drained(proxy.busy_sessions, timeout)
            drained = time.monotonic()
            if left:
                raise SwitchAbortedError(
                    f"{left} sessions were still in a transaction after {timeout:g}s; nothing was switched and "
                    f"clients go on with the {database.route.role}; try again when long transactions are done"
                )
            states = await _server_states(proxy, database, new_server)
            asked = time.monotonic()
            stuck = {f: st for f, st in states.items() if st is None or st.unmovable}
            if not stuck:
                break
            if time.monotonic() >= holders_deadline:
                raise SwitchAbortedError(_holders_message(stuck))
            proxy.gate.resume()  # one took a temporary table (or the like) since it was asked: wait again
        if database.capture is not None:
            await database.capture.drain()
        await _applied(proxy, closing, started + timeout)
        caught_up = time.monotonic()
        _check_resyncs(proxy, closing, to, force, database.route.role)  # again, everything applied
        old = await connect(old_server, role="old server")
        new = await connect(new_server, role="new server")
        try:
            sequences = await copy_sequences(old, facts_for(await version_num(old)), new)
            snapshot = str(await new.fetchval("SELECT txid_current_snapshot()::text"))
        finally:
            await old.close()
            await new.close()
        previous = database.capture
        # Route and capture change together (no await between): each session moves both at its next boundary.
        database.route.switch(new_server, to)
        database.capture = Capture(database.log_name, proxy.changelog, catalog=catalog)
        for forwarder in _forwarders(proxy, database):
            if forwarder.backend.server == new_server:  # read-shifted to the target: it is there already
                forwarder.route_version = database.route.version
                forwarder.session.server_role = to
        listeners = []
        for forwarder, state in states.items():
            forwarder.server_state = state
            if state is not None and state.listen:
                forwarder.adopt_changes()
                listeners.append(forwarder)
        # Listeners move inside the pause: once clients resume, their NOTIFYs reach the new server.
        await asyncio.gather(*(forwarder.move_now() for forwarder in listeners))
        store = proxy.state_store(create=True)
        assert store is not None
        store.set_route(name, to, snapshot)
        if previous is not None and previous.catalog is not None:
            await previous.catalog.stop()
        await proxy.replay.stop(closing)
        proxy.replay.start_all([opening], store, {opening.database: snapshot})
    except BaseException:
        if database.capture is None or database.capture.catalog is not catalog:
            await catalog.stop()
        raise
    finally:
        proxy.gate.resume()
    report = SwitchReport(
        name, to, time.monotonic() - started, drained - started, asked - drained, caught_up - asked, sequences, snapshot
    )
    log.info(
        "database %s: clients moved to the %s in a %.3fs pause (draining %.3fs, asking sessions %.3fs, "
        "catching up %.3fs, %d sequences)",
        name,
        to,
        report.pause_seconds,
        report.drain_seconds,
        report.asking_seconds,
        report.catch_up_seconds,
        sequences,
    )
    return report


def _forwarders(proxy: Proxy, database: Database, staying: ServerConfig | None = None) -> list[Forwarder]:
    """The database's open sessions, but those already on `staying` (read-shifted sessions at cutover)."""
    return [
        s.forwarder
        for s in list(proxy.sessions.values())
        if s.database is database
        and s.forwarder is not None
        and not s.forwarder.closed.done()
        and s.forwarder.backend.server != staying
    ]


async def _server_states(
    proxy: Proxy, database: Database, new_server: ServerConfig
) -> dict[Forwarder, ServerState | None]:
    """What each session that moves holds, asked on its own connection (None: it is busy)."""
    forwarders = _forwarders(proxy, database, staying=new_server)
    answers = await asyncio.gather(*(f.read_server_state(STATE_TIMEOUT) for f in forwarders), return_exceptions=True)
    states: dict[Forwarder, ServerState | None] = {}
    for forwarder, answer in zip(forwarders, answers, strict=True):
        if isinstance(answer, BaseException):
            if forwarder.closed.done():
                continue
            log.warning("session %s: cannot tell what it holds: %s", forwarder.session.id, answer)
            answer = None
        states[forwarder] = answer
    return states


async def _wait_movable(proxy: Proxy, database: Database, new_server: ServerConfig, deadline: float) -> None:
    """Before pausing: until no idle session holds what cannot move (asked without a pause; sessions in a
    transaction are asked again in the pause). Past `deadline`, the switch is refused, naming them."""
    while True:
        states = await _server_states(proxy, database, new_server)
        holders = {f: st for f, st in states.items() if st is not None and st.unmovable}
        if not holders:
            return
        if time.monotonic() >= deadline:
            raise SwitchAbortedError(_holders_message(holders))
        log.info(
            "database %s: the switch waits for %d sessions holding temporary state",
            database.upgrade.database,
            len(holders),
        )
        await asyncio.sleep(HOLDER_POLL)


def _holders_message(stuck: Mapping[Forwarder, ServerState | None]) -> str:
    names = "; ".join(
        f"session {f.session.id} ({f.session.user}@{f.session.client_addr}): "
        f"{st.unmovable if st is not None else 'did not say what it holds'}"
        for f, st in stuck.items()
    )
    return (
        f"sessions hold what cannot move to another server, still at the end of [auto_upgrade.cutover] "
        f"session_wait: {names}; nothing was switched; let them end those (DROP the temporary tables, CLOSE "
        f"the cursors, release the advisory locks, or DISCARD ALL) or close those sessions, then try again"
    )


def _check_resyncs(proxy: Proxy, log_name: str, to: Side, force: bool, role: str) -> None:
    """Refuse to move clients to the target while replay requires re-syncs (a transaction skipped there, or
    applied without its place known): the target may lack it. The way back to the source is never refused, it
    is the way out of trouble: what it would leave behind is logged."""
    assert proxy.replay is not None
    tables = proxy.replay.journal.required_resyncs(log_name)
    if not tables:
        return
    named = ", ".join(map(flag_label, tables))
    if to == "source" or force:
        log.warning(
            "%s: moving clients to the %s although replay of %s requires tables re-synced first (%s): a "
            "transaction was skipped there or applied without its place known, and may be missing",
            log_name,
            to,
            log_name,
            named,
        )
        return
    raise SwitchAbortedError(
        f"tables must be re-synced before clients move ({named}): a transaction was skipped there, or applied "
        f"without its place known; nothing was switched and clients go on with the {role}; re-sync them "
        f"(FORCE RESYNC TABLE, or VERIFY: a clean check clears them), or INITIATE CUTOVER FORCE to move without"
    )


async def _applied(proxy: Proxy, log_name: str, deadline: float) -> None:
    """Until replay of `log_name` has applied every committed record and none is pending."""
    assert proxy.replay is not None
    changelog = proxy.changelog
    while True:
        pending = sum(1 for _, tx in changelog.pending() if tx.database == log_name)
        report = proxy.replay.report(log_name)
        if report is None or not report.running:
            raise SwitchAbortedError(f"replay of {log_name} is not running; START REPLAY, then try again")
        if not pending and report.status.applied_position >= changelog.last_position(log_name):
            return
        if time.monotonic() > deadline:
            raise SwitchAbortedError(
                f"replay of {log_name} had not applied everything in time (applied {report.status.applied_position} "
                f"of {changelog.last_position(log_name)}, {pending} still pending in the log); nothing was "
                f"switched and clients go on where they were"
            )
        await asyncio.sleep(0.005)
