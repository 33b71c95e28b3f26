"""The admin console (database "pgleap") through real clients: SHOW commands, RELOAD, PAUSE/RESUME, errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgleap.lab import LabServer
from pgleap.testing import ProxyThread

from conftest import run_tool, show, start_proxy, tool, wait_for

pytestmark = pytest.mark.integration

ADMIN_USER, ADMIN_PASSWORD = "pgleap_admin", "admin-secret"


def admin_connect(p: ProxyThread, **kwargs: Any) -> psycopg.Connection[Any]:
    """An autocommit psycopg connection to the admin console."""
    return psycopg.connect(p.dsn("pgleap", ADMIN_USER, ADMIN_PASSWORD), autocommit=True, connect_timeout=20, **kwargs)


@pytest.fixture
def admin(proxy: ProxyThread) -> Iterator[psycopg.Connection[Any]]:
    """An admin console connection to the `proxy` fixture."""
    with admin_connect(proxy) as conn:
        yield conn


def test_show_clients_lists_app_connection(proxy: ProxyThread, admin: psycopg.Connection[Any]) -> None:
    """SHOW CLIENTS has a row for an app connection with its user, database and application_name."""
    with psycopg.connect(proxy.dsn(application_name="admin_probe_app"), autocommit=True) as app:
        app.execute("select 1")
        rows = show(admin, "SHOW CLIENTS")
        mine = [r for r in rows if r["application_name"] == "admin_probe_app"]
        assert len(mine) == 1, rows
        assert mine[0]["user"] == "app"
        assert mine[0]["database"] == "app"
        assert mine[0]["state"] == "idle"
        assert mine[0]["addr"] == "127.0.0.1"
        # The admin session itself is listed too.
        assert any(r["user"] == ADMIN_USER and r["database"] == "pgleap" for r in rows)
    wait_for(
        lambda: all(r["application_name"] != "admin_probe_app" for r in show(admin, "SHOW CLIENTS")),
        what="the closed client to leave SHOW CLIENTS",
    )


def test_show_servers_reports_real_backend_pid(
    proxy: ProxyThread, backend: LabServer, admin: psycopg.Connection[Any]
) -> None:
    """SHOW SERVERS gives the pid pg_backend_pid() returns to the client, and the server's address and version."""
    with psycopg.connect(proxy.dsn(application_name="pid_probe"), autocommit=True) as app:
        pid = app.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        version = app.execute("show server_version").fetchone()[0]  # type: ignore[index]
        clients = show(admin, "SHOW CLIENTS")
        client_id = next(r["id"] for r in clients if r["application_name"] == "pid_probe")
        servers = show(admin, "SHOW SERVERS")
        mine = [r for r in servers if r["client_id"] == client_id]
        assert len(mine) == 1, servers
        assert int(mine[0]["backend_pid"]) == pid
        assert mine[0]["host"] == backend.host and int(mine[0]["port"]) == backend.port
        assert mine[0]["role"] == "source"
        assert mine[0]["server_version"] == version


def test_show_config_masks_secrets(tmp_path: Path, pg_old: LabServer) -> None:
    """SHOW CONFIG shows the source host and port but no password, admin password or hash anywhere."""
    md5_hash = "md5" + "0123456789abcdef" * 2
    p = start_proxy(
        tmp_path,
        {"app": pg_old},
        users={"app": ("app-secret", "scram-sha-256"), "hashed": ("hashed-secret", "md5")},
    )
    try:
        # A user configured only by its md5 hash: the hash must be masked too.
        cfg = tmp_path / "pgleap.toml"
        cfg.write_text(cfg.read_text() + f'[[users]]\nname = "onlyhash"\nmd5_hash = "{md5_hash}"\n')
        with admin_connect(p) as conn:
            show(conn, "RELOAD")
            rows = show(conn, "SHOW CONFIG")
        values = {r["key"]: r["value"] for r in rows}
        assert values["auto_upgrade[0].source.host"] == pg_old.host
        assert values["auto_upgrade[0].source.port"] == str(pg_old.port)
        assert values["auto_upgrade[0].source.user"] == pg_old.superuser
        assert values["pgleap.admin_user"] == ADMIN_USER
        dump = "\n".join(f"{r['key']}={r['value']}" for r in rows)
        for secret in ("app-secret", "hashed-secret", ADMIN_PASSWORD, pg_old.password, md5_hash, md5_hash[3:]):
            assert secret not in dump, f"secret {secret!r} visible in SHOW CONFIG"
        assert values["auto_upgrade[0].source.password"] != pg_old.password
    finally:
        p.stop()


def test_show_version(admin: psycopg.Connection[Any]) -> None:
    """SHOW VERSION names pgleap and its version."""
    import pgleap

    rows = show(admin, "show version")
    assert len(rows) == 1
    assert rows[0]["version"].startswith("pgleap ")
    assert pgleap.__version__ in rows[0]["version"]


def test_show_stats_counters_increase(proxy: ProxyThread, admin: psycopg.Connection[Any]) -> None:
    """SHOW STATS query, transaction, byte and error counters go up after client work."""

    def stats() -> dict[str, Any]:
        rows = show(admin, "SHOW STATS")
        return next(r for r in rows if r["database"] == "app")

    before = stats()
    with psycopg.connect(proxy.dsn(), autocommit=False) as app:
        for i in range(5):
            app.execute(f"select {i}")
        app.commit()
        with pytest.raises(psycopg.errors.DivisionByZero):
            app.execute("select 1/0")
        app.rollback()
        during = stats()
        assert int(during["clients"]) >= 1
    after = stats()
    assert int(after["total_query_count"]) >= int(before["total_query_count"]) + 6
    assert int(after["total_xact_count"]) >= int(before["total_xact_count"]) + 2
    assert int(after["total_errors"]) >= int(before["total_errors"]) + 1
    assert int(after["total_received"]) > int(before["total_received"])
    assert int(after["total_sent"]) > int(before["total_sent"])
    assert after["route"] == "source"


def test_unknown_command_error_lists_valid_commands(admin: psycopg.Connection[Any]) -> None:
    """An unknown command gets an ErrorResponse whose hint lists every valid command; the console stays usable."""
    with pytest.raises(psycopg.Error) as info:
        admin.execute("SHOW FROBNICATORS")
    diag = info.value.diag
    assert "unknown admin command" in (diag.message_primary or "")
    hint = diag.message_hint or ""
    for command in (
        "SHOW CLIENTS",
        "SHOW SERVERS",
        "SHOW CONFIG",
        "SHOW VERSION",
        "SHOW STATS",
        "PAUSE",
        "RESUME",
        "RELOAD",
        "SHUTDOWN",
    ):
        assert command in hint, f"{command} missing from hint {hint!r}"
    assert show(admin, "SHOW VERSION")


def test_psql_renders_admin_tables(proxy: ProxyThread) -> None:
    """psql talks to the console and renders SHOW CLIENTS and SHOW VERSION; an unknown command exits 1 with the hint."""
    env = {"PGPASSWORD": ADMIN_PASSWORD, "PGCONNECT_TIMEOUT": "20"}
    base = [tool("psql"), "-X", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", ADMIN_USER, "-d", "pgleap"]
    out = run_tool(base + ["-c", "SHOW CLIENTS"], timeout=60, env=env).stdout
    assert "application_name" in out and "psql" in out and "pgleap" in out
    assert "row" in out  # psql's "(N rows)" footer: it saw a real table
    out = run_tool(base + ["-At", "-c", "SHOW VERSION"], timeout=60, env=env).stdout
    assert out.startswith("pgleap ")
    bad = subprocess.run(
        base + ["-v", "VERBOSITY=verbose", "-c", "SHOW NOTHING"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert bad.returncode == 1
    assert "unknown admin command" in bad.stderr and "SHOW CLIENTS" in bad.stderr


def test_admin_wrong_password_is_refused(proxy: ProxyThread) -> None:
    """The admin console refuses a wrong password."""
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn("pgleap", ADMIN_USER, "not-the-secret"), connect_timeout=20)


def test_normal_user_cannot_use_admin_console(proxy: ProxyThread) -> None:
    """A client user with its correct password cannot log into database pgleap."""
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        psycopg.connect(proxy.dsn("pgleap", "app", "app-secret"), connect_timeout=20)
    # ...while the same credentials work for its own database.
    with psycopg.connect(proxy.dsn(), connect_timeout=20) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_admin_user_cannot_use_app_database(proxy: ProxyThread) -> None:
    """The admin credentials do not open a client database."""
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        psycopg.connect(proxy.dsn("app", ADMIN_USER, ADMIN_PASSWORD), connect_timeout=20)


def test_console_answers_prepared_commands(proxy: ProxyThread) -> None:
    """psycopg's prepared statements (Parse, Bind, Describe portal, Execute) work on the console: monitoring
    that polls with a driver's defaults keeps working after its fifth poll."""
    with admin_connect(proxy) as conn:
        for _ in range(8):  # past psycopg's prepare_threshold of 5
            (row,) = conn.execute("SHOW VERSION").fetchall()
            assert row[0].startswith("pgleap")
        assert conn.execute("SHOW STATS", prepare=True).description is not None
        notes = conn.execute("PAUSE; ", prepare=True)
        assert notes.statusmessage == "PAUSE"
        conn.execute("RESUME", prepare=True)
        (row,) = conn.execute("SHOW VERSION", prepare=True).fetchall()
        assert row[0].startswith("pgleap")


def test_console_refuses_parameters_and_stays_in_sync(proxy: ProxyThread) -> None:
    """A command with parameters, or two commands in one prepared statement, get a clear error; the
    session goes on."""
    with admin_connect(proxy) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="take no parameters"):
            conn.execute("SHOW CLIENTS -- %s", ("x",))
        with pytest.raises(psycopg.errors.SyntaxError, match="multiple commands"):
            conn.execute("SHOW VERSION; SHOW STATS", prepare=True)
        with pytest.raises(psycopg.errors.SyntaxError, match="unknown admin command"):
            conn.execute("SHOW NOTHING", prepare=True)
        assert show(conn, "SHOW VERSION")[0]["version"].startswith("pgleap")


def test_console_serves_asyncpg(proxy: ProxyThread) -> None:
    """asyncpg describes statements before it runs them: a SHOW is described and fetched; a command with
    effects is refused at Describe (not run by it) and runs through Connection.execute."""
    import asyncpg

    async def main() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=proxy.port, user=ADMIN_USER, password=ADMIN_PASSWORD, database="pgleap"
        )
        try:
            rows = await conn.fetch("SHOW VERSION")
            assert rows[0]["version"].startswith("pgleap")
            statement = await conn.prepare("SHOW STATS")
            assert "database" in [a.name for a in statement.get_attributes()]
            assert (await statement.fetch())[0]["database"] == "app"
            with pytest.raises(asyncpg.exceptions.FeatureNotSupportedError, match="has effects"):
                await conn.fetch("PAUSE")
            assert not proxy.proxy.gate.paused, "a Describe ran PAUSE"
            assert await conn.execute("PAUSE") == "PAUSE"
            assert proxy.proxy.gate.paused
            assert await conn.execute("RESUME") == "RESUME"
        finally:
            await conn.close()

    asyncio.run(main())


def test_reload_adds_user(tmp_path: Path, pg_new: LabServer) -> None:
    """RELOAD after appending a [[users]] entry lets the new user log in; earlier it could not."""
    p = start_proxy(tmp_path, {"app": pg_new})
    try:
        new_dsn = p.dsn(user="newbie", password="newbie-secret")
        with pytest.raises(psycopg.OperationalError, match="authentication failed"):
            psycopg.connect(new_dsn, connect_timeout=20)
        cfg = tmp_path / "pgleap.toml"
        cfg.write_text(
            cfg.read_text() + '\n[[users]]\nname = "newbie"\npassword = "newbie-secret"\nauth_method = "md5"\n'
        )
        with admin_connect(p) as admin:
            notes = show(admin, "RELOAD")
            assert any("reloaded" in n["note"] for n in notes), notes
        with psycopg.connect(new_dsn, connect_timeout=20) as conn:
            assert conn.execute("select current_database()").fetchone() == ("postgres",)
        with psycopg.connect(p.dsn(), connect_timeout=20) as conn:  # the old user still works
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        p.stop()


def test_reload_broken_config_keeps_old_config(tmp_path: Path, pg_old: LabServer) -> None:
    """RELOAD of a broken file answers an error naming the problem; the running config keeps serving."""
    p = start_proxy(tmp_path, {"app": pg_old})
    try:
        cfg = tmp_path / "pgleap.toml"
        with psycopg.connect(p.dsn(), autocommit=True) as app, admin_connect(p) as admin:
            cfg.write_text(cfg.read_text() + "\n[pgleap.oops\n")  # invalid TOML
            with pytest.raises(psycopg.Error, match="RELOAD failed.*not valid TOML"):
                admin.execute("RELOAD")
            cfg.write_text(cfg.read_text().replace("\n[pgleap.oops\n", "\nbogus_key = 1\n"))  # unknown key
            with pytest.raises(psycopg.Error, match="RELOAD failed.*bogus_key"):
                admin.execute("RELOAD")
            assert app.execute("select 41 + 1").fetchone() == (42,)
            assert show(admin, "SHOW VERSION")
            values = {r["key"]: r["value"] for r in show(admin, "SHOW CONFIG")}
            assert values["auto_upgrade[0].source.port"] == str(pg_old.port)
        with psycopg.connect(p.dsn(), connect_timeout=20) as conn:  # new logins use the old config
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        p.stop()


def test_pause_holds_queries_until_resume(proxy: ProxyThread, admin: psycopg.Connection[Any]) -> None:
    """While PAUSEd a client's next query waits (state held), and RESUME lets it complete without error."""
    results: dict[str, Any] = {}
    with psycopg.connect(proxy.dsn(application_name="paused_client"), autocommit=True) as app:
        app.execute("select 1")
        assert admin.execute("PAUSE").statusmessage == "PAUSE"

        def worker() -> None:
            try:
                started = time.monotonic()
                results["row"] = app.execute("select 'released'").fetchone()
                results["elapsed"] = time.monotonic() - started
            except Exception as exc:  # reported below
                results["error"] = exc

        thread = threading.Thread(target=worker, daemon=True)
        try:
            thread.start()
            wait_for(
                lambda: any(
                    r["application_name"] == "paused_client" and r["state"] == "held"
                    for r in show(admin, "SHOW CLIENTS")
                ),
                what="the client to be held by PAUSE",
            )
            time.sleep(0.5)  # give a wrongly released query the chance to finish
            assert thread.is_alive() and not results, f"query ran while paused: {results}"
            held_for = time.monotonic()
        finally:
            admin.execute("RESUME")
        thread.join(30)
        assert not thread.is_alive(), "query still blocked after RESUME"
        assert "error" not in results, results.get("error")
        assert results["row"] == ("released",)
        assert results["elapsed"] >= 0.5
        assert time.monotonic() - held_for < 30
        assert app.execute("select 2").fetchone() == (2,)


def test_pause_waits_for_running_transaction(proxy: ProxyThread, admin: psycopg.Connection[Any]) -> None:
    """PAUSE returns only after a running transaction commits; that transaction is never cut."""
    with psycopg.connect(proxy.dsn(), autocommit=False) as app:
        app.execute("select 1")  # now inside a transaction
        done = threading.Event()
        error: list[BaseException] = []

        def pause() -> None:
            try:
                with admin_connect(proxy) as other:
                    other.execute("PAUSE")
            except BaseException as exc:
                error.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=pause, daemon=True)
        thread.start()
        try:
            wait_for(lambda: proxy.proxy is not None and proxy.proxy.gate.paused, what="PAUSE to start")
            assert not done.wait(1.0), "PAUSE returned while a transaction was running"
            assert app.execute("select 2").fetchone() == (2,)  # the running transaction keeps going
            app.commit()
            assert done.wait(30), "PAUSE did not return after the transaction committed"
            assert not error, error
        finally:
            admin.execute("RESUME")
            thread.join(30)
        assert app.execute("select 3").fetchone() == (3,)
        app.commit()


def test_reload_with_changed_source_is_applied_or_reported(
    tmp_path: Path, pg_old: LabServer, pg_new: LabServer
) -> None:
    """RELOAD after moving database app to another source either routes new logins there or says a restart is needed."""
    p = start_proxy(tmp_path, {"app": pg_old})
    try:
        cfg = tmp_path / "pgleap.toml"
        cfg.write_text(cfg.read_text().replace(f"source_port = {pg_old.port}", f"source_port = {pg_new.port}"))
        with admin_connect(p) as admin:
            notes = " ".join(n["note"] for n in show(admin, "RELOAD"))
            shown = {r["key"]: r["value"] for r in show(admin, "SHOW CONFIG")}["auto_upgrade[0].source.port"]
        with psycopg.connect(p.dsn(), connect_timeout=20) as conn:
            port = conn.execute("select inet_server_port()").fetchone()[0]  # type: ignore[index]
        applied = port == pg_new.port
        reported = "restart" in notes and "app" in notes
        assert applied or reported, (
            f"RELOAD changed app's source to port {pg_new.port} (SHOW CONFIG says {shown}) but new logins still reach "
            f"{port}, and the notes do not say a restart is needed: {notes!r}"
        )
    finally:
        p.stop()


def test_a_console_session_outlives_the_login_timeout(proxy: ProxyThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """The login timeout bounds logging in, not the console session after it (it used to end it)."""
    import pgleap.proxy.session

    monkeypatch.setattr(pgleap.proxy.session, "_HANDSHAKE_TIMEOUT", 0.5)
    with admin_connect(proxy) as conn:
        time.sleep(1.0)
        assert show(conn, "SHOW VERSION")
