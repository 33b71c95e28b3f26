"""TLS between clients and pgleap."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import trustme

from pgleap.lab import LabServer

from conftest import start_proxy

pytestmark = pytest.mark.integration


def test_tls_between_client_and_pgleap(tmp_path: Path, pg_new: LabServer) -> None:
    """sslmode=verify-full against pgleap's certificate works, and the session is shown as TLS."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    extra = f'tls_cert = "{tmp_path / "server.pem"}"\ntls_key = "{tmp_path / "server.key"}"'
    proxy = start_proxy(tmp_path, {"app": pg_new}, extra=extra)
    try:
        dsn = proxy.dsn(sslmode="verify-full", sslrootcert=str(tmp_path / "ca.pem"))
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select 'over tls'").fetchone() == ("over tls",)
            assert conn.pgconn.ssl_in_use
            big = conn.execute("select repeat('x', 5000000)").fetchone()
            assert big is not None and len(big[0]) == 5_000_000
            with psycopg.connect(
                proxy.dsn(database="pgleap", user="pgleap_admin", password="admin-secret", sslmode="require"),
                autocommit=True,
            ) as admin:
                rows = admin.execute("show clients").fetchall()
            tls_by_db = {(r[2], r[5]) for r in rows}
            assert ("app", "t") in tls_by_db
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                proxy.dsn(
                    sslmode="verify-full", sslrootcert=str(tmp_path / "server.pem").replace("server", "nonexistent")
                )
            )
    finally:
        proxy.stop()


def test_sslrequest_refused_without_certificate(tmp_path: Path, pg_new: LabServer) -> None:
    """Without a certificate pgleap answers 'N': sslmode=require fails, sslmode=prefer falls back to plain."""
    proxy = start_proxy(tmp_path, {"app": pg_new})
    try:
        with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
            psycopg.connect(proxy.dsn(sslmode="require"))
        with psycopg.connect(proxy.dsn(sslmode="prefer")) as conn:
            assert not conn.pgconn.ssl_in_use
    finally:
        proxy.stop()
