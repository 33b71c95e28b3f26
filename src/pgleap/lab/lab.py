"""Lab: a context manager that owns a temp directory and every server started in it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from pgleap.lab.binaries import find_install
from pgleap.lab.errors import LabError
from pgleap.lab.osuser import give_to_server_user
from pgleap.lab.replica import create_replica
from pgleap.lab.server import LabServer, init_server


class Lab:
    """Starts primaries, replicas and targets under one temp dir; stops them all and removes it on exit."""

    def __init__(self, basedir: Path | None = None, *, keep: bool = False) -> None:
        self._owns_basedir = basedir is None
        if basedir is None:
            basedir = Path(tempfile.mkdtemp(prefix="pgleap-lab-", dir="/tmp"))
            give_to_server_user(basedir)
        self.basedir = basedir
        self.keep = keep
        self.servers: list[LabServer] = []
        self._counter = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(raise_errors=exc is None)

    def _name(self, role: str, major: int) -> str:
        self._counter += 1
        return f"{role}{major}-{self._counter}"

    def _new(
        self, role: str, major: int, name: str | None, auth: str, settings: dict[str, str] | None, start: bool
    ) -> LabServer:
        server = init_server(
            find_install(major),
            name=name or self._name(role, major),
            auth=auth,
            basedir=self.basedir,
            settings=settings,
        )
        self.servers.append(server)
        if start:
            server.start()
        return server

    def primary(
        self,
        major: int,
        *,
        name: str | None = None,
        auth: str = "scram-sha-256",
        settings: dict[str, str] | None = None,
        start: bool = True,
    ) -> LabServer:
        """A new primary (the source, Alice) of `major`, started unless start=False."""
        return self._new("primary", major, name, auth, settings, start)

    def target(
        self,
        major: int,
        *,
        name: str | None = None,
        auth: str = "scram-sha-256",
        settings: dict[str, str] | None = None,
        start: bool = True,
    ) -> LabServer:
        """A new upgrade target (Charles) of `major`, started unless start=False."""
        return self._new("target", major, name, auth, settings, start)

    def replica(self, of: LabServer, *, name: str | None = None) -> LabServer:
        """A streaming replica (Bob) of a running server, returned once it streams."""
        replica = create_replica(of, name=name or self._name("replica", of.major), basedir=self.basedir)
        self.servers.append(replica)
        return replica

    def start(self, server: LabServer) -> None:
        """Start (or restart) a server of this lab."""
        server.start()

    def stop(self, server: LabServer, mode: str = "fast") -> None:
        """Stop a server of this lab."""
        server.stop(mode)

    def stop_all(self) -> list[str]:
        """Stop every server (replicas first); returns the errors instead of stopping at the first one."""
        errors: list[str] = []
        for server in reversed(self.servers):
            try:
                server.stop()
            except LabError as exc:
                errors.append(f"{server.name}: {exc}")
        return errors

    def close(self, raise_errors: bool = True) -> None:
        """stop_all() and remove the temp dir (unless keep=True or the dir was given to us)."""
        errors = self.stop_all()
        if self._owns_basedir and not self.keep and not any(s.is_running() for s in self.servers):
            shutil.rmtree(self.basedir, ignore_errors=True)
        if errors and raise_errors:
            raise LabError("could not stop every lab server:\n" + "\n".join(errors))
