"""Sampling a running process with py-spy and summarising where its CPU time goes.

py-spy writes "folded" stacks (one `frame;frame;...;leaf count` line per distinct stack), which
flamegraph.pl and https://www.speedscope.app read as they are; the summary here ranks functions by
self time (the leaf frame of a sample) and by inclusive time (anywhere on the stack).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from _common import BenchError, tail

_LINE_NUMBER = re.compile(r":\d+\)$")
_NATIVE_ADDRESS = re.compile(r"^0x[0-9a-f]+ \((.*)\)$")


def find_py_spy() -> Path:
    """py-spy next to the running interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return beside
    found = shutil.which("py-spy")
    if found is None:
        raise BenchError("--profile needs py-spy: `.venv/bin/pip install py-spy` (it is not a pgleap dependency)")
    return Path(found)


class PySpyRecorder:
    """`py-spy record` of one pid from start() until stop(), written as folded stacks."""

    def __init__(self, py_spy: Path, pid: int, output: Path, *, rate: int = 200, native: bool = False) -> None:
        self.py_spy = py_spy
        self.pid = pid
        self.output = output
        self.rate = rate
        self.native = native
        self.log_path = output.with_suffix(".py-spy.log")
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start sampling (in the background)."""
        argv = [
            str(self.py_spy),
            "record",
            "--pid",
            str(self.pid),
            "--format",
            "raw",
            "--output",
            str(self.output),
            "--rate",
            str(self.rate),
            "--nonblocking" if not self.native else "--native",
        ]
        with self.log_path.open("wb") as log:
            self._popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self, timeout: float = 60.0) -> Counter[str]:
        """Stop sampling (SIGINT makes py-spy write its file) and return the folded stacks."""
        popen = self._popen
        if popen is None:
            return Counter()
        if popen.poll() is None:
            os.kill(popen.pid, signal.SIGINT)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(popen.pid, signal.SIGKILL)
                popen.wait(10)
        self._popen = None
        if not self.output.exists():
            raise BenchError(f"py-spy wrote no profile:\n{tail(self.log_path)}")
        stacks = read_folded(self.output)
        self.output.unlink()
        return stacks


def read_folded(path: Path) -> Counter[str]:
    """Folded stacks of a file: {"a;b;c": samples}."""
    stacks: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def write_folded(stacks: Counter[str], path: Path) -> None:
    """Write folded stacks, heaviest first."""
    path.write_text("".join(f"{stack} {count}\n" for stack, count in stacks.most_common()))


def _function(frame: str) -> str:
    """A frame without its line number; unnamed native frames are merged per library."""
    native = _NATIVE_ADDRESS.match(frame)
    if native:
        return f"[unnamed] ({native.group(1)})"
    return _LINE_NUMBER.sub(")", frame)


def _module(function: str) -> str:
    """The file or library a frame belongs to."""
    start = function.rfind(" (")
    return function[start + 2 : -1] if start >= 0 and function.endswith(")") else function


def _deepest_in(frames: list[str], marker: str) -> str | None:
    """The innermost frame (with its line number) whose file contains `marker`, the CLI entry point aside."""
    for frame in reversed(frames):
        if marker in frame and f"{marker}cli/" not in frame:
            return frame
    return None


def rankings(
    stacks: Counter[str], marker: str = "pgleap/"
) -> tuple[Counter[str], Counter[str], Counter[str], Counter[str]]:
    """Samples per function as the leaf (self), per module of the leaf, per function anywhere on the stack,
    and per innermost source line of `marker` files (where pgleap's own code was when it was sampled)."""
    own: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")
        functions = [_function(frame) for frame in frames]
        own[functions[-1]] += count
        modules[_module(functions[-1])] += count
        for function in set(functions):
            inclusive[function] += count
        line = _deepest_in(frames, marker)
        lines[line or "(outside pgleap's code: the event loop, uvloop/libuv, system calls)"] += count
    return own, modules, inclusive, lines


def _ranking(title: str, counter: Counter[str], total: int, top: int) -> list[str]:
    lines = [title]
    for name, count in counter.most_common(top):
        lines.append(f"  {100.0 * count / total:5.1f}%  {count:7d}  {name}")
    return lines


def summarize(stacks: Counter[str], *, seconds: float, rate: int, cpu_percent: float, top: int = 20) -> str:
    """A plain-text report of where the sampled process spent its time."""
    total = sum(stacks.values())
    if total == 0:
        return "py-spy recorded no busy samples."
    own, modules, inclusive, lines_of_code = rankings(stacks)
    lines = [
        f"{total} samples judged busy by py-spy, at {rate} Hz over {seconds:.1f} s; the process really used "
        f"{cpu_percent:.0f}% of one CPU (/proc), so py-spy also counts time blocked in system calls",
        "(a transport.write line is mostly the write() system call; time outside pgleap's code is the",
        "uvloop event loop: epoll, read(), and calling the protocol callbacks)",
    ]
    lines += _ranking("by innermost line of pgleap's code:", lines_of_code, total, top)
    lines += _ranking("self time by function (the leaf frame):", own, total, top)
    lines += _ranking("self time by file / library:", modules, total, 12)
    lines += _ranking("inclusive time by function (anywhere on the stack):", inclusive, total, top)
    return "\n".join(lines)
