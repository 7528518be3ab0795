"""``serve --spill-dir D --checkpoint``: kill -9 of a session's worker, between turns and with
a turn in flight; the session's next turn lands on another worker sharing D, warm from the
checkpoint (no cold prefill), and its greedy reply equals the one an undisturbed twin session
(same history, on the other worker) gets."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import Procs, free_port

from kvroute import Client, KvrouteError, SessionLost
from kvroute.client import Session
from kvroute.proto.messages import CachePath, KvSource

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

HB = 0.3


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


def start(procs: Procs, model: Path, spill: Path) -> tuple[str, dict[str, int]]:
    url = f"tcp://127.0.0.1:{free_port()}"
    serve = procs.start(
        "serve",
        [
            *("serve", "--workers", "2", "--model", str(model)),
            *("--frontend", url, "--heartbeat", str(HB)),
            # float32 checkpoints: the reply after the restore must be the twin's, bit for bit
            *("--spill-dir", str(spill), "--checkpoint", "--kv-rest", "none"),
        ],
    )
    serve.wait_log(r"ready frontend")
    pids = {m[1]: int(m[2]) for m in re.finditer(r"worker (w\d) pid (\d+)", serve.text())}
    return url, pids


def twins(client: Client) -> tuple[Session, Session]:
    """Two sessions with one history, on different workers."""
    a, b = client.session(), client.session()
    replies = ["".join(s.send("tell me about apples", max_tokens=6)) for s in (a, b)]
    assert a.last is not None and b.last is not None
    assert a.last.worker != b.last.worker, (a.last.worker, b.last.worker)
    assert replies[0] == replies[1]
    return a, b


@pytest.mark.parametrize("when", ["between_turns", "mid_turn"])
def test_kill9_resumes_warm_from_checkpoint(
    procs: Procs, tiny_model_path: Path, tmp_path: Path, when: str
) -> None:
    url, pids = start(procs, tiny_model_path, tmp_path / "spill")
    with Client(url, timeout=15) as client:
        a, b = twins(client)
        assert a.last is not None
        victim = a.last.worker
        if when == "between_turns":
            os.kill(pids[victim], signal.SIGKILL)
            time.sleep(3 * HB)  # serve's sentinel tells the broker at once; be generous
        else:
            os.kill(pids[victim], signal.SIGSTOP)  # hold the turn in flight
            lost: list[BaseException] = []

            def turn() -> None:
                try:
                    list(a.send("and pears?", max_tokens=6))
                except KvrouteError as exc:
                    lost.append(exc)

            t = threading.Thread(target=turn)
            t.start()
            time.sleep(0.5)
            os.kill(pids[victim], signal.SIGKILL)
            t.join(15)
            assert not t.is_alive()
            assert len(lost) == 1 and isinstance(lost[0], SessionLost), lost
        got = "".join(a.send("and pears?", max_tokens=6))
        want = "".join(b.send("and pears?", max_tokens=6))
        assert a.last is not None and b.last is not None
        stats = a.last.end.stats
        assert stats.kv_source is KvSource.CHECKPOINT, stats
        assert stats.path is CachePath.TEXT_PREFIX and stats.cached_tokens > 0, stats
        assert got == want
