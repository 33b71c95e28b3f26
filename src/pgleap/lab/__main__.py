"""`python -m pgleap.lab fetch [--major N ...]` and `python -m pgleap.lab list`."""

from __future__ import annotations

import argparse
import sys

from pgleap.lab.binaries import all_installs
from pgleap.lab.cache import cache_dir
from pgleap.lab.errors import LabError
from pgleap.lab.fetch import DEFAULT_MAJORS, fetch


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m pgleap.lab", description="PostgreSQL binaries for the pgleap lab")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_cmd = commands.add_parser("fetch", help=f"download binaries into the cache (default majors {DEFAULT_MAJORS})")
    fetch_cmd.add_argument(
        "--major",
        type=int,
        action="append",
        dest="majors",
        metavar="N",
        help="a PostgreSQL major to fetch; repeat for several",
    )
    commands.add_parser("list", help="show the binaries the lab can use")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(f"binary cache: {cache_dir()}")
            fetch(tuple(args.majors) if args.majors else DEFAULT_MAJORS, echo=print)
        else:
            for install in all_installs():
                print(install.describe())
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
