"""Checkpoints: a session whose worker is lost goes on warm on another worker sharing the
directory (END ``kv_source`` checkpoint) with the reply an undisturbed session gives; files are
appended per turn, cut-short tails are ignored, every other fault is never used; a checkpoint
is used only for the history it was written for."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvroute.engine.engine import Engine
from kvroute.engine.kv_codec import RestDtype
from kvroute.engine.sampling import SamplingParams
from kvroute.proto.messages import CachePath, ColdReason, KvSource
from kvroute.worker.checkpoint import Checkpoints
from kvroute.worker.events import EndEvent, Event, TokenEvent
from kvroute.worker.scheduler import Scheduler, SchedulerConfig
from kvroute.worker.spill import SpillIdentity

Messages = list[dict[str, str]]


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
