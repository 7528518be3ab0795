"""Real ``python -m kvroute`` processes for fault tests: started in their own session, watched
through their log files, signalled by pid, and always cleaned up with ``killpg``.

Every wait here is bounded; a process that does not stop on SIGTERM is killed with its whole
process group (``serve`` spawns its workers in the group), so no test leaves a process behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

KVROUTE = [sys.executable, "-m", "kvroute", "-v"]  # -v: INFO logs (registrations, epochs)

REGISTERED = re.compile(r"worker (\S+) registered \(epoch (\d+), pid (\d+)")
LOST = re.compile(r"worker (\S+) (?:lost|left) \((\w+)\)")  # left: it said goodbye


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


@dataclass(frozen=True)
class Registration:
    """A READY the broker accepted, as its INFO log line tells it."""

    worker: str
    epoch: int
    pid: int


class KvProc:
    """One ``kvroute`` subprocess (its own session and process group), output to ``log``.

    Parameters
    ----------
    args
        Arguments after ``kvroute -v``.
    log
        File receiving stdout and stderr (tests read it to see what happened).
    """

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self._out = log.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.p = subprocess.Popen(
            [*KVROUTE, *args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 120.0, count: int = 1) -> list[re.Match[str]]:
        """Block until ``pattern`` matched ``count`` times in the log; returns the matches.

        Fails (with the log's tail) if the process exits first or on timeout.
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = list(rx.finditer(self.text()))
            if len(found) >= count:
                return found
            if self.p.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited: {self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {pattern!r} x{count} in {self.log}:\n{self.text()[-3000:]}"
                )
            time.sleep(0.02)

    def registrations(self) -> list[Registration]:
        """Every registration the broker in this process logged, oldest first."""
        return [Registration(m[1], int(m[2]), int(m[3])) for m in REGISTERED.finditer(self.text())]

    def live_workers(self) -> set[str]:
        """Workers whose last broker log event is a registration (not a loss)."""
        events = [(m.start(), m[1], True) for m in REGISTERED.finditer(self.text())]
        events += [(m.start(), m[1], False) for m in LOST.finditer(self.text())]
        state: dict[str, bool] = {}
        for _, worker, up in sorted(events):
            state[worker] = up
        return {w for w, up in state.items() if up}

    def signal(self, sig: int) -> None:
        """Signal the process itself (not its group: ``serve`` keeps its workers)."""
        os.kill(self.p.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGCONT (it may be stopped) and SIGTERM; then SIGKILL to the whole group."""
        group = self._group()
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGCONT)
                self.p.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.p.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(5)
        _, alive = psutil.wait_procs(group, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self._out.close()
        return self.p.returncode

    def _group(self) -> list[psutil.Process]:
        """This process and its descendants (to check that none outlives ``stop``)."""
        try:
            me = psutil.Process(self.p.pid)
            return [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


class Procs:
    """Starts :class:`KvProc` s for one test and stops every one of them at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[KvProc] = []
        self._n = 0

    def start(self, name: str, args: list[str]) -> KvProc:
        self._n += 1
        proc = KvProc(args, self.tmp / f"{self._n:02d}-{name}.log")
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        leftovers = [p.pid for p in self.started if p.p.poll() is None]
        assert not leftovers, f"processes left behind: {leftovers}"
