"""The listener: accepts clients, owns sessions, the pause gate, cancel keys and shutdown."""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from pgleap.config import Config, ServerConfig, load_config
from pgleap.protocol import codes
from pgleap.protocol.messages import error_response
from pgleap.proxy.backend import send_cancel
from pgleap.proxy.gate import PauseGate
from pgleap.proxy.read_shift import READ_SHIFT_PHASES, ReadShiftForwarder
from pgleap.proxy.route import READ_SHIFT_ROLE, Database
from pgleap.proxy.session import Session
from pgleap.store import StateStore
from pgleap.tasks import cancel_until_done

if TYPE_CHECKING:
    from pgleap.admin.console import AdminConsole

log = logging.getLogger(__name__)
# Settling records a crash or a lost connection left pending: how soon, and how often at most, to ask again.
SETTLE_RETRY_FIRST = 1.0
SETTLE_RETRY_MAX = 30.0


def make_tls_context(config: Config) -> ssl.SSLContext | None:
    """The server-side TLS context for clients, or None when no certificate is configured."""
    proxy = config.proxy
    if proxy.tls_cert is None or proxy.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(proxy.tls_cert), str(proxy.tls_key))
    return context


class Proxy:
    """pgleap's listening server and everything connected to it."""

    def __init__(self, config: Config) -> None:
        from pgleap.admin.console import AdminConsole  # the console reads the proxy; import late

        self.config = config
        self.databases: dict[str, Database] = {u.database: Database.from_config(u) for u in config.upgrades}
        self.gate = PauseGate()
        self.sessions: dict[int, Session] = {}
        self.admin: AdminConsole = AdminConsole(self)
        self.tls_context = make_tls_context(config)
        self.shutting_down = False
        self.port = 0
        self._cancel_keys: dict[tuple[int, int], Session] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._state: StateStore | None = None
        self._changelog: Any = None  # the SQLiteChangeLog once capture has started
        self.replay: Any = None  # the ReplayService (upgrade/replay/service.py) once START REPLAY ran
        self.bypass_monitors: dict[str, Any] = {}  # database -> BypassMonitor (capture/bypass.py)
        # Result comparison of sampled reads (upgrade/verify/results.py); the capture path asks it per read.
        from pgleap.upgrade.verify.results import ResultValidator, replayer_lookup

        self.validator: ResultValidator | None = ResultValidator(
            config.upgrades, replayer_lookup(self), lambda: self._changelog
        )
        self._verifier: Any = None  # the VerifyService (upgrade/verify/service.py), made on first use
        self._watching = False  # whether the VerifyService re-syncs tables replay flags
        self.upgrades: dict[str, Any] = {}  # database -> UpgradeMachine (upgrade/machine.py) once started

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Start listening (routed where the last switch left each database: after cutover, to its target)."""
        proxy = self.config.proxy
        store = self.state_store()
        for name, database in self.databases.items():
            routed = store.route(name) if store is not None else None
            if routed is not None and routed[0] == "target" and database.upgrade.target is not None:
                database.route.switch(database.upgrade.target, "target")
                log.info("database %s: routed to its target %s since cutover", name, database.upgrade.target.describe())
                self.spawn(self._learn_source_version(database))
        if store is not None and store.capturing():
            # Capture was on when pgleap stopped (or was killed): on again before the first client comes back.
            for note in self.start_capture():
                log.info("resuming capture: %s", note)
        self._server = await asyncio.start_server(
            self._accept, proxy.listen_addr, proxy.listen_port, limit=2**20, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("pgleap listening on %s:%s", proxy.listen_addr, self.port)
        if store is not None:
            from pgleap.upgrade.phases import RESUMED, Phase

            # An upgrade killed in any phase goes on from that phase.
            for name in sorted(self.databases):
                record = store.phase(name)
                if record is not None and Phase(record.phase) in RESUMED:
                    log.info("resuming the upgrade: %s", self.start_upgrade([name])[0])

    async def _learn_source_version(self, database: Database) -> None:
        """After a restart on the target, no client session reaches the source: ask it its version once, for
        the version adapters (sessions moving to the target afterwards use it)."""
        from pgleap.upgrade.copy.connect import connect

        try:
            conn = await connect(database.upgrade.source, role="source")
            try:
                database.note_server_version("source", str(await conn.fetchval("SHOW server_version")))
            finally:
                await conn.close()
        except Exception as exc:
            log.warning(
                "database %s: the source's version is unknown (%s); statements are not adapted",
                database.upgrade.database,
                exc,
            )

    async def wait_stopped(self) -> None:
        """Return once `shutdown` has finished."""
        await self._stopped.wait()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(self, reader, writer, next(self._ids))
        self.sessions[session.id] = session
        try:
            await session.run()
        except Exception:
            log.exception("session %s failed", session.id)
            if session.forwarder is not None:
                session.forwarder.close()
            writer.close()
        finally:
            self.sessions.pop(session.id, None)
            self._cancel_keys.pop(session.key, None)

    def state_store(self, *, create: bool = False) -> StateStore | None:
        """The upgrade state store, once an upgrade step has created it (pgleap never creates it just to read)."""
        if self._state is None and (create or self.config.proxy.state_path.exists()):
            self._state = StateStore(self.config.proxy.state_path)
        return self._state

    def start_capture(self) -> list[str]:
        """Capture every database's committed writes into the change log, from each session's next boundary."""
        from pgleap.store.changelog import Durability, SQLiteChangeLog
        from pgleap.upgrade.capture.capture import Capture
        from pgleap.upgrade.capture.catalog import SourceCatalog

        proxy = self.config.proxy
        if self._changelog is None:
            durability: Durability = "batch" if proxy.durability == "batch" else "commit"
            self._changelog = SQLiteChangeLog(proxy.changelog_path, durability, proxy.batch_interval)
        store = self.state_store() or StateStore(proxy.state_path)
        self._state = store
        notes = []
        for name, database in sorted(self.databases.items()):
            if database.capture is not None:
                notes.append(f"database {name}: already capturing")
                continue
            # Left pending by an earlier run's crash. Not the records of this run's sessions: after a STOP CAPTURE
            # a COMMIT may still be in flight, and its answer settles its record (txid_status would say "in
            # progress" until then, and after 30 s recovery would call it unresolved). After cutover the writes
            # go to the target and into the reverse log (route.reverse_name).
            left = [(log_id, tx) for log_id, tx in self._changelog.left_pending() if tx.database == database.log_name]
            catalog = SourceCatalog(database.upgrade.database, database.route.server)
            catalog.start()
            database.capture = Capture(database.log_name, self._changelog, catalog=catalog)
            self._adopt_changes(database)
            store.set_capturing(name, True)
            self.start_bypass_monitor(name)
            notes.append(f"database {name}: capturing into {proxy.changelog_path}")
            if left:
                notes.append(f"database {name}: settling {len(left)} change-log records a crash left pending")
                self.spawn(self._settle_pending(database, left))
        return notes

    def settle_orphan(self, database: Database, log_id: int, tx: Any) -> None:
        """Settle, from the source, a record whose COMMIT went out on a session that closed before its answer."""
        changelog = database.capture.changelog if database.capture is not None else self._changelog
        self.spawn(self._settle_pending(database, [(log_id, tx)], changelog))

    async def _settle_pending(self, database: Database, left: list[Any], changelog: Any = None) -> None:
        from pgleap.upgrade.capture.recovery import settle_pending

        changelog = changelog or self._changelog
        delay, said = SETTLE_RETRY_FIRST, None
        while True:
            try:
                # Pending records belong to the server their COMMIT went to: the one the route points at now.
                await settle_pending(changelog, database.route.server, left, database.log_name)
                if said is not None:
                    log.info("database %s: the pending change-log records are settled now", database.upgrade.database)
                return
            except Exception as exc:
                # The source restarting, or unreachable a while: its txid_status outlives both, so keep asking.
                # Until then replay stays held back behind these records, and cutover waits: say so loudly.
                if str(exc) != said:
                    log.error(
                        "database %s: could not settle %d pending change-log record(s) from the source: %s; "
                        "replay waits behind them; trying again every %.0fs at most",
                        database.upgrade.database,
                        len(left),
                        exc,
                        SETTLE_RETRY_MAX,
                    )
                said = str(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, SETTLE_RETRY_MAX)
            still = {log_id for log_id, _ in changelog.pending()}
            left = [(log_id, tx) for log_id, tx in left if log_id in still]  # some may be settled by now
            if not left:
                return

    async def row_images_ready(self, timeout: float = 10.0) -> list[str]:
        """Wait until every capturing database has loaded its source catalog; a note for each that has not."""
        deadline = asyncio.get_running_loop().time() + timeout
        notes = []
        for name, database in sorted(self.databases.items()):
            catalog = database.capture.catalog if database.capture is not None else None
            if catalog is None:
                continue
            while not catalog.loaded and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            if not catalog.loaded:
                notes.append(
                    f"database {name}: the source catalog is not loaded yet ({catalog.last_error or 'no answer'}); "
                    f"until it is, INSERTs are replayed as statements and their tables need verification"
                )
        return notes

    async def stop_capture(self, names: list[str] | None = None) -> list[str]:
        """Stop capturing `names` (every database when None; sessions stop at their next boundary) once what
        was captured is in the log."""
        notes = []
        for name, database in sorted(self.databases.items()):
            if names is not None and name not in names:
                continue
            capture = database.capture
            if capture is not None:
                database.capture = None
                self._adopt_changes(database)
                self.stop_bypass_monitor(name)
                if capture.catalog is not None:
                    await capture.catalog.stop()
                await capture.drain()
                if self._state is not None:
                    self._state.set_capturing(name, False)
                notes.append(f"database {name}: stopped; {capture.transactions} transactions in the log")
        return notes

    def read_shift_server(self, database: Database) -> ServerConfig | None:
        """The target while read-only sessions of `database` may be sent there (the gradual shift), else None."""
        upgrade = database.upgrade
        if upgrade.cutover.read_shift_percent <= 0 or upgrade.target is None or database.route.role != "source":
            return None
        machine = self.upgrades.get(upgrade.database)
        phase = machine.phase if machine is not None else None
        return upgrade.target if phase is not None and phase.value in READ_SHIFT_PHASES else None

    def read_shift_changed(self, name: str) -> None:
        """The upgrade of `name` moved: if the shift is over, shifted sessions go back to the route's server."""
        database = self.databases[name]
        if self.read_shift_server(database) is not None:
            return
        for session in list(self.sessions.values()):
            forwarder = session.forwarder
            if (
                session.database is database
                and isinstance(forwarder, ReadShiftForwarder)
                and session.server_role == READ_SHIFT_ROLE
            ):
                forwarder.end_shift()

    def _adopt_changes(self, database: Database) -> None:
        """Idle sessions of `database` take up its new capture (or route) now, not at their next transaction."""
        for session in list(self.sessions.values()):
            if session.database is database and session.forwarder is not None:
                session.forwarder.adopt_changes()

    def client_count(self) -> int:
        """Client connections now open (admin sessions included)."""
        return len(self.sessions)

    def busy_sessions(self) -> int:
        """Sessions in the middle of a transaction."""
        return sum(
            1
            for s in self.sessions.values()
            if s.forwarder is not None and s.forwarder.in_transaction and not s.forwarder.closed.done()
        )

    def register_cancel_key(self, session: Session) -> tuple[int, int]:
        """Give `session` a BackendKeyData key unique among live sessions."""
        key = session.new_key()
        while key in self._cancel_keys:
            key = session.new_key()
        self._cancel_keys[key] = session
        return key

    async def forward_cancel(self, pid: int, secret: int) -> None:
        """Pass a client's CancelRequest to the server its session is connected to."""
        session = self._cancel_keys.get((pid, secret))
        if session is None or session.forwarder is None:
            log.info("cancel request with an unknown key ignored")
            return
        backend = session.forwarder.backend
        await send_cancel(backend.server, backend.pid, backend.secret)

    async def pause(self, timeout: float | None = None) -> int:
        """Hold new transactions; wait for running ones to finish. Returns how many are still running."""
        self.gate.pause()
        return await self.gate.wait_drained(self.busy_sessions, timeout)

    def resume(self) -> None:
        """Release held transactions."""
        self.gate.resume()

    def reload(self) -> list[str]:
        """Re-read the config file; apply what can change live and say what needs a restart."""
        if self.config.path is None:
            return ["no config file to reload (started from an in-memory config)"]
        new = load_config(self.config.path)
        notes: list[str] = []
        if (new.proxy.listen_addr, new.proxy.listen_port) != (
            self.config.proxy.listen_addr,
            self.config.proxy.listen_port,
        ):
            notes.append("listen address changed: takes effect after a restart")
        if (new.proxy.tls_cert, new.proxy.tls_key) != (self.config.proxy.tls_cert, self.config.proxy.tls_key):
            self.tls_context = make_tls_context(new)
            notes.append("TLS certificate reloaded")
        for upgrade in new.upgrades:
            if upgrade.database not in self.databases:
                self.databases[upgrade.database] = Database.from_config(upgrade)
                notes.append(f"database {upgrade.database} added")
            else:
                database = self.databases[upgrade.database]
                database.upgrade = upgrade
                if database.route.role == "source" and database.route.server != upgrade.source:
                    database.route.switch(upgrade.source, "source")
                    notes.append(
                        f"database {upgrade.database}: sessions move to source {upgrade.source.describe()} "
                        "at their next transaction"
                    )
        for name in set(self.databases) - {u.database for u in new.upgrades}:
            notes.append(f"database {name} removed from the config: its connected sessions stay until they close")
            del self.databases[name]
        if new.proxy.ddl != self.config.proxy.ddl:
            notes.append(f'ddl = "{new.proxy.ddl}": applies to capture now, and to replay at its next START REPLAY')
        self.config = new
        if self.validator is not None:
            self.validator.configure(new.upgrades)
        notes.append("users, admin credentials and limits reloaded")
        return notes

    async def shutdown(self) -> None:
        """Stop accepting, let running transactions finish (bounded), then close every session."""
        if self.shutting_down:
            await self._stopped.wait()
            return
        self.shutting_down = True
        if self._server is not None:
            self._server.close()
        timeout = self.config.proxy.shutdown_timeout
        still = await self.pause(timeout)
        if still:
            log.warning("shutdown: %d transactions still running after %.0fs; closing them", still, timeout)
        goodbye = error_response("terminating connection: pgleap is shutting down", codes.ADMIN_SHUTDOWN, "FATAL")
        for session in list(self.sessions.values()):
            if session.forwarder is not None:
                session.forwarder.close(goodbye)
            else:
                session.writer.close()
        await asyncio.sleep(0)
        for name in list(self.bypass_monitors):
            self.stop_bypass_monitor(name)
        await self.stop_upgrades()
        for database in self.databases.values():
            if database.capture is not None and database.capture.catalog is not None:
                await database.capture.catalog.stop()
        await self._close_changelog()
        await self._end_background_tasks()
        self._stopped.set()
        log.info("pgleap stopped")

    async def _end_background_tasks(self) -> None:
        """What is still running in the background (a watcher between two checks) ends with the proxy,
        rather than being destroyed pending when the loop closes."""
        current = asyncio.current_task()
        left = [task for task in self._tasks if task is not current and not task.done()]
        await asyncio.gather(*(cancel_until_done(task, 1.0) for task in left), return_exceptions=True)

    async def _close_changelog(self) -> None:
        """Make every settle durable before exiting, so that a clean stop leaves nothing pending to recover."""
        if self._changelog is None:
            return
        if self.replay is not None:
            await self.stop_replay()
        for database in self.databases.values():
            if database.capture is not None:
                try:
                    await database.capture.drain()
                except Exception as exc:  # the log's own errors are already reported; say what this means
                    log.error("shutdown: the change log could not be flushed (%s); the next start recovers it", exc)
        self._changelog.close()

    def start_replay(self, snapshots: dict[str, str] | None = None, names: list[str] | None = None) -> list[str]:
        """Apply each database's change log on its target, from the copy's S (or from `snapshots[database]`).

        A database cut over to its target replays its reverse log into its source instead, from the switch.
        """
        from pgleap.upgrade.replay.errors import ReplayError
        from pgleap.upgrade.replay.journal import ApplyJournal
        from pgleap.upgrade.replay.service import ReplayService

        if self._changelog is None:
            # Only this process may open the log (it is locked), and capture is what opens it.
            raise ReplayError("no change log is open: START CAPTURE first (replay applies what capture logs)")
        if self.replay is None:
            path = self.config.proxy.changelog_path
            journal = ApplyJournal(path.with_name(f"{path.stem}.journal.db"))
            proxy = self.config.proxy
            options = {
                "batch_size": proxy.replay_batch_size,
                "on_apply_error": proxy.on_apply_error,
                "queue_ddl": proxy.ddl == "queue",
                "retain": proxy.change_log_retain,
            }
            self.replay = ReplayService(self._changelog, journal, replayer_options=options)
        from pgleap.upgrade.switch import direction

        store = self.state_store()
        given = dict(snapshots or {})
        upgrades = []
        for name in sorted(self.databases) if names is None else names:
            database = self.databases[name]
            routed = store.route(name) if store is not None else None
            if database.route.role == "target" and routed is not None:
                reverse = direction(database.upgrade, "target")
                given.setdefault(reverse.database, routed[1])
                upgrades.append(reverse)
            else:
                upgrades.append(database.upgrade)
        notes: list[str] = self.replay.start_all(upgrades, store, given)
        if not self._watching:
            self._watching = True
            replay = self.replay
            self.spawn(
                self._watch_flagged(lambda: [n for n in sorted(self.databases) if replay.running(n)], replay.journal)
            )
        return notes

    async def _watch_flagged(self, databases: Any, journal: Any) -> None:
        try:
            await self.verifier().watch_flagged(databases, journal)
        finally:
            self._watching = False

    async def stop_replay(self) -> list[str]:
        """Stop every database's replay after its current batch."""
        if self._verifier is not None:
            self._verifier.stop_watching()
        if self.replay is None:
            return []
        notes: list[str] = await self.replay.stop_all()
        return notes

    def start_upgrade(self, names: list[str] | None = None) -> list[str]:
        """START UPGRADE: drive every database with a target (or `names`) through the upgrade's phases."""
        from pgleap.upgrade.machine import UpgradeMachine

        store = self.state_store(create=True)
        assert store is not None
        notes = []
        for name in names if names is not None else sorted(self.databases):
            if self.databases[name].upgrade.target is None:
                notes.append(f"database {name}: no target configured; not upgraded")
                continue
            machine = self.upgrades.get(name) or UpgradeMachine(self, name, store)
            self.upgrades[name] = machine
            notes.append(machine.start())
        return notes

    async def stop_upgrades(self) -> None:
        """Stop driving every upgrade; its phase stays persisted, so the next start goes on from it."""
        for machine in self.upgrades.values():
            await machine.stop()

    @property
    def changelog(self) -> Any:
        """The change log capture writes (None before START CAPTURE)."""
        return self._changelog

    def verifier(self) -> Any:
        """The VerifyService: verification and re-sync at replay's points (VERIFY TABLE, FORCE RESYNC TABLE)."""
        if self._verifier is None:
            from pgleap.upgrade.verify.service import VerifyService

            self._verifier = VerifyService(
                lambda name: self.config.upgrade_for(name),
                lambda name: self.replay.replayer(name) if self.replay is not None else None,
            )
        return self._verifier

    def start_bypass_monitor(self, database_name: str) -> None:
        """Start looking for sessions writing on the database's source without going through pgleap."""
        from pgleap.upgrade.capture.bypass import BypassMonitor

        database = self.databases.get(database_name)
        if database is None:
            return
        source = database.upgrade.source
        monitor = self.bypass_monitors.get(database_name)
        if monitor is None or monitor.source != source:
            if monitor is not None:
                monitor.stop()

            def own_pids() -> set[int]:
                # Every server connection pgleap holds to this source, whatever state its session is in.
                return {
                    s.forwarder.backend.pid
                    for s in list(self.sessions.values())
                    if s.forwarder is not None
                    and (s.forwarder.backend.server.host, s.forwarder.backend.server.port) == (source.host, source.port)
                }

            monitor = BypassMonitor(database_name, source, own_pids, self.config.proxy.bypass_check_interval)
            self.bypass_monitors[database_name] = monitor
        monitor.start()

    def stop_bypass_monitor(self, database_name: str) -> None:
        """Stop looking for bypassing writers on the database's source (what was seen stays in status)."""
        monitor = self.bypass_monitors.get(database_name)
        if monitor is not None:
            monitor.stop()
