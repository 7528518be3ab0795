"""Workers die with their ``kvroute serve``, even after ``kill -9`` of it, and are findable.

End to end: a real ``kvroute serve`` (tiny model), its workers titled ``kvroute worker wN``,
SIGKILL to serve, and no worker left within a few seconds. Then each mechanism of
:mod:`kvroute.worker.process` alone (parent-death signal; parent pipe), with a control child
that uses neither and must survive, so the test can tell them apart from luck.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_client import free_port

from kvroute.worker import process

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process APIs")

TESTS = Path(__file__).parent
GONE_WITHIN_S = 8.0


def wait_gone(pids: list[int], timeout: float = GONE_WITHIN_S) -> list[int]:
    """Pids still running (not zombies) after ``timeout``."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.05)
    return alive


def title(pid: int) -> str:
    """What ``ps`` shows as the command (setproctitle pads it with spaces)."""
    return " ".join(psutil.Process(pid).cmdline()).strip()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids a test started; whatever still runs at teardown is killed."""
    pids: list[int] = []
    yield pids
    _kill([p for p in pids if _running(p)])


def test_kill9_of_serve_leaves_no_worker(tiny_model_path: Path, leftovers: list[int]) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    args = ["serve", "--workers", "2", "--model", str(tiny_model_path), "--frontend", url]
    serve = subprocess.Popen(
        [sys.executable, "-m", "kvroute", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    leftovers.append(serve.pid)
    assert serve.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    while not any(line.startswith("ready ") for line in lines):
        assert time.monotonic() < deadline and serve.poll() is None, lines
        lines.append(serve.stdout.readline())
    workers = {
        line.split()[1]: int(line.split()[3]) for line in lines if line.startswith("worker ")
    }
    assert set(workers) == {"w0", "w1"}, lines
    leftovers.extend(workers.values())
    # Findable: `ps` shows what each process is.
    for wid, pid in workers.items():
        assert title(pid) == f"kvroute worker {wid}"
    assert title(serve.pid) == f"kvroute serve: broker {url}, workers 2"

    children = [c.pid for c in psutil.Process(serve.pid).children()]
    os.kill(serve.pid, signal.SIGKILL)
    serve.wait(10)
    assert wait_gone(children) == [], "processes outlived kill -9 of serve"


# --- each mechanism alone -------------------------------------------------------------------


def _child(mode: str) -> None:
    """A spawned child that arms one mechanism (or none) and waits to be told to go."""
    if mode == "pdeathsig":
        assert process.parent_death_signal()
    elif mode == "pipe":
        assert process.watch_parent_pipe()
    print("armed", flush=True)  # the parent's stdout: the test reads it
    while True:
        time.sleep(0.1)


def _parent(mode: str) -> None:
    """Spawn one child, print its pid, then wait to be killed."""
    child = mp.get_context("spawn").Process(target=_child, args=(mode,))
    child.start()
    print(child.pid, flush=True)
    while True:
        time.sleep(0.1)


@pytest.mark.parametrize(("mode", "dies"), [("pdeathsig", True), ("pipe", True), ("none", False)])
def test_each_mechanism_alone(mode: str, dies: bool, leftovers: list[int]) -> None:
    code = f"import test_orphans; test_orphans._parent({mode!r})"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    leftovers.append(parent.pid)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    leftovers.append(child)
    assert parent.stdout.readline().strip() == "armed"
    assert _running(child)
    parent.kill()
    parent.wait(10)
    alive = wait_gone([child], timeout=GONE_WITHIN_S if dies else 2.0)
    assert (alive == []) is dies, f"mode {mode}: child {'survived' if alive else 'died'}"
