"""CopyJob: the bulk copy of one database, resumable, as the upgrade state machine calls it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgleap.config import UpgradeConfig
from pgleap.store import SchemaErrorRecord, StateStore
from pgleap.upgrade.compat import catalog as sql
from pgleap.upgrade.compat import facts_for
from pgleap.upgrade.copy import roles, schema
from pgleap.upgrade.copy.connect import connect, qualified, version_num
from pgleap.upgrade.copy.data import DataCopy
from pgleap.upgrade.copy.errors import CopyError, SchemaObjectError, SnapshotLostError
from pgleap.upgrade.copy.largeobjects import copy_large_objects
from pgleap.upgrade.copy.matviews import refresh_matviews
from pgleap.upgrade.copy.model import CopyOptions, Table
from pgleap.upgrade.copy.plan import load_tables
from pgleap.upgrade.copy.postdata import TablePostData, analyze_step
from pgleap.upgrade.copy.progress import LiveCounters, total_progress
from pgleap.upgrade.copy.readside import PrimaryReadSide, ReadSide, ReplicaReadSide
from pgleap.upgrade.copy.sequences import copy_sequences
from pgleap.upgrade.copy.target import prepare_target, source_encoding
from pgleap.upgrade.copy.toc import owning_tables, parse_listing
from pgleap.upgrade.copy.tools import find_tool
from pgleap.upgrade.phases import TARGET_IN_USE

log = logging.getLogger(__name__)

# Steps in stages; the steps of one stage need nothing of each other and run concurrently. Each
# table's indexes, keys and ANALYZE run during "data", as soon as its rows are in (see postdata);
# "post_data" waits for them, then builds what spans tables (foreign keys, triggers, attached indexes).
# Large objects and sequences need nothing of post-data; matviews come after it, as their definition may.
STAGES: tuple[tuple[str, ...], ...] = (
    ("roles", "dump"),
    ("pre_data",),
    ("data",),
    ("large_objects", "sequences"),
    ("post_data",),
    ("matviews",),
    ("analyze",),
)
STEPS = tuple(step for stage in STAGES for step in stage)


@dataclass
class CopyReport:
    """What a copy did: S, totals, time per step, the objects the target rejected."""

    database: str
    run_id: int
    mode: str
    snapshot: str
    resumed: bool
    restart_reason: str | None
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    step_seconds: dict[str, float] = field(default_factory=dict)
    schema_errors: list[SchemaErrorRecord] = field(default_factory=list)


def format_schema_errors(errors: list[SchemaErrorRecord]) -> str:
    """Each rejected object with its error and definition, for the DBA."""
    return "\n\n".join(
        f"[{e.section}] {e.object}\n  error: {e.error}\n  definition:\n    " + e.definition.replace("\n", "\n    ")
        for e in errors
    )


_TABLES_BY_SIZE = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
ORDER BY c.relpages DESC
"""


async def _all(steps: list[Coroutine[Any, Any, None]]) -> None:
    """Run steps concurrently; the first failure cancels the others and is raised as it is."""
    if len(steps) == 1:
        await steps[0]
        return
    tasks = [asyncio.create_task(step) for step in steps]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class CopyJob:
    """Copies the source database of `upgrade` to its target at one snapshot S; `run()` resumes if interrupted."""

    def __init__(
        self,
        upgrade: UpgradeConfig,
        store: StateStore,
        options: CopyOptions | None = None,
        *,
        workdir: Path | None = None,
        bindir: Path | None = None,
        restart: bool = False,
        on_snapshot: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        if upgrade.target is None:
            raise CopyError(
                f"auto_upgrade {upgrade.database!r} has no target_* settings; set target_host, "
                f"target_port and target_user to copy"
            )
        self.upgrade = upgrade
        self.target = upgrade.target
        self.store = store
        self.options = options or CopyOptions(parallel_workers=upgrade.sync.parallel_workers)
        self.database = upgrade.database
        self.workdir = workdir or store.path.parent / f"{store.path.stem}.{upgrade.database}.copy"
        self.bindir = bindir
        self.restart = restart
        self.live = LiveCounters()
        self.step = "starting"
        self._read_side: ReadSide | None = None
        self._post: TablePostData | None = None
        self._tools: dict[str, Path] = {}
        # Called once a new S is recorded, before any data is read (the state machine, tests).
        self.on_snapshot = on_snapshot

    @property
    def mode(self) -> str:
        """'replica' when Bob is configured, else 'primary'."""
        return "replica" if self.upgrade.replica is not None else "primary"

    def _new_read_side(self) -> ReadSide:
        if self.upgrade.replica is not None:
            return ReplicaReadSide(self.upgrade.replica)
        return PrimaryReadSide(self.upgrade.source)

    async def _open(self) -> CopyReport:
        """Resume the stored run when its S still holds, else start a new run (and say why)."""
        run = self.store.run(self.database)
        reason: str | None = None
        side = self._new_read_side()
        if run is not None and run.status != "done" and not self.restart:
            try:
                if run.mode != self.mode:
                    raise SnapshotLostError(
                        f"the previous run read from the {run.mode}, this one reads from the {self.mode}"
                    )
                if run.snapshot is None:
                    raise SnapshotLostError("the previous run stopped before S was recorded")
                if not isinstance(side, ReplicaReadSide):
                    raise SnapshotLostError(
                        "the snapshot exported on the primary ended with the previous pgleap process"
                    )
                await side.reuse(run)
                self._read_side = side
                log.info("resuming copy run %d at S = %s", run.run_id, run.snapshot)
                return CopyReport(self.database, run.run_id, run.mode, run.snapshot, True, None)
            except SnapshotLostError as exc:
                reason = f"S of run {run.run_id} can no longer be honoured: {exc}"
                log.warning("%s; starting the copy over", reason)
        elif run is not None:
            reason = "restart requested" if self.restart else "the previous copy finished; copying again"
        # Check (or recreate) the target before recording a run: a run in the store means pgleap
        # owns the target database's contents and may drop them to start over.
        if run is not None:
            self._refuse_dropping_a_live_target()
        target_oid = await self._prepare_target(recreate=run is not None)
        new = self.store.start_run(self.database, self.mode, reason, target_oid=target_oid)
        info = await side.take()
        self._read_side = side
        self.store.set_snapshot(self.database, info.snapshot, info.lsn, info.replica_start)
        self._remove_dump()
        if self.on_snapshot is not None:
            await self.on_snapshot(info.snapshot)
        return CopyReport(self.database, new.run_id, self.mode, info.snapshot, False, reason)

    def _refuse_dropping_a_live_target(self) -> None:
        """Copying again drops the target database: never once it takes the clients' writes, or replay's."""
        routed = self.store.route(self.database)
        if routed is not None and routed[0] == "target":
            raise CopyError(
                f"database {self.database}: its clients were moved to the target {self.target.describe()} at "
                f"cutover, and copying again would drop the database that now takes their writes; to copy "
                f"again, ROLLBACK UPGRADE first (clients go back to the source, with every write)"
            )
        phase = self.store.phase(self.database)
        if phase is not None and phase.phase in TARGET_IN_USE:
            raise CopyError(
                f"database {self.database}: the upgrade is {phase.phase}, so replay applies the change log to "
                f"the target, and copying again would drop that database under it; to copy again, ROLLBACK "
                f"UPGRADE and START UPGRADE (which copies afresh)"
            )

    async def _prepare_target(self, *, recreate: bool) -> int:
        conn = await connect(self.upgrade.source, role="source")
        try:
            encoding = await source_encoding(conn)
        finally:
            await conn.close()
        return await prepare_target(self.target, encoding, recreate=recreate)

    @property
    def _dump_path(self) -> Path:
        return self.workdir / "schema.dump"

    def _remove_dump(self) -> None:
        self._dump_path.unlink(missing_ok=True)

    async def run(self) -> CopyReport:
        """Run (or resume) the copy to the end; raises CopyError subclasses with what to do."""
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        report = await self._open()
        side = self._read_side
        assert side is not None
        success = False
        try:
            for stage in STAGES:
                todo = [step for step in stage if self._needs(step)]
                if todo:
                    self.step = "+".join(todo)
                    await _all([self._run_step(step, side, report) for step in todo])
            success = True
        finally:
            self.step = "done" if success else "failed"
            if self._post is not None and not success:
                await self._post.cancel()
            await side.close(success=success and self.options.resume_replay)
            if not success:
                self.store.finish_run(self.database, "failed")
        self.store.finish_run(self.database, "done")
        total = total_progress(self.store, self.database)
        report.rows, report.bytes = total.rows, total.bytes
        report.seconds = time.monotonic() - started
        report.schema_errors = self.store.schema_errors(self.database)
        return report

    def _needs(self, step: str) -> bool:
        # A dump removed since (a new run) must be taken again, even though its step is done.
        done = self.store.step_status(self.database, step) == "done"
        return not done or (step == "dump" and not self._dump_path.exists())

    async def _run_step(self, step: str, side: ReadSide, report: CopyReport) -> None:
        rerun = self.store.step_status(self.database, step) == "started"
        self.store.mark_step(self.database, step, "started")
        t0 = time.monotonic()
        await getattr(self, f"_step_{step}")(side, rerun)
        report.step_seconds[step] = time.monotonic() - t0
        self.store.mark_step(self.database, step, "done")

    def _handle(self, errors: list[SchemaErrorRecord]) -> None:
        for error in errors:
            self.store.add_schema_error(self.database, error)
        if errors and self.options.on_schema_error == "stop":
            raise SchemaObjectError(
                f"the target rejected {len(errors)} schema object(s); fix them (or set on_schema_error = "
                f'"skip" to copy without them) and run the copy again:\n\n' + format_schema_errors(errors)
            )

    async def _tool(self, name: str) -> Path:
        # Looked up once per name: each lookup runs the program and connects to the target.
        if name not in self._tools:
            conn = await connect(self.target, role="target")
            try:
                major = await version_num(conn) // 10000
            finally:
                await conn.close()
            self._tools[name] = find_tool(name, major, self.bindir)
        return self._tools[name]

    # -- steps -------------------------------------------------------------------------------

    async def _step_roles(self, side: ReadSide, rerun: bool) -> None:
        del rerun  # applying roles is idempotent
        if not self.options.copy_roles:
            return
        tool = await self._tool("pg_dumpall")
        conn = await connect(side.server, role=side.role)
        try:
            superuser = bool(await conn.fetchval(sql.is_superuser_sql()))
        finally:
            await conn.close()
        script = await roles.dump_roles(tool, side.server, with_passwords=superuser)
        statements = roles.adapt(roles.split_statements(script), {self.target.user})
        self._handle(await roles.apply_roles(self.target, statements))

    async def _step_dump(self, side: ReadSide, rerun: bool) -> None:
        del rerun
        tool = await self._tool("pg_dump")
        await schema.dump_schema(tool, side.server, self._dump_path, side.dump_args())

    async def _restore(self, section: str, jobs: int, rerun: bool) -> None:
        tool = await self._tool("pg_restore")
        self._handle(
            await schema.restore_section(
                tool,
                self.target,
                self._dump_path,
                section,
                jobs=jobs,
                stop_on_error=self.options.on_schema_error == "stop",
                rerun=rerun,
            )
        )

    async def _step_pre_data(self, side: ReadSide, rerun: bool) -> None:
        del side
        await self._restore("pre-data", 1, rerun)

    async def _restore_entries(self, lines: list[str], what: str, rerun: bool, jobs: int = 1) -> None:
        list_file = self.workdir / f"post-data-{lines[0].split(';', 1)[0]}.list"
        self._handle(
            await schema.restore_entries(
                await self._tool("pg_restore"),
                self.target,
                self._dump_path,
                lines,
                list_file,
                section="post-data",
                what=what,
                jobs=jobs,
                stop_on_error=self.options.on_schema_error == "stop",
                rerun=rerun,
            )
        )

    async def _start_post(self, side: ReadSide) -> TablePostData:
        """The pool that builds each table's keys once its data is in."""
        listing = await schema.list_section(await self._tool("pg_restore"), self._dump_path, "post-data")
        conn = await side.session()
        try:
            index_tables, key_tables = await owning_tables(conn)
        finally:
            await conn.close()
        self._post = TablePostData(
            self.store,
            self.database,
            self.target,
            parse_listing(listing, index_tables, key_tables),
            self._restore_entries,
            workers=self.options.parallel_workers,
            analyze=self.options.analyze,
        )
        return self._post

    async def _copied_tables(self, side: ReadSide) -> list[Table]:
        conn = await side.session()
        try:
            return await load_tables(conn, side.facts, allow_binary=self.options.binary)
        finally:
            await conn.close()

    async def _step_data(self, side: ReadSide, rerun: bool) -> None:
        del rerun
        # The pool runs on after this step; post_data waits for it and raises what it met. A key the
        # target rejects therefore stops the copy (on_schema_error = "stop") only once all data is
        # in, as before the overlap: a rerun keeps that data and builds only what is missing.
        post = await self._start_post(side)
        await DataCopy(
            self.store,
            self.database,
            side,
            self.upgrade.source,
            self.target,
            self.options,
            self.live,
            on_table_done=post.table_done,
        ).run()

    async def _step_large_objects(self, side: ReadSide, rerun: bool) -> None:
        del rerun
        source = await side.session()
        target = await connect(self.target, role="target")
        try:
            count = await copy_large_objects(source, side.facts, target)
            log.info("copied %d large objects", count)
        finally:
            await source.close()
            await target.close()

    async def _step_post_data(self, side: ReadSide, rerun: bool) -> None:
        post = self._post
        if post is None:  # resumed after the data step: every table's rows are in
            post = await self._start_post(side)
            for table in await self._copied_tables(side):
                post.table_done(table)
        await post.finish()
        # What spans tables, or belongs to none that was copied: foreign keys (now that every key
        # they reference exists), triggers, rules, partitioned indexes and their attachments, ...
        rest = [e.line for e in post.plan.rest_without(post.handled)]
        if rest:
            await self._restore_entries(rest, "the rest of post-data", rerun, self.options.parallel_workers)

    async def _step_matviews(self, side: ReadSide, rerun: bool) -> None:
        del rerun
        source = await side.session()
        target = await connect(self.target, role="target")
        try:
            self._handle(await refresh_matviews(source, side.facts, target))
        finally:
            await source.close()
            await target.close()

    async def _step_sequences(self, side: ReadSide, rerun: bool) -> None:
        del side, rerun
        # From the primary, never the standby (a 9.x standby reads sequences up to 32 values ahead).
        primary = await connect(self.upgrade.source, role="source")
        target = await connect(self.target, role="target")
        try:
            facts = facts_for(await version_num(primary))
            count = await copy_sequences(primary, facts, target)
            log.info("set %d sequences from the primary", count)
        finally:
            await primary.close()
            await target.close()

    async def _step_analyze(self, side: ReadSide, rerun: bool) -> None:
        del side, rerun
        if not self.options.analyze:
            return
        # Planner statistics do not travel with a dump. One ANALYZE per table, largest first, spread
        # over the copy's sessions: a single database-wide ANALYZE would run on one core only.
        target = await connect(self.target, role="target")
        try:
            rows = await target.fetch(_TABLES_BY_SIZE)
        finally:
            await target.close()
        tables: asyncio.Queue[str] = asyncio.Queue()
        for schema_name, name in rows:
            # Most tables were analyzed right after their indexes, during the data step.
            if self.store.step_status(self.database, analyze_step(f"{schema_name}.{name}")) != "done":
                tables.put_nowait(qualified(schema_name, name))

        async def analyze_worker() -> None:
            conn = await connect(self.target, role="target")
            try:
                while not tables.empty():
                    await conn.execute(f"ANALYZE {tables.get_nowait()}")
            finally:
                await conn.close()

        if tables.empty():
            return
        workers = min(self.options.parallel_workers, tables.qsize())
        await asyncio.gather(*(analyze_worker() for _ in range(workers)))
