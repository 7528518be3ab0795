"""No client can kill a worker: cancelled full hits against real `kvroute` processes.

A `kvroute broker` and a separately run `kvroute worker` (tiny model), driven with raw frames:

- the three-call reproduction: a turn with ``max_tokens=1`` (the committed text is the prompt),
  the same history again (a full hit: one token is re-fed) cancelled at once, then the next
  turn. The worker must stay up (same process, never lost, never re-registered) and the next
  turn must reuse the whole committed prompt (text-prefix path);
- a raw TURN of a new session followed at once by its CANCEL: it ends cancelled, and the next
  turn is cold with reason ``cancelled`` (nobody reset it).

"At once" is made deterministic by SIGSTOPping the worker while the TURN and the CANCEL reach it,
so that it reads both before it runs a single step. Heartbeats are 1 s with liveness 3: the
pause (well under a second) never makes the broker declare the worker lost.

Over the wire, CLOSE makes the worker forget an id (whoever reuses it starts ``new``) while
RESET is remembered (``reset``).

And the worker's message loop contains its own bugs (in-process broker and worker threads): a
failure while handling one message, or while sending one event, answers that request ERROR
``internal`` and the worker serves the next request.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import zmq
from procs import KvProc, Procs, free_port
from wire import WireClient

from kvroute.proto import ErrorCode, ErrorReply, Kind
from kvroute.proto.messages import CachePath, ColdReason, FinishReason
from kvroute.worker import service as worker_service

if TYPE_CHECKING:
    from service_harness import Harness

    from kvroute.engine.engine import Engine

pytestmark = pytest.mark.timeout(120)

HB = 1.0
WORKER = "sturdy"


@dataclass
class Service:
    broker: KvProc
    worker: KvProc
    client: WireClient

    def assert_worker_never_went_down(self) -> None:
        assert self.worker.p.poll() is None, self.worker.text()[-3000:]
        assert [r.worker for r in self.broker.registrations()] == [WORKER]
        assert f"worker {WORKER} lost" not in self.broker.text()
        assert "Traceback" not in self.worker.text(), self.worker.text()[-3000:]

    def turn_then_cancel_at_once(self, sid: bytes, rid: bytes, texts: list[str]) -> None:
        """Deliver a TURN and its CANCEL to the worker so that it reads them in one go."""
        self.worker.signal(signal.SIGSTOP)
        try:
            self.client.send_turn(sid, rid, texts, max_tokens=4)
            self.client.send(Kind.CANCEL, sid, rid)
            # Same socket, in order: once PONG is back, the broker has forwarded both.
            self.client.send(Kind.PING, b"", b"ping")
            pong = self.client.recv(5)
            assert pong is not None and pong.kind is Kind.PONG
        finally:
            self.worker.signal(signal.SIGCONT)


@pytest.fixture
def service(tmp_path: Path, tiny_model_path: Path) -> Iterator[Service]:
    procs = Procs(tmp_path)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        broker = procs.start(
            "broker",
            ["broker", "--frontend", front, "--backend", back, "--heartbeat", str(HB)],
        )
        broker.wait_log(r"broker frontend", timeout=30)
        worker = procs.start(
            WORKER,
            [
                *("worker", "--connect", back, "--id", WORKER),
                *("--model", str(tiny_model_path), "--heartbeat", str(HB)),
            ],
        )
        broker.wait_log(rf"worker {WORKER} registered", timeout=60)
        client = WireClient(ctx, front)
        yield Service(broker, worker, client)
        client.close()
    finally:
        ctx.destroy(linger=0)
        procs.close()


def test_cancelled_full_hit_does_not_kill_the_worker(service: Service) -> None:
    c = service.client
    first = c.turn(b"s", b"r1", ["hi"], max_tokens=1)
    end1 = first.end
    assert end1.finish_reason is FinishReason.LENGTH and end1.stats.generated_tokens == 1
    # The one sampled token was never fed: the committed text is the prompt itself.
    committed = end1.stats.prompt_tokens
    service.turn_then_cancel_at_once(b"s", b"r2", ["hi"])  # a full hit, cancelled unfed
    resent = c.collect(b"r2", timeout=10)
    assert resent.kind is Kind.END, (resent.kind, resent.body[:200])
    end2 = resent.end
    assert end2.finish_reason is FinishReason.CANCELLED and end2.stats.generated_tokens == 0
    assert (end2.stats.path, end2.stats.cached_tokens) == (CachePath.TEXT_PREFIX, committed - 1)
    nxt = c.turn(b"s", b"r3", ["hi", first.text, "and then?"], max_tokens=3)
    assert nxt.kind is Kind.END, (nxt.kind, nxt.body[:200])
    stats = nxt.end.stats
    assert stats.worker == WORKER
    assert (stats.path, stats.cached_tokens) == (CachePath.TEXT_PREFIX, committed)
    service.assert_worker_never_went_down()


def test_turn_cancelled_at_once_reports_cancelled_and_the_worker_serves_on(
    service: Service,
) -> None:
    c = service.client
    service.turn_then_cancel_at_once(b"n", b"r1", ["hello"])
    first = c.collect(b"r1", timeout=10)
    assert first.kind is Kind.END and first.end.finish_reason is FinishReason.CANCELLED
    again = c.turn(b"n", b"r2", ["hello"], max_tokens=2).end
    assert (again.stats.path, again.stats.cold_reason) == (CachePath.COLD, ColdReason.CANCELLED)
    # The same race without the pause, as a client would run it: resend and cancel at once,
    # a few times over (whether the worker reads the CANCEL before its first step or after,
    # each ends with exactly one terminal and the session stays usable).
    # A turn that ends before the broker reads its CANCEL also gets a late ERROR
    # `not_in_flight`, after its END: `collect` skips those of the earlier races.
    raced: list[bytes] = []
    for i in range(5):
        rid = b"race%d" % i
        c.send_turn(b"n", rid, ["hello"], max_tokens=4)
        c.send(Kind.CANCEL, b"n", rid)
        res = c.collect(rid, timeout=10, cancelled=raced)
        assert res.kind is Kind.END, (res.kind, res.body[:200])
        raced.append(rid)
    last = c.turn(b"n", b"r3", ["hello", "", "more"], max_tokens=2, cancelled=raced)
    assert last.kind is Kind.END and last.end.stats.worker == WORKER
    service.assert_worker_never_went_down()


# --- the message loop contains its own bugs ---------------------------------------------------


class Boom(RuntimeError):
    """An injected bug."""


def fails_once(real: Callable[..., object]) -> Callable[..., object]:
    """``real``, except that its first call raises `Boom`."""
    calls: list[None] = []

    def wrapper(*args: object, **kw: object) -> object:
        calls.append(None)
        if len(calls) == 1:
            raise Boom("injected")
        return real(*args, **kw)

    return wrapper


def assert_internal_error(kind: Kind | None, body: bytes) -> None:
    assert kind is Kind.ERROR, (kind, body[:200])
    assert ErrorReply.decode(body).code is ErrorCode.INTERNAL


@pytest.mark.parametrize("where", ["handling the TURN", "sending its END"])
def test_a_bug_in_the_message_loop_fails_one_request_only(
    tiny_service: Harness, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    name = "SamplingParams" if where == "handling the TURN" else "TurnEnd"
    monkeypatch.setattr(worker_service, name, fails_once(getattr(worker_service, name)))
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    c = WireClient(ctx, tiny_service.frontend)
    try:
        failed = c.turn(b"s", b"r1", ["hi"], max_tokens=3)
        assert_internal_error(failed.kind, failed.body)
        ok = c.turn(b"s", b"r2", ["hi"], max_tokens=3)
        assert ok.kind is Kind.END, (ok.kind, ok.body[:200])
        assert ok.end.stats.worker in tiny_service.workers
        assert c.recv(0.3) is None, "a stray frame after the terminal"
    finally:
        c.close()
        ctx.destroy(linger=0)
    assert all(t.is_alive() for t in tiny_service.threads)
    assert len(tiny_service.broker.table.workers) == 2  # nobody was lost


def test_closed_id_reused_is_new_and_reset_says_reset(tiny_engine: Engine) -> None:
    from service_harness import start_harness

    harness = start_harness(tiny_engine, 1)  # one worker: every turn lands where the cache was
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    c = WireClient(ctx, harness.frontend)
    try:
        reasons = {}
        for sid, kind, ok in ((b"c", Kind.CLOSE, Kind.CLOSE_OK), (b"r", Kind.RESET, Kind.RESET_OK)):
            assert c.turn(sid, b"t1", ["hi"], max_tokens=2).kind is Kind.END
            c.send(kind, sid, b"drop")
            answer = c.recv(10)
            assert answer is not None and answer.kind is ok, answer
            stats = c.turn(sid, b"t2", ["hi"], max_tokens=2).end.stats
            assert stats.path == CachePath.COLD
            reasons[sid] = stats.cold_reason
        assert reasons == {b"c": ColdReason.NEW, b"r": ColdReason.RESET}
    finally:
        c.close()
        ctx.destroy(linger=0)
        harness.close()
