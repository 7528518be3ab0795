"""Checkpoints: a session whose worker is lost goes on warm on another worker sharing the
directory (END ``kv_source`` checkpoint) with the reply an undisturbed session gives; files are
appended per turn, cut-short tails are ignored, every other fault is never used; a checkpoint
is used only for the history it was written for."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvroute.engine.engine import Engine
from kvroute.engine.kv_codec import RestDtype
from kvroute.engine.sampling import SamplingParams
from kvroute.proto.messages import CachePath, ColdReason, KvSource
from kvroute.worker.checkpoint import SWEEP_INTERVAL_S, Checkpoints
from kvroute.worker.events import EndEvent, Event, TokenEvent
from kvroute.worker.scheduler import Scheduler, SchedulerConfig
from kvroute.worker.spill import SpillIdentity

Messages = list[dict[str, str]]
Clock = Callable[[], float]


def ident(engine: Engine) -> SpillIdentity:
    a = engine.model.args
    return SpillIdentity("ab" * 32, engine.n_ctx, a.n_layers, a.n_kv_heads, a.head_dim)


def worker(engine: Engine, directory: Path, dtype: RestDtype = RestDtype.NONE) -> Scheduler:
    ckpt = Checkpoints(directory, ident(engine), dtype)
    return Scheduler(engine, SchedulerConfig(kv_rest=dtype, checkpoints=ckpt))


def run(
    sched: Scheduler, sid: bytes, messages: Messages, worker_lost: bool = False
) -> tuple[str, EndEvent]:
    params = SamplingParams(5)
    events: list[Event] = list(sched.submit(b"r" + sid, sid, messages, params, worker_lost))
    while sched.busy:
        events.extend(sched.step())
    ends = [e for e in events if isinstance(e, EndEvent)]
    assert len(ends) == 1, events
    return "".join(e.text for e in events if isinstance(e, TokenEvent)), ends[0]


def chat(sched: Scheduler, sid: bytes, turns: int) -> Messages:
    msgs: Messages = []
    for i in range(turns):
        msgs.append({"role": "user", "content": f"q{i} apples"})
        reply, _ = run(sched, sid, msgs)
        msgs.append({"role": "assistant", "content": reply})
    return msgs


@pytest.mark.parametrize("dtype", [RestDtype.NONE, RestDtype.Q8_0])
def test_lost_worker_session_goes_on_warm(
    tiny_engine: Engine, tmp_path: Path, dtype: RestDtype
) -> None:
    w1 = worker(tiny_engine, tmp_path, dtype)
    undisturbed = Scheduler(tiny_engine)
    msgs = chat(w1, b"s", 2)
    assert chat(undisturbed, b"s", 2) == msgs
    ckpt = w1.config.checkpoints
    assert ckpt is not None and ckpt.saved == 2
    size_before = ckpt.path(b"s").stat().st_size
    # w1 dies (kill -9 between turns: it is simply never called again); w2 shares the dir.
    w2 = worker(tiny_engine, tmp_path, dtype)
    nxt = [*msgs, {"role": "user", "content": "and pears?"}]
    got, end = run(w2, b"s", nxt, worker_lost=True)
    assert end.stats.kv_source is KvSource.CHECKPOINT
    assert end.stats.path is CachePath.TEXT_PREFIX and end.stats.cached_tokens > 20
    assert 0 < end.stats.restore_ms <= end.stats.ttft_ms
    want, _ = run(undisturbed, b"s", nxt)
    if dtype is RestDtype.NONE:
        assert got == want
    # w2 now owns it: its checkpoint is rewritten whole, then appended.
    assert w2.config.checkpoints is not None and w2.config.checkpoints.saved == 1
    assert ckpt.path(b"s").stat().st_size > size_before * 0.5


def test_appends_only_new_positions(tiny_engine: Engine, tmp_path: Path) -> None:
    w = worker(tiny_engine, tmp_path)
    msgs = chat(w, b"s", 1)
    ckpt = w.config.checkpoints
    assert ckpt is not None
    first = ckpt.path(b"s").read_bytes()
    _, end = run(w, b"s", [*msgs, {"role": "user", "content": "q1 apples"}])
    assert end.stats.path is CachePath.TEXT_PREFIX
    second = ckpt.path(b"s").read_bytes()
    assert second.startswith(first) and len(second) > len(first)  # appended, not rewritten
    # An edited history keeps fewer positions than the file holds: rewritten whole.
    run(w, b"s", [{"role": "user", "content": "q0 pears"}])
    assert not ckpt.path(b"s").read_bytes().startswith(first)


def test_checkpoint_used_only_for_its_history(tiny_engine: Engine, tmp_path: Path) -> None:
    w1 = worker(tiny_engine, tmp_path)
    chat(w1, b"s", 2)
    w2 = worker(tiny_engine, tmp_path)
    other = [{"role": "user", "content": "a different conversation entirely"}]
    _, end = run(w2, b"s", other, worker_lost=True)
    assert end.stats.path is CachePath.COLD and end.stats.cold_reason is ColdReason.WORKER_LOST
    assert end.stats.kv_source is KvSource.HOT


def test_cut_short_tail_is_ignored_corrupt_is_never_used(
    tiny_engine: Engine, tmp_path: Path
) -> None:
    w1 = worker(tiny_engine, tmp_path)
    msgs1 = chat(w1, b"s", 1)
    ckpt = w1.config.checkpoints
    assert ckpt is not None
    one_turn = ckpt.path(b"s").read_bytes()
    chat(w1, b"s", 2)
    two_turns = ckpt.path(b"s").read_bytes()
    # Killed mid-append: the second record is cut short; the first turn's state is used.
    ckpt.path(b"s").write_bytes(two_turns[: len(one_turn) + (len(two_turns) - len(one_turn)) // 2])
    w2 = worker(tiny_engine, tmp_path)
    nxt = [*msgs1, {"role": "user", "content": "q1 apples"}]
    _, end = run(w2, b"s", nxt, worker_lost=True)
    assert end.stats.kv_source is KvSource.CHECKPOINT and end.stats.path is CachePath.TEXT_PREFIX
    # A flipped byte inside a record: never used, deleted, cold spill_invalid.
    bad = bytearray(one_turn)
    bad[-100] ^= 0x10
    ckpt.path(b"s").write_bytes(bytes(bad))
    w3 = worker(tiny_engine, tmp_path)
    _, end = run(w3, b"s", nxt, worker_lost=True)
    assert end.stats.path is CachePath.COLD and end.stats.cold_reason is ColdReason.SPILL_INVALID
    assert w3.config.checkpoints is not None and w3.config.checkpoints.invalid == 1


def test_reset_and_close_drop_the_checkpoint(tiny_engine: Engine, tmp_path: Path) -> None:
    w = worker(tiny_engine, tmp_path)
    chat(w, b"s", 1)
    ckpt = w.config.checkpoints
    assert ckpt is not None and ckpt.has(b"s")
    w.reset(b"s")
    assert not ckpt.has(b"s")
    chat(w, b"t", 1)
    w.close(b"t")
    assert not ckpt.has(b"t")


# --- disk budget and expiry of the shared directory ---

DAY = 24 * 3600.0


def bounded(
    engine: Engine, directory: Path, budget: int = 1 << 30, clock: Clock | None = None
) -> Scheduler:
    """A worker whose checkpoints have the given budget and (optionally) an injected clock."""
    ckpt = Checkpoints(directory, ident(engine), RestDtype.NONE, budget, DAY, clock or time.time)
    return Scheduler(engine, SchedulerConfig(checkpoints=ckpt))


def checkpoints(sched: Scheduler) -> Checkpoints:
    assert sched.config.checkpoints is not None
    return sched.config.checkpoints


def set_mtime(path: Path, t: float) -> None:
    os.utime(path, (t, t))


def test_budget_drops_least_recently_written(tiny_engine: Engine, tmp_path: Path) -> None:
    w = bounded(tiny_engine, tmp_path)
    ckpt = checkpoints(w)
    for sid in (b"a", b"b", b"c", b"d"):
        chat(w, sid, 1)
    size = {sid: ckpt.path(sid).stat().st_size for sid in (b"a", b"b", b"c", b"d")}
    now = time.time()
    for age, sid in enumerate((b"b", b"d", b"a", b"c")):  # c written longest ago, b last
        set_mtime(ckpt.path(sid), now - 100 * (age + 1))
    ckpt.budget_bytes = size[b"b"] + size[b"d"]
    ckpt.sweep()
    assert [ckpt.has(s) for s in (b"a", b"b", b"c", b"d")] == [False, True, False, True]
    ckpt.budget_bytes = size[b"b"]
    ckpt.sweep()
    assert [ckpt.has(s) for s in (b"a", b"b", b"c", b"d")] == [False, True, False, False]
    assert (ckpt.evicted, ckpt.expired) == (3, 0)
    assert ckpt.load(b"b").tokens  # what is kept is whole


def test_turn_end_enforces_the_budget(tiny_engine: Engine, tmp_path: Path) -> None:
    w = bounded(tiny_engine, tmp_path)
    ckpt = checkpoints(w)
    chat(w, b"a", 1)
    ckpt.budget_bytes = int(ckpt.path(b"a").stat().st_size * 2.5)  # about two sessions
    chat(w, b"b", 1)
    assert ckpt.has(b"a") and ckpt.has(b"b")
    chat(w, b"c", 1)  # no explicit sweep: the save that passed the budget swept
    assert not ckpt.has(b"a") and ckpt.has(b"b") and ckpt.has(b"c")
    assert ckpt.evicted == 1


def test_expired_checkpoints_are_swept_at_most_once_a_minute(
    tiny_engine: Engine, tmp_path: Path
) -> None:
    t = [time.time()]
    w = bounded(tiny_engine, tmp_path, clock=lambda: t[0])
    ckpt = checkpoints(w)
    chat(w, b"old", 1)
    chat(w, b"young", 1)
    set_mtime(ckpt.path(b"old"), t[0] - DAY - 1)
    set_mtime(ckpt.path(b"young"), t[0] - DAY + 3600)
    ckpt.sweep()
    assert not ckpt.has(b"old") and ckpt.has(b"young") and ckpt.expired == 1
    # Between sweeps a turn end does not scan the directory.
    chat(w, b"later", 1)
    set_mtime(ckpt.path(b"young"), t[0] - DAY - 1)
    t[0] += SWEEP_INTERVAL_S / 2
    chat(w, b"later2", 1)
    assert ckpt.has(b"young")
    # A minute on, the next turn end (or the worker's heartbeat) sweeps it.
    t[0] += SWEEP_INTERVAL_S
    chat(w, b"later3", 1)
    assert not ckpt.has(b"young") and ckpt.has(b"later") and ckpt.expired == 2
    # A leftover of a crashed rewrite goes too.
    part = tmp_path / "abcd.ckpt.x1y2.part"
    part.write_bytes(b"half a file")
    ckpt.sweep()
    assert not part.exists() and ckpt.has(b"later")


def test_owner_rewrites_a_checkpoint_another_worker_swept(
    tiny_engine: Engine, tmp_path: Path
) -> None:
    w1 = bounded(tiny_engine, tmp_path)
    msgs = chat(w1, b"s", 1)
    path = checkpoints(w1).path(b"s")
    set_mtime(path, time.time() - DAY - 1)
    checkpoints(bounded(tiny_engine, tmp_path)).sweep()  # another worker expires it
    assert not path.exists()
    run(w1, b"s", [*msgs, {"role": "user", "content": "q1 apples"}])
    # Not appended to a missing file: written whole, head and all.
    assert checkpoints(w1).load(b"s").tokens == w1.store.get(b"s").tokens


def test_sweep_keeps_a_file_written_after_it_listed_the_directory(
    tiny_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = bounded(tiny_engine, tmp_path)
    msgs = chat(owner, b"s", 1)
    chat(owner, b"gone", 1)
    sweeper = checkpoints(bounded(tiny_engine, tmp_path))
    for sid in (b"s", b"gone"):
        set_mtime(checkpoints(owner).path(sid), time.time() - DAY - 1)
    scan = sweeper._scan

    def scan_then_owner_appends() -> list[tuple[int, int, Path]]:
        listed = scan()
        run(owner, b"s", [*msgs, {"role": "user", "content": "q1 apples"}])
        return listed

    monkeypatch.setattr(sweeper, "_scan", scan_then_owner_appends)
    sweeper.sweep()
    assert not sweeper.has(b"gone")  # expired and untouched
    assert sweeper.load(b"s").tokens == owner.store.get(b"s").tokens  # kept, whole


def test_sweep_waits_for_a_write_in_progress(tiny_engine: Engine, tmp_path: Path) -> None:
    owner = bounded(tiny_engine, tmp_path)
    chat(owner, b"s", 1)
    path = checkpoints(owner).path(b"s")
    sweeper = checkpoints(bounded(tiny_engine, tmp_path))
    set_mtime(path, time.time() - DAY - 1)
    holding, finish = threading.Event(), threading.Event()

    def writer() -> None:  # another worker mid-append: holds the writers' lock
        with checkpoints(owner)._lock(fcntl.LOCK_SH):
            holding.set()
            finish.wait(10)
            set_mtime(path, time.time())  # its append lands

    t_write = threading.Thread(target=writer)
    t_write.start()
    assert holding.wait(10)
    t_sweep = threading.Thread(target=sweeper.sweep)
    t_sweep.start()
    t_sweep.join(0.5)
    assert t_sweep.is_alive() and path.exists()  # blocked on the lock, nothing deleted
    finish.set()
    t_write.join(10)
    t_sweep.join(10)
    assert not t_sweep.is_alive() and path.exists() and sweeper.expired == 0
