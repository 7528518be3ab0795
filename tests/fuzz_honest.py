"""The honest side of the fuzz: sessions whose replies must not change under attack, and the
watch that counts crashes (dead threads, uncaught exceptions, ERROR log lines)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from fuzz_attack import WAIT
from service_harness import Harness

from kvroute import Client, KvrouteError

HONEST_SESSIONS = 4
HONEST_TURNS = 6


class CrashWatch(logging.Handler):
    """Collects ERROR records from kvroute loggers and uncaught exceptions of any thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.thread_errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def on_thread_exception(self, args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread else "?"
        self.thread_errors.append(f"{name}: {args.exc_type.__name__}: {args.exc_value}")


def crashes(h: Harness, watch: CrashWatch) -> list[str]:
    """Everything that counts as a crash: a dead broker or worker thread, an uncaught thread
    exception, an ERROR log line (the broker logs a message it failed to handle at ERROR)."""
    found = [f"thread {t.name} died" for t in h.threads if not t.is_alive()]
    found += watch.thread_errors
    found += [f"{r.name}: {r.getMessage()[:200]}" for r in watch.records]
    found += [f"worker {w} re-registered" for w, s in h.workers.items() if s.registrations != 1]
    return found


@dataclass(frozen=True)
class HonestTurn:
    """What an honest turn produced (compared between runs; worker ids and times are not)."""

    text: str
    reply_sha256: str
    path: str
    cold_reason: str | None
    generated: int
    finish: str


def honest_script(
    url: str, pause: float, created: threading.Event
) -> dict[tuple[int, int], HonestTurn | str]:
    """Run the honest sessions: two threads, each driving two sessions turn by turn (greedy or
    seeded sampling; each RESETs once mid-way). ``created`` is set once every session
    has done its first turn (it is pinned). Failed turns are recorded as the exception text."""
    out: dict[tuple[int, int], HonestTurn | str] = {}
    started = threading.Barrier(2, action=created.set)

    def run(mine: list[int]) -> None:
        with Client(url, timeout=WAIT) as client:
            sessions = {i: client.session(session_id=f"honest-{i}") for i in mine}
            for t in range(HONEST_TURNS):
                for i, s in sessions.items():
                    sampling: dict[str, Any] = (
                        {"temperature": 0.0}
                        if i % 2 == 0
                        else {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 100 * i + t}
                    )
                    try:
                        text = "".join(s.send(f"h{i}.{t}", max_tokens=6, **sampling))
                        last = s.last
                        assert last is not None
                        out[i, t] = HonestTurn(
                            text,
                            last.end.reply_sha256,
                            str(last.path),
                            None if last.cold_reason is None else str(last.cold_reason),
                            last.generated_tokens,
                            str(last.finish_reason),
                        )
                        if t == 2 + i % 2:  # a RESET mid-way (n_ctx is only 256)
                            s.reset()
                    except KvrouteError as exc:
                        out[i, t] = f"{type(exc).__name__}: {exc}"
                    time.sleep(pause)
                if t == 0:
                    started.wait(WAIT)

    threads = [
        threading.Thread(target=run, args=(list(range(k, HONEST_SESSIONS, 2)),), name=f"honest{k}")
        for k in range(2)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
        assert not th.is_alive(), "an honest session hung"
    return out


def tokens_lost(ref: dict[Any, HonestTurn | str], got: dict[Any, HonestTurn | str]) -> int:
    """Honest tokens that did not come out exactly as in the reference run."""
    lost = 0
    for key, want in ref.items():
        assert isinstance(want, HonestTurn), f"reference turn {key} failed: {want}"
        have = got.get(key)
        if have != want:
            lost += want.generated
    return lost
