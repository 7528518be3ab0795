"""Dying, hanging and restarting processes, with real `kvroute` processes.

test_serve.py already kills a worker mid-stream under `broker` + `worker` (heartbeat detection)
and an idle worker under `serve`; this file covers the other combinations:

- `serve`, several sessions in flight on both workers, one worker killed: only its turns end,
  at once (process sentinel, reason ``exited``), the others finish; the retries are cold
  ``worker_lost`` and the restarted worker serves them.
- the only worker killed with a turn in flight: SESSION_LOST, then ``no_worker`` (not a hang),
  then a new worker process with the same id serves the session, cold ``worker_lost``.
- a worker SIGSTOPped mid-stream: declared dead after the liveness window, its turn ends with
  SESSION_LOST, the session fails over; SIGCONT: it re-registers (new epoch) and serves again.
- the broker killed mid-stream: the turn in flight and every later request end with
  ``Timeout``; a new broker on the same addresses: the workers re-register by themselves and the
  same client carries on. The broker stopped with SIGTERM mid-stream: ``shutting_down``.

Heartbeats are short (0.3-0.4 s, liveness 3). The tiny model is used where a turn only needs to
be in flight (a SIGSTOP holds it there); the real model where a stream must be running.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq
from procs import KvProc, Procs, free_port, wait_for
from wire import WireClient

from kvroute import AsyncClient, Client, KvrouteError, ServiceUnavailable, SessionLost, Timeout
from kvroute.client import Session, TurnResult
from kvroute.proto import ErrorCode, ErrorReply, Kind, LostReason
from kvroute.proto import SessionLost as LostBody
from kvroute.proto.messages import CachePath, ColdReason

pytestmark = pytest.mark.timeout(180)  # nothing may hang: every wait below is bounded anyway

LIVENESS = 3  # the broker's default: silent intervals before a worker is lost
SLACK = 1.0  # scheduling slack on a loaded machine with few cores, on top of the liveness window
STORY = "Write a very long story about a dragon who learns to paint."


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def start_broker(procs: Procs, front: str, back: str, hb: float) -> KvProc:
    b = procs.start(
        "broker",
        [
            *("broker", "--frontend", front, "--backend", back),
            *("--heartbeat", str(hb), "--liveness", str(LIVENESS)),
        ],
    )
    b.wait_log(r"broker frontend", timeout=30)
    return b


def start_worker(procs: Procs, back: str, wid: str, model: Path, hb: float) -> KvProc:
    return procs.start(
        wid,
        ["worker", "--connect", back, "--id", wid, "--model", str(model), "--heartbeat", str(hb)],
    )


# --- serve: a worker killed with turns in flight --------------------------------------------

HB_TINY = 0.3


def test_kill9_under_serve_ends_only_its_turns_at_once(procs: Procs, tiny_model_path: Path) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    serve = procs.start(
        "serve",
        [
            *("serve", "--workers", "2", "--model", str(tiny_model_path)),
            *("--frontend", url, "--heartbeat", str(HB_TINY)),
        ],
    )
    serve.wait_log(r"ready frontend")
    pids = {m[1]: int(m[2]) for m in re.finditer(r"worker (w\d) pid (\d+)", serve.text())}
    with Client(url, timeout=10) as client:
        sessions = [client.session() for _ in range(4)]
        for s in sessions:
            list(s.send("hi", max_tokens=3))
        owner = {s.id: s.last.worker for s in sessions if s.last}
        assert sorted(owner.values()) == ["w0", "w0", "w1", "w1"], owner  # least-loaded
        histories = {s.id: list(s.history) for s in sessions}
        # A tiny-model turn lasts milliseconds: stop w0 first so that its turns are surely in
        # flight when it is killed; w1's turns run meanwhile.
        os.kill(pids["w0"], signal.SIGSTOP)
        outcome: dict[str, tuple[TurnResult | KvrouteError | None, float]] = {}

        def turn(s: Session) -> None:
            try:
                list(s.send("go on", max_tokens=20))
                outcome[s.id] = (s.last, time.monotonic())
            except KvrouteError as exc:
                outcome[s.id] = (exc, time.monotonic())

        threads = [threading.Thread(target=turn, args=(s,)) for s in sessions]
        for t in threads:
            t.start()
        wait_for(lambda: len(outcome) == 2, "w1's turns", 10)
        killed_at = time.monotonic()
        os.kill(pids["w0"], signal.SIGKILL)
        for t in threads:
            t.join(15)
        assert not any(t.is_alive() for t in threads), "a turn in flight never ended"
        for s in sessions:
            result, at = outcome[s.id]
            if owner[s.id] == "w1":
                assert isinstance(result, TurnResult) and result.worker == "w1", result
                continue
            assert isinstance(result, SessionLost), result
            assert (result.worker, result.reason, result.retryable) == ("w0", "exited", True)
            # The process sentinel tells the broker at once: well inside the liveness window
            # that heartbeat detection would need.
            assert at - killed_at < LIVENESS * HB_TINY, at - killed_at
            print(f"\nserve kill -9: {s.id[:8]} SESSION_LOST(exited) after {at - killed_at:.3f} s")
            assert s.history == histories[s.id]  # the partial reply was not kept
        # serve restarts w0 (new process, new epoch); the lost sessions go there, cold.
        serve.wait_log(r"worker w0 exited; restarted", timeout=30)
        wait_for(lambda: len([r for r in serve.registrations() if r.worker == "w0"]) == 2, "w0", 60)
        first, again = [r for r in serve.registrations() if r.worker == "w0"]
        assert again.epoch != first.epoch and again.pid != first.pid
        retried = []
        for s in sessions:
            if owner[s.id] == "w0":
                list(s.send("go on", max_tokens=4))
                assert s.last is not None
                assert (s.last.path, s.last.cold_reason) == (CachePath.COLD, ColdReason.WORKER_LOST)
                retried.append(s.last.worker)
        assert "w0" in retried  # the restarted worker holds no session: it is placed first


# --- the only worker killed: no_worker, then a new process -----------------------------------


def test_only_worker_killed_then_no_worker_then_a_new_one(
    procs: Procs, tiny_model_path: Path, zctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = start_broker(procs, front, back, HB_TINY)
    solo = start_worker(procs, back, "solo", tiny_model_path, HB_TINY)
    broker.wait_log(r"worker solo registered", timeout=60)
    raw = WireClient(zctx, front)
    assert raw.turn(b"s", b"r1", ["hi"], max_tokens=3).kind is Kind.END
    solo.signal(signal.SIGSTOP)
    raw.send_turn(b"s", b"r2", ["hi", "x", "more"], max_tokens=20)
    raw.send(Kind.PING, b"", b"p")  # same socket, so once PONG is back the TURN is in flight
    pong = raw.recv(5)
    assert pong is not None and pong.kind is Kind.PONG
    killed_at = time.monotonic()
    solo.signal(signal.SIGKILL)  # no sentinel here: the broker finds out by itself
    lost = raw.collect(b"r2", timeout=10)
    elapsed = time.monotonic() - killed_at
    assert lost.kind is Kind.SESSION_LOST, lost
    body = LostBody.decode(lost.body)
    assert body.worker == "solo"
    assert body.reason in (LostReason.UNREACHABLE, LostReason.HEARTBEAT_TIMEOUT)
    assert elapsed <= LIVENESS * HB_TINY + SLACK, elapsed
    print(f"\nonly worker kill -9: SESSION_LOST({body.reason}) after {elapsed:.3f} s")
    # No worker left: the retry is refused at once (ERROR no_worker), it does not hang.
    refused = raw.turn(b"s", b"r3", ["hi", "x", "more"], max_tokens=3)
    assert refused.kind is Kind.ERROR
    assert ErrorReply.decode(refused.body).code is ErrorCode.NO_WORKER
    # A new process with the same id registers (new epoch) and gets the session, cold.
    start_worker(procs, back, "solo", tiny_model_path, HB_TINY)
    broker.wait_log(r"worker solo registered", count=2, timeout=60)
    end = raw.turn(b"s", b"r4", ["hi", "x", "more"], max_tokens=3).end
    assert end.stats.worker == "solo"
    assert (end.stats.path, end.stats.cold_reason) == (CachePath.COLD, ColdReason.WORKER_LOST)
    first, again = [r for r in broker.registrations() if r.worker == "solo"]
    assert first.epoch != again.epoch


# --- the real model: a broker and two workers, each its own process ---------------------------

HB = 0.4


@dataclass
class Cluster:
    """`kvroute broker` + two `kvroute worker` processes serving the real model."""

    procs: Procs
    front: str
    back: str
    model: Path
    broker: KvProc = field(init=False)
    workers: dict[str, KvProc] = field(default_factory=dict)

    def start(self) -> None:
        self.broker = start_broker(self.procs, self.front, self.back, HB)
        for wid in ("wa", "wb"):
            self.workers[wid] = start_worker(self.procs, self.back, wid, self.model, HB)
        self.wait_live()

    def wait_live(self, timeout: float = 120.0) -> None:
        """Until the current broker has both workers registered (and not lost since)."""
        wait_for(lambda: self.broker.live_workers() == set(self.workers), "workers", timeout)

    def healthy(self) -> None:
        """Undo what a failed test may have left: stopped workers, a dead broker."""
        for w in self.workers.values():
            os.killpg(w.pid, signal.SIGCONT)
        if self.broker.p.poll() is not None:
            self.restart_broker()
        self.wait_live()

    def restart_broker(self) -> None:
        """A new broker process on the same addresses (the old one must be gone)."""
        assert self.broker.p.poll() is not None, "stop the old broker first"
        self.broker = start_broker(self.procs, self.front, self.back, HB)


@pytest.fixture(scope="module")
def cluster(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    procs = Procs(tmp_path_factory.mktemp("cluster"))
    c = Cluster(
        procs, f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", model_path
    )
    try:
        c.start()
        yield c
    finally:
        procs.close()


@pytest.fixture
def live(cluster: Cluster) -> Cluster:
    cluster.healthy()
    return cluster


@pytest.mark.model
def test_sigstop_worker_lost_after_liveness_window_then_rejoins(
    live: Cluster, zctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    c = WireClient(zctx, live.front)
    owner = c.turn(b"stop", b"r1", ["Hi."], max_tokens=2).end.stats.worker
    other = next(w for w in live.workers if w != owner)
    c.send_turn(b"stop", b"r2", [STORY], max_tokens=200)
    first = c.recv(30)
    assert first is not None and first.kind is Kind.TOKEN  # streaming now
    stopped_at = time.monotonic()
    live.workers[owner].signal(signal.SIGSTOP)
    res = c.collect(b"r2", timeout=30)
    elapsed = time.monotonic() - stopped_at
    assert res.kind is Kind.SESSION_LOST, res.kind
    lost = LostBody.decode(res.body)
    assert (lost.worker, lost.reason, lost.retryable) == (owner, LostReason.HEARTBEAT_TIMEOUT, True)
    # Hung, not dead: declared lost only once the liveness window has passed (its last token
    # came at most one decode step before the SIGSTOP), and not much later.
    window = LIVENESS * HB
    assert window - HB <= elapsed <= window + SLACK, elapsed
    print(f"\nSIGSTOP: SESSION_LOST(heartbeat_timeout) after {elapsed:.3f} s (window {window} s)")
    # The session fails over to the other worker, cold, reason worker_lost.
    end = c.turn(b"stop", b"r3", [STORY], max_tokens=4).end
    assert end.stats.worker == other
    assert (end.stats.path, end.stats.cold_reason) == (CachePath.COLD, ColdReason.WORKER_LOST)
    # SIGCONT: it reads "declared lost" (or notices the silence), drops its sessions and
    # registers again with a new epoch; whatever it had queued for the old turn is dropped.
    epochs = [r.epoch for r in live.broker.registrations() if r.worker == owner]
    live.workers[owner].signal(signal.SIGCONT)
    wait_for(lambda: owner in live.broker.live_workers(), f"{owner} back", 30)
    again = [r.epoch for r in live.broker.registrations() if r.worker == owner]
    assert len(again) == len(epochs) + 1 and again[-1] not in epochs
    assert c.recv(0.5) is None, "a stale frame of the hung worker reached the client"
    # It holds no session now, so a new session is placed on it, and it serves.
    assert c.turn(b"fresh", b"r4", ["Hello!"], max_tokens=4).end.stats.worker == owner


@pytest.mark.model
def test_broker_killed_mid_stream_times_out_then_workers_reregister(live: Cluster) -> None:
    old = {r.worker: r.epoch for r in live.broker.registrations()}
    with Client(live.front, timeout=2) as client:
        s = client.session()
        list(s.send("Hi.", max_tokens=2))
        assert s.last is not None
        owner = s.last.worker
        history = list(s.history)
        stream = s.send(STORY, max_tokens=60)
        assert next(stream)  # streaming now
        live.broker.signal(signal.SIGKILL)
        live.broker.p.wait(10)
        with pytest.raises(Timeout):  # the turn in flight: its next token never comes
            for _ in stream:
                pass
        assert s.history == history
        # Every request to the dead broker times out; none hangs.
        with pytest.raises(Timeout):
            client.ping()
        with pytest.raises(Timeout):
            list(client.session().send("anyone?", max_tokens=2))
        assert asyncio.run(async_requests_time_out(live.front)) == 2
        # A new broker on the same addresses: the workers find it and register by themselves
        # (Paranoid Pirate), each with a new epoch; the same client carries on.
        live.restart_broker()
        live.wait_live(30)
        new = {r.worker: r.epoch for r in live.broker.registrations()}
        assert set(new) == set(old) and all(new[w] != old[w] for w in old), (old, new)
        # This send first settles the cut-off turn: its CANCEL reaches a broker that never saw
        # that turn, which answers ERROR not_in_flight at once (silence would be a Timeout).
        list(s.send("Are you there?", max_tokens=4))
        # The worker kept the session (the cut-off turn ended there as cancelled) and announced
        # it to the new broker: the history the client still has is reused up to that turn.
        assert s.last is not None and s.last.worker == owner
        assert s.last.path == CachePath.TOKEN_PREFIX
    with Client(live.front, timeout=10) as fresh:
        list(fresh.session().send("Hello!", max_tokens=4))


async def async_requests_time_out(url: str) -> int:
    """A turn and a ping from an AsyncClient to a dead broker; returns how many timed out."""
    n = 0
    async with AsyncClient(url, timeout=1) as client:
        try:
            async for _ in client.session().send("anyone?", max_tokens=2):
                pass
        except Timeout:
            n += 1
        try:
            await client.ping()
        except Timeout:
            n += 1
    return n


@pytest.mark.model
def test_broker_stopped_mid_stream_says_shutting_down(live: Cluster) -> None:
    with Client(live.front, timeout=10) as client:
        s = client.session()
        stream = s.send(STORY, max_tokens=60)
        assert next(stream)
        live.broker.signal(signal.SIGTERM)
        with pytest.raises(ServiceUnavailable) as err:  # a terminal frame, not a timeout
            for _ in stream:
                pass
        assert err.value.code is ErrorCode.SHUTTING_DOWN
        assert live.broker.p.wait(15) == 0
    live.restart_broker()
    live.wait_live(30)
    with Client(live.front, timeout=10) as client:
        list(client.session().send("Hello!", max_tokens=4))
