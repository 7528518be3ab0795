"""Long-running processes are findable and die with their parent.

``ps`` shows a spawned worker as ``python -c from multiprocessing.spawn import spawn_main...``
unless it sets a title, and a worker whose ``kvroute serve`` was killed with SIGKILL would keep
running (re-parented, its model still in memory) unless something tells it. Two independent
mechanisms do, because each has a blind spot:

- **parent-death signal** (Linux ``prctl(PR_SET_PDEATHSIG)``): the kernel sends SIGTERM when the
  *thread* that started us exits. Immediate, but a thread of a live parent that exits also
  triggers it, and it does not exist outside Linux.
- **parent pipe**: a spawned child holds the read end of a pipe whose write end only its parent
  holds (``multiprocessing.parent_process().sentinel``); it reads EOF when the parent is gone,
  however it died. A watcher thread turns that into SIGTERM too.

SIGTERM then stops the worker cleanly (its handler), or ends it at once while it is still
loading; if it has not exited after :data:`GRACE_S` seconds it exits hard.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
from multiprocessing.connection import wait

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
GRACE_S = 5.0
"""Seconds a worker whose parent died gets to stop cleanly before it exits hard."""


def set_title(title: str) -> None:
    """Show ``title`` in ``ps``/``top`` instead of the interpreter's command line."""
    try:
        import setproctitle
    except ImportError:  # a dependency, but a missing title must never stop a worker
        return
    setproctitle.setproctitle(title)


def parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` when the thread that started this process exits.

    Returns False where that is not available (not Linux, no libc). Call it first thing in the
    child, then check the parent is still there: it may have died before the call.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
    if not ok:
        logger.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    return ok


def watch_parent_pipe() -> bool:
    """Start a daemon thread that waits for the spawn parent to die, then SIGTERMs us.

    Returns False if this process was not started by :mod:`multiprocessing` (nothing to watch).
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return False
    sentinel = parent.sentinel

    def watch() -> None:
        wait([sentinel])  # EOF: every copy of the write end is closed, i.e. the parent is gone
        _parent_gone(f"parent {parent.pid} is gone (its pipe closed)")

    threading.Thread(target=watch, name="kvroute-parent-watch", daemon=True).start()
    return True


def _parent_gone(why: str) -> None:
    logger.warning("%s; stopping", why)
    # The same path as the death signal: SIGTERM runs the worker's clean stop (or ends it while
    # it is still loading). If that does not finish in time, leave without cleanup.
    timer = threading.Timer(GRACE_S, os._exit, (1,))
    timer.daemon = True
    timer.start()
    os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent() -> None:
    """Both mechanisms (for a process started by :mod:`multiprocessing` ``spawn``)."""
    parent = multiprocessing.parent_process()
    parent_death_signal()
    watch_parent_pipe()
    if parent is not None and os.getppid() != parent.pid:
        # The parent died before the death signal was armed: nobody will send it.
        _parent_gone(f"parent {parent.pid} died while this process started")


def setup_worker_process(worker_id: str) -> None:
    """What a worker child does first: a readable title, and die with its parent."""
    set_title(f"kvroute worker {worker_id}")
    die_with_parent()
