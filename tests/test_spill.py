"""Spill files: round trip, every kind of unusable file (never used, deleted, the turn goes cold
``spill_invalid``), the disk budget, crash-safe writes, and many sessions through a small KV
budget whose next turns come back from disk warm with the replies they would have had."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kvroute.engine.cache import KVCache, RestKV
from kvroute.engine.engine import Engine
from kvroute.engine.kv_codec import RestDtype, decode, encode
from kvroute.engine.sampling import SamplingParams
from kvroute.proto.messages import CachePath, ColdReason, KvSource
from kvroute.worker.events import EndEvent, Event, TokenEvent
from kvroute.worker.scheduler import Scheduler, SchedulerConfig
from kvroute.worker.sessions import SessionStore
from kvroute.worker.spill import (
    FORMAT,
    MAGIC,
    PART,
    SpillDir,
    SpillIdentity,
    SpillInvalid,
    decode_file,
    encode_file,
)

IDENT = SpillIdentity("ab" * 32, 256, n_layers=2, n_kv_heads=2, head_dim=64)
MB = 1 << 20


def rest_kv(n: int, dtype: RestDtype = RestDtype.Q8_0, seed: int = 0) -> RestKV:
    rng = np.random.default_rng(seed)
    shape = (2, 2, n, 64)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    return RestKV(encode(k, dtype), encode(v, dtype))


def test_round_trip_and_file_is_consumed(tmp_path: Path) -> None:
    d = SpillDir(tmp_path, 64 * MB, IDENT)
    rest = rest_kv(10)
    assert d.write(b"s1", "hello", list(range(10)), rest) == []
    assert b"s1" in d and d.path(b"s1").exists() and d.nbytes == d.path(b"s1").stat().st_size
    got = d.take(b"s1")
    assert got.text == "hello" and got.tokens == list(range(10))
    assert np.array_equal(decode(got.rest.k), decode(rest.k))
    assert np.array_equal(decode(got.rest.v), decode(rest.v))
    assert b"s1" not in d and not d.path(b"s1").exists()


def corruptions() -> dict[str, object]:
    good = encode_file(IDENT, b"s1", "hi", list(range(6)), rest_kv(6))
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    head = bytearray(good)
    head[20] ^= 0x01
    return {
        "empty": b"",
        "truncated_head": good[:10],
        "truncated_half": good[: len(good) // 2],
        "truncated_one_byte": good[:-1],
        "payload_bit_flip": bytes(flipped),
        "header_bit_flip": bytes(head),
        "not_a_spill_file": b"GGUF" + bytes(200),
        "other_format": good.replace(MAGIC + FORMAT.to_bytes(2, "little"), MAGIC + b"\x09\x00", 1),
        "foreign_model": encode_file(
            SpillIdentity("cd" * 32, 256, 2, 2, 64), b"s1", "hi", list(range(6)), rest_kv(6)
        ),
        "other_n_ctx": encode_file(
            SpillIdentity("ab" * 32, 512, 2, 2, 64), b"s1", "hi", list(range(6)), rest_kv(6)
        ),
        "other_session": encode_file(IDENT, b"s2", "hi", list(range(6)), rest_kv(6)),
        "ids_not_positions": encode_file(IDENT, b"s1", "hi", list(range(5)), rest_kv(6)),
    }


@pytest.mark.parametrize("case", sorted(corruptions()))
def test_unusable_file_is_never_used(tmp_path: Path, case: str) -> None:
    data = corruptions()[case]
    assert isinstance(data, bytes)
    with pytest.raises(SpillInvalid):
        decode_file(IDENT, b"s1", data)
    # Through the store: the turn goes cold with spill_invalid and the file is deleted.
    store = SessionStore(lambda: KVCache(2, 2, 64, 256), spill=SpillDir(tmp_path, 64 * MB, IDENT))
    assert store.spill is not None
    store.spill.write(b"s1", "hi", list(range(6)), rest_kv(6))
    store.spill.path(b"s1").write_bytes(data)  # the file changed under us
    assert store.restore_spilled(b"s1") is None
    assert not store.spill.path(b"s1").exists() and b"s1" not in store.spill
    assert store.spill.invalid == 1
    session = store.acquire(b"s1")
    assert session.cold_reason == ColdReason.SPILL_INVALID and session.tokens == []


def test_missing_file_is_spill_invalid(tmp_path: Path) -> None:
    store = SessionStore(lambda: KVCache(2, 2, 64, 256), spill=SpillDir(tmp_path, 64 * MB, IDENT))
    assert store.spill is not None
    store.spill.write(b"s1", "hi", list(range(6)), rest_kv(6))
    store.spill.path(b"s1").unlink()
    assert store.restore_spilled(b"s1") is None
    assert store.acquire(b"s1").cold_reason == ColdReason.SPILL_INVALID


def test_disk_budget_is_lru(tmp_path: Path) -> None:
    size = len(encode_file(IDENT, b"a", "t", list(range(20)), rest_kv(20)))
    d = SpillDir(tmp_path, 2 * size + 10, IDENT)
    assert d.write(b"a", "t", list(range(20)), rest_kv(20)) == []
    assert d.write(b"b", "t", list(range(20)), rest_kv(20)) == []
    assert d.write(b"c", "t", list(range(20)), rest_kv(20)) == [b"a"]
    assert not d.path(b"a").exists() and d.nbytes <= d.budget_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        d.path(s).name for s in (b"b", b"c")
    )
    big = SpillDir(tmp_path / "small", size // 2, IDENT)
    assert big.write(b"x", "t", list(range(20)), rest_kv(20)) == [b"x"]  # never fits


class Crash(BaseException):
    """Stands for the process dying (not an Exception: nothing may catch it and go on)."""


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_crash_mid_write_leaves_nothing_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    d = SpillDir(tmp_path, 64 * MB, IDENT)

    def crash(*_: object) -> None:
        raise Crash

    monkeypatch.setattr(os, where, crash)
    with pytest.raises(Crash):
        d.write(b"s1", "hi", list(range(6)), rest_kv(6))
    monkeypatch.undo()
    assert b"s1" not in d and list(tmp_path.iterdir()) == []
    # A kill -9 mid-write cannot run the cleanup: it leaves a .part file, half written. It is
    # never read, and the next process to open the directory removes it.
    good = encode_file(IDENT, b"s1", "hi", list(range(6)), rest_kv(6))
    (tmp_path / (d.path(b"s1").name + ".x1" + PART)).write_bytes(good[: len(good) // 2])
    assert b"s1" not in d
    with pytest.raises(SpillInvalid):
        d.take(b"s1")
    SpillDir(tmp_path, 64 * MB, IDENT)
    assert list(tmp_path.iterdir()) == []


def run(sched: Scheduler, sid: bytes, messages: list[dict[str, str]]) -> tuple[str, EndEvent]:
    events: list[Event] = list(sched.submit(b"r" + sid, sid, messages, SamplingParams(6)))
    while sched.busy:
        events.extend(sched.step())
    ends = [e for e in events if isinstance(e, EndEvent)]
    assert len(ends) == 1, events
    return "".join(e.text for e in events if isinstance(e, TokenEvent)), ends[0]


@pytest.mark.parametrize("rest", [RestDtype.NONE, RestDtype.Q8_0])
def test_many_sessions_spill_and_come_back_warm(
    tiny_engine: Engine, tmp_path: Path, rest: RestDtype
) -> None:
    a = tiny_engine.model.args
    ident = SpillIdentity("ab" * 32, tiny_engine.n_ctx, a.n_layers, a.n_kv_heads, a.head_dim)
    per_token = tiny_engine.new_cache().bytes_per_token
    budget = 3 * 64 * per_token  # about three sessions' turns in flight at a time
    spill = SpillDir(tmp_path, 64 * MB, ident)
    sched = Scheduler(
        tiny_engine, SchedulerConfig(kv_budget_bytes=budget, kv_rest=rest, spill=spill)
    )
    plain = Scheduler(tiny_engine)  # no budget: everything stays hot
    n = 12
    histories = {}
    for i in range(n):
        sid = f"s{i}".encode()
        msgs = [{"role": "user", "content": f"session {i}: tell me about the number {i * 7}"}]
        want, _ = run(plain, sid, msgs)
        got, end = run(sched, sid, msgs)
        assert got == want
        histories[sid] = [*msgs, {"role": "assistant", "content": got}]
    assert spill.written > 0 and len(sched.store) < n  # budget pressure sent some to disk
    sources = []
    for sid, msgs in histories.items():
        nxt = [*msgs, {"role": "user", "content": "and one more thing?"}]
        want, _ = run(plain, sid, nxt)
        got, end = run(sched, sid, nxt)
        assert end.stats.path is CachePath.TEXT_PREFIX, end.stats
        sources.append(end.stats.kv_source)
        if end.stats.kv_source is KvSource.DISK:
            assert 0 < end.stats.restore_ms <= end.stats.ttft_ms
        if rest is RestDtype.NONE:
            assert got == want  # float32 on disk: exactly what stayed hot computes
    assert KvSource.DISK in sources
    assert spill.invalid == 0 and sched.store.evictions == 0


def test_overflow_leaves_a_spilled_session_on_disk(tiny_engine: Engine, tmp_path: Path) -> None:
    a = tiny_engine.model.args
    ident = SpillIdentity("ab" * 32, tiny_engine.n_ctx, a.n_layers, a.n_kv_heads, a.head_dim)
    spill = SpillDir(tmp_path, 64 * MB, ident)
    sched = Scheduler(tiny_engine, SchedulerConfig(kv_budget_bytes=1, spill=spill))
    msgs = [{"role": "user", "content": "hello"}]
    reply, _ = run(sched, b"s", msgs)
    run(sched, b"t", msgs)  # s, idle, leaves RAM for t
    assert b"s" in spill and b"s" not in sched.store
    nxt = [*msgs, {"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    params = SamplingParams(max_tokens=tiny_engine.n_ctx)
    events = sched.submit(b"r2", b"s", nxt, params)
    assert [type(e).__name__ for e in events] == ["OverflowEvent"]
    assert b"s" in spill and b"s" not in sched.store  # untouched: still on disk
    _, end = run(sched, b"s", nxt)
    assert end.stats.kv_source is KvSource.DISK and end.stats.path is CachePath.TEXT_PREFIX
