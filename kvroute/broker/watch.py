"""Things the broker's poller watches besides its sockets: a wake-up pipe and process sentinels.

``zmq.Poller`` polls raw file descriptors too, so a child process's sentinel (readable once the
process exits) and a self-pipe (written by other threads to wake the loop) cost nothing while
quiet and are noticed at once when they fire.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping

import zmq


class Watch:
    """A wake-up pipe plus ``{sentinel fd: worker id}``; :meth:`watch` and :meth:`wake` are
    thread-safe, the rest belongs to the broker thread.

    Parameters
    ----------
    sentinels
        Initial ``{fd: worker_id}`` (e.g. ``multiprocessing.Process.sentinel``).
    """

    def __init__(self, sentinels: Mapping[int, str] | None = None) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, str] = dict(sentinels or {})
        self._sentinels: dict[int, str] = {}
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._closed = False

    @property
    def wake_fd(self) -> int:
        """The fd to poll for wake-ups."""
        return self._r

    def watch(self, fd: int, worker_id: str) -> None:
        """Watch another sentinel (from any thread)."""
        with self._lock:
            self._pending[fd] = worker_id
        self.wake()

    def wake(self) -> None:
        """Make the poller return now (from any thread)."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):  # full pipe: a wake-up is pending
                    os.write(self._w, b"\0")

    def refresh(self, poller: zmq.Poller) -> None:
        """Consume wake-ups and register sentinels added since the last call."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        with self._lock:
            pending, self._pending = self._pending, {}
        for fd, worker_id in pending.items():
            self._sentinels[fd] = worker_id
            poller.register(fd, zmq.POLLIN)

    def fired(self, poller: zmq.Poller, fd: int) -> str | None:
        """A sentinel became readable (or was closed: poll reports an error, which counts the
        same): stop watching it; returns its worker id."""
        poller.unregister(fd)
        return self._sentinels.pop(fd, None)

    def close(self) -> None:
        """Close the pipe (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._r)
                os.close(self._w)
