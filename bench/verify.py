"""bench/verify: verification time per million rows, and repairing 1% divergent rows vs re-copying the table.

One run: a PG 10 source and a PG 18 target with the same `pgbench -i -s <scale>` data, pgleap in process
capturing and replaying (S taken before any write, so the target is in step), then on pgbench_accounts:

1. VERIFY of the clean table (seconds, and seconds per million rows);
2. 1% of its rows changed on the target behind pgleap's back; VERIFY without repair finds them;
3. repair: re-sync of exactly those rows at points, and the check of those rows afterwards;
4. re-copy: FORCE RESYNC TABLE, the whole table copied again at one point (not checked afterwards).

The last lines are `name: value`, including `ratio_repair_recopy_time`: the re-sync of 3 over 4, like for
like (both re-sync at points, neither is checked), and `ratio_repair_and_check_recopy_time`, the whole of 3
(its check too) over 4. Never a test: it prints.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from _common import progress
from pgleap.config import ServerConfig
from pgleap.lab import Lab
from pgleap.lab.binaries import client_tool
from pgleap.store import StateStore
from pgleap.testing import ProxyThread, render_config

TABLE = "pgbench_accounts"


def main() -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale (100,000 accounts each)")
    parser.add_argument("--divergent", type=float, default=0.01, help="fraction of rows changed on the target")
    args = parser.parse_args()
    pgbench = str(client_tool("pgbench"))
    with tempfile.TemporaryDirectory(prefix="pgleap-bench-verify-") as tmp, Lab() as lab:
        source, target = lab.primary(10), lab.target(18)
        for server in (source, target):
            server.psql("CREATE DATABASE bench")
            progress(f"pgbench -i -s {args.scale} on PG {server.major}")
            subprocess.run(
                [pgbench, "-i", "-s", str(args.scale), "-q", server.dsn("bench")], check=True, capture_output=True
            )
        config = Path(tmp) / "pgleap.toml"
        servers = {
            name: ServerConfig(s.host, s.port, "bench", s.superuser, s.password)
            for name, s in (("source", source), ("target", target))
        }
        config.write_text(render_config({"bench": servers["source"]}, targets={"bench": servers["target"]}))
        proxy = ProxyThread(config).start()
        try:
            assert proxy.proxy is not None
            engine = proxy.proxy
            admin = psycopg.connect(proxy.dsn("pgleap", "pgleap_admin", "admin-secret"), autocommit=True)
            admin.execute("START CAPTURE")
            store = StateStore(Path(tmp) / "pgleap-state.db")
            store.start_run("bench", "primary")
            store.set_snapshot("bench", source.psql("SELECT txid_current_snapshot()", dbname="bench"), None, None)
            store.finish_run("bench")
            store.close()
            admin.execute("START REPLAY")
            verifier = engine.verifier()

            progress("verifying the clean table")
            (clean,) = proxy.call(verifier.verify("bench", [TABLE], repair=False), 1800)
            assert clean.verification.clean, f"the clean table differs: {clean.verification.differences[:5]}"
            every = max(1, round(1 / args.divergent))
            progress(f"changing every {every}th row on the target")
            target.psql(f"UPDATE {TABLE} SET abalance = abalance + 1 WHERE aid % {every} = 3", dbname="bench")
            progress("verifying the divergent table")
            (divergent,) = proxy.call(verifier.verify("bench", [TABLE], repair=False), 1800)
            keys = [d.key for d in divergent.verification.differences]
            progress(f"found {len(keys)} rows; repairing them")
            started = time.monotonic()
            done, left = proxy.call(verifier.repair_rows("bench", TABLE, keys), 1800)
            repair_seconds = time.monotonic() - started
            assert not left, f"{len(left)} rows still differ after re-sync"
            progress("re-copying the whole table")
            started = time.monotonic()
            proxy.call(verifier.force_resync("bench", TABLE), 1800)
            recopy_seconds = time.monotonic() - started
        finally:
            proxy.stop()
    rows = clean.verification.source_rows
    clean_seconds, found_seconds, copied = clean.verification.seconds, divergent.verification.seconds, done.copied
    millions = rows / 1e6
    print(f"table {TABLE}: {rows} rows, {len(keys)} divergent ({100 * len(keys) / rows:.2f}%)")
    print(f"verify clean:      {clean_seconds:8.2f} s   ({clean_seconds / millions:.2f} s per million rows)")
    print(f"verify divergent:  {found_seconds:8.2f} s   (finds {len(keys)} rows)")
    print(
        f"repair:            {repair_seconds:8.2f} s   (re-sync of {copied} rows at {done.points} point(s) "
        f"{done.seconds:.2f} s, then their check {repair_seconds - done.seconds:.2f} s)"
    )
    print(f"re-copy:           {recopy_seconds:8.2f} s   (FORCE RESYNC TABLE: the whole table at one point)")
    print(f"verify_seconds_per_million_rows: {clean_seconds / millions:.3f}")
    print(f"ratio_repair_recopy_time: {done.seconds / recopy_seconds:.3f}")
    print(f"ratio_repair_and_check_recopy_time: {repair_seconds / recopy_seconds:.3f}")
    print(f"ratio_verify_and_repair_recopy_time: {(found_seconds + repair_seconds) / recopy_seconds:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
