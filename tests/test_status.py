"""The fleet view: the broker's ledger, STATUS / FLEET on the wire, worker gauges, and
``kvroute status`` against a live service whose turns we know."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import msgpack
import pytest
import zmq
from click.testing import CliRunner
from fake_peers import Client as RawClient
from fake_peers import error_code
from service_harness import Harness

from kvroute import Client, ContextOverflow
from kvroute.broker.config import BrokerStats
from kvroute.broker.fleet import FleetLedger
from kvroute.broker.routing import RoutingTable
from kvroute.cli import main
from kvroute.engine.engine import Engine
from kvroute.proto import (
    EMPTY_BODY,
    CachePath,
    ColdReason,
    ErrorCode,
    Fleet,
    Heartbeat,
    Kind,
    LostReason,
    ProtocolViolation,
    Ready,
    TurnOutcome,
    WorkerCounters,
    WorkerGauges,
    control_frames,
    error_body,
)
from kvroute.proto import limits as L
from kvroute.proto.frames import parse_backend
from kvroute.proto.status import BrokerCounters, WorkerView
from kvroute.worker.config import WorkerConfig
from kvroute.worker.service import WorkerService

TIMEOUT = 5.0


def counters(cold: int = 0, warm: int = 0, prompt: int = 0, cached: int = 0, evictions: int = 0):
    """Counters of ``cold`` turns (reason new) and ``warm`` text-prefix ones."""
    paths = {CachePath.COLD: cold, CachePath.TEXT_PREFIX: warm}
    reasons = {ColdReason.NEW: cold}
    return WorkerCounters(
        paths, reasons, prompt, cached, prompt - cached, 2 * (cold + warm), evictions
    )


def gauges(started_ns: int, c: WorkerCounters, budget: int = 1 << 30) -> WorkerGauges:
    return WorkerGauges("host-a", started_ns, budget, 0, c)


# --- the ledger, without sockets ---------------------------------------------------------------


def register(table: RoutingTable, key: bytes, worker: str, now: float = 0.0) -> None:
    ready = Ready(worker, pid=100, epoch=int(now * 1000) + 1, capacity=4, model="m", n_ctx=512)
    # other_connected=False: an earlier connection with this worker id is gone (a restart).
    assert not table.register(key, ready, now, other_connected=False).refused


def test_ledger_shows_registered_workers_with_their_latest_gauges() -> None:
    table, ledger, stats = RoutingTable(3.0), FleetLedger(started_ns=5), BrokerStats()
    register(table, b"k0", "w0")
    register(table, b"k1", "w1")
    ledger.heartbeat(table.workers[b"k0"], Heartbeat(1, 2, 300, gauges(10, counters(1, 0, 50))))
    ledger.heartbeat(table.workers[b"k0"], Heartbeat(0, 3, 400, gauges(10, counters(1, 2, 90, 30))))
    table.heartbeat(b"k0", Heartbeat(0, 3, 400), 1.0)
    view = ledger.view(table, stats, now=1.5)
    assert [w.worker for w in view.workers] == ["w0", "w1"]
    w0, w1 = view.workers
    assert w0.gauges is not None and w0.gauges.counters.turns == 3  # the latest, not a sum
    assert (w0.sessions, w0.kv_bytes, w0.heard_ms) == (3, 400, 500.0)
    assert w1.gauges is None  # no heartbeat with gauges yet
    assert view.totals == counters(1, 2, 90, 30)
    assert view.broker.started_ns == 5
    Fleet.decode(view.encode())  # what the broker sends is valid FLEET


def test_totals_keep_gone_and_restarted_processes_and_count_a_re_registration_once() -> None:
    table, ledger = RoutingTable(3.0), FleetLedger()
    register(table, b"k0", "w0")
    ledger.heartbeat(table.workers[b"k0"], Heartbeat(gauges=gauges(1, counters(2, 3, 100, 40))))
    # The same process registers again on a new connection: its counters go on, not restart.
    lost = table.remove(b"k0", LostReason.HEARTBEAT_TIMEOUT)
    assert lost is not None
    ledger.worker_gone(b"k0", lost.reason)
    register(table, b"k0b", "w0", now=1.0)
    ledger.heartbeat(table.workers[b"k0b"], Heartbeat(gauges=gauges(1, counters(2, 4, 120, 50))))
    assert ledger.totals() == counters(2, 4, 120, 50)
    # A new process with the same worker id starts from zero: both are in the totals.
    register(table, b"k0c", "w0", now=9.0)  # replaces k0b (restarted)
    ledger.worker_gone(b"k0b", LostReason.RESTARTED)
    ledger.heartbeat(table.workers[b"k0c"], Heartbeat(gauges=gauges(2, counters(1, 0, 10))))
    assert ledger.totals() == counters(3, 4, 130, 50)
    view = ledger.view(table, BrokerStats(), now=9.0)
    assert [w.worker for w in view.workers] == ["w0"]
    assert view.broker.workers_lost == 2


def test_folding_old_processes_keeps_totals_and_live_workers() -> None:
    table, ledger = RoutingTable(3.0), FleetLedger(max_processes=3)
    register(table, b"live", "live")
    live = table.workers[b"live"]
    ledger.heartbeat(live, Heartbeat(gauges=gauges(1, counters(1, 0, 10))))
    for i in range(6):  # six short-lived processes of another worker id
        register(table, b"k%d" % i, "gone", now=float(i))
        ledger.heartbeat(table.workers[b"k%d" % i], Heartbeat(gauges=gauges(i, counters(0, 1, 5))))
    assert len(ledger._processes) <= 3
    assert ledger.totals() == counters(1, 6, 40)
    ledger.heartbeat(live, Heartbeat(gauges=gauges(1, counters(2, 0, 20))))  # still apart
    assert ledger.totals() == counters(2, 6, 50)


def test_outcomes_errors_and_losses_are_counted_by_kind() -> None:
    table, ledger = RoutingTable(3.0), FleetLedger()
    for kind in (Kind.END, Kind.END, Kind.OVERFLOW, Kind.BUSY, Kind.SESSION_LOST, Kind.ERROR):
        ledger.turn_ended(kind)
    ledger.error_sent(ErrorCode.NO_WORKER)
    ledger.error_sent(ErrorCode.NO_WORKER)
    ledger.worker_gone(b"x", LostReason.DISCONNECTED)  # an orderly goodbye is not a loss
    ledger.worker_gone(b"y", LostReason.EXITED)
    b = ledger.view(table, BrokerStats(client_messages=7, worker_messages=3), 0.0).broker
    assert b.requests == {
        TurnOutcome.END: 2,
        TurnOutcome.OVERFLOW: 1,
        TurnOutcome.BUSY: 1,
        TurnOutcome.SESSION_LOST: 1,
        TurnOutcome.ERROR: 1,
    }
    assert b.errors == {ErrorCode.NO_WORKER: 2}
    assert (b.workers_lost, b.messages) == (1, 10)


def test_absurd_reports_cannot_break_the_view() -> None:
    table, ledger = RoutingTable(3.0), FleetLedger()
    top = L.MAX_COUNT  # each worker's report is valid; their sum is not
    huge = WorkerCounters({CachePath.TEXT_PREFIX: top}, {}, top, 0, top, top, 0)
    for i, key in enumerate((b"a", b"b")):
        register(table, key, f"w{i}")
        ledger.heartbeat(table.workers[key], Heartbeat(gauges=gauges(i, huge)))
    Fleet.decode(ledger.view(table, BrokerStats(), 0.0).encode())  # sums clamped, still valid


# --- protocol: bodies and limits ---------------------------------------------------------------


def test_widest_fleet_fits_one_body() -> None:
    """Every name at its longest in four-byte characters, every number at its widest, every
    map full: the most workers one FLEET lists still fit the body limit, and one more is
    refused."""
    name = "\U0001f600" * L.MAX_NAME_CHARS
    top = L.MAX_COUNT
    wide = WorkerCounters({p: top for p in CachePath}, {r: top for r in ColdReason}, *[top] * 5)
    g = WorkerGauges(name, top, top, top, wide)
    workers = tuple(
        WorkerView(f"{i:03d}{name[3:]}", top, top, name, L.MAX_N_CTX, L.MAX_CAPACITY,
                   L.MAX_IDLE_MS, top, top, top, top, top, g)
        for i in range(L.MAX_FLEET_WORKERS + 1)
    )  # fmt: skip
    broker = BrokerCounters(top, top, top, top, top, dict.fromkeys(TurnOutcome, top),
                            dict.fromkeys(ErrorCode, top))  # fmt: skip
    # (Counters this wide do not add up, so FLEET's checks would refuse them: size them raw.)
    fleet = Fleet(broker, workers[:-1], top, wide)
    assert len(msgpack.packb(fleet.to_map(), use_bin_type=True)) <= L.MAX_BODY_BYTES
    with pytest.raises(ProtocolViolation) as err:
        Fleet(broker, workers, 0, wide).encode()
    assert err.value.code is ErrorCode.TOO_LARGE


def test_heartbeat_gauges_are_checked() -> None:
    bad = WorkerCounters({CachePath.COLD: 2}, {ColdReason.NEW: 1}, 10, 0, 10, 0, 0)
    with pytest.raises(ProtocolViolation) as err:
        Heartbeat(gauges=gauges(1, bad)).encode()
    assert err.value.code is ErrorCode.OUT_OF_RANGE
    # Without gauges a HEARTBEAT is the bytes it always was.
    assert Heartbeat(1, 2, 3).encode() == msgpack.packb({"load": 1, "sessions": 2, "kv_bytes": 3})


# --- on the wire, against a live service -------------------------------------------------------


@pytest.fixture
def raw(tiny_service: Harness) -> Iterator[RawClient]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    c = RawClient(ctx, tiny_service.frontend)
    try:
        yield c
    finally:
        c.sock.close(0)
        ctx.term()


def test_status_round_trip(tiny_service: Harness, raw: RawClient) -> None:
    raw.send(Kind.STATUS, b"", b"s1")
    r = raw.recv(b"s1")
    assert (r.kind, r.session_id) == (Kind.FLEET, b"")
    fleet = Fleet.decode(r.body)
    assert sorted(w.worker for w in fleet.workers) == ["w0", "w1"]
    assert all(w.capacity >= 1 and w.n_ctx == 256 for w in fleet.workers)
    raw.send(Kind.STATUS, b"any-session", b"s2")  # a session id is allowed, and echoed
    r = raw.recv(b"s2")
    assert (r.kind, r.session_id) == (Kind.FLEET, b"any-session")


@pytest.mark.parametrize(
    "body", [msgpack.packb({"x": 1}), msgpack.packb([]), b"\xc1"], ids=["field", "array", "junk"]
)
def test_status_with_a_body_is_refused(raw: RawClient, body: bytes) -> None:
    raw.send(Kind.STATUS, b"", b"bad", body)
    r = raw.recv(b"bad")
    assert error_code(r) is ErrorCode.BAD_BODY
    raw.send(Kind.STATUS, b"", b"ok")  # the connection still works
    assert raw.recv(b"ok").kind is Kind.FLEET


def test_status_with_oversize_ids_is_refused(raw: RawClient) -> None:
    raw.sock.send_multipart([b"KVR\x01\x08", b"s" * 65, b"r1", EMPTY_BODY])
    assert error_code(raw.recv()) is ErrorCode.BAD_FRAME
    raw.sock.send_multipart([b"KVR\x01\x08", b"", b"", EMPTY_BODY])
    assert error_code(raw.recv()) is ErrorCode.BAD_FRAME


def wait_for_turns(client: Client, turns: int) -> Fleet:
    """The fleet view once workers have reported ``turns`` finished turns (heartbeats lag)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        fleet = client.status()
        if fleet.totals.turns >= turns:
            return fleet
        assert time.monotonic() < deadline, f"workers reported {fleet.totals.turns} turns"
        time.sleep(0.05)


def test_status_json_agrees_with_a_known_sequence_of_turns(tiny_service: Harness) -> None:
    results = []
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        a, b = client.session(), client.session()
        for session, text in ((a, "one"), (a, "two"), (b, "hello")):
            session.ask(text, max_tokens=4)
            results.append(session.last)
        a.reset()
        a.ask("three", max_tokens=4)
        results.append(a.last)
        with pytest.raises(ContextOverflow):
            client.session().ask("x", max_tokens=300, on_overflow="raise")  # n_ctx is 256
        fleet = wait_for_turns(client, 4)
    assert [r.path for r in results] == ["cold", "text_prefix", "cold", "cold"]
    out = CliRunner().invoke(main, ["status", "--connect", tiny_service.frontend, "--json"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    totals = got["totals"]
    assert totals["paths"] == {"cold": 3, "text_prefix": 1}
    assert totals["cold_reasons"] == {"new": 2, "reset": 1}
    for field in ("prompt_tokens", "cached_tokens", "prefill_tokens", "generated_tokens"):
        assert totals[field] == sum(getattr(r, field) for r in results), field
    assert totals["cached_tokens"] > 0  # the text-prefix turn reused the first one's KV
    broker = got["broker"]
    assert broker["requests"] == {"end": 4, "overflow": 1}
    assert broker["requests_in_flight"] == 0
    pins = tiny_service.broker.table.pins
    assert broker["sessions_pinned"] == len(pins) and {a.id, b.id} <= {p.decode() for p in pins}
    assert broker["messages"] > fleet.broker.messages  # it went on counting
    workers = {w["worker"]: w for w in got["workers"]}
    assert set(workers) == {"w0", "w1"}
    assert sum(w["sessions"] for w in workers.values()) == 2  # a and b are resident
    for w in workers.values():
        per = w["gauges"]["counters"]
        served = [r for r in results if r.worker == w["worker"]]
        assert sum(per["paths"].values()) == len(served)
        assert per["prompt_tokens"] == sum(r.prompt_tokens for r in served)


def test_status_table_lists_every_worker_and_the_fleet(tiny_service: Harness) -> None:
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        chat = client.session()
        chat.ask("one", max_tokens=4)
        chat.ask("two", max_tokens=4)
        wait_for_turns(client, 2)
    out = CliRunner().invoke(main, ["status", "--connect", tiny_service.frontend])
    assert out.exit_code == 0, out.output
    lines = [line.strip() for line in out.output.splitlines()]
    header = next(line for line in lines if line.startswith("worker"))
    for column in ("pid/host", "up since", "sessions", "KV MB / budget", "in flight", "turns"):
        assert column in header
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("w0", "w1"))}
    assert set(rows) == {"w0", "w1"}
    fleet_row = next(line for line in lines if line.startswith("fleet"))
    assert "2 workers" in fleet_row
    served = next(r for r in rows.values() if r[-3] == "2")  # turns column of the chat's worker
    assert served[-2].endswith("%") and int(served[-2][:-1]) > 0  # its cache hit
    assert "text_prefix 1" in out.output and "cold 1" in out.output


def test_status_without_a_broker_is_one_line(tmp_path: object) -> None:
    out = CliRunner().invoke(main, ["status", "--connect", "tcp://127.0.0.1:9", "--timeout", "0.3"])
    assert out.exit_code == 1
    assert "no kvroute broker answers" in out.output


# --- a worker and an older broker ------------------------------------------------------------


def test_worker_stops_sending_gauges_when_the_broker_refuses_them(tiny_engine: Engine) -> None:
    """A broker of an older release rejects HEARTBEAT's unknown field: the worker goes on with
    plain heartbeats instead of being told off every second."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    cfg = WorkerConfig(connect=f"tcp://127.0.0.1:{port}", worker_id="old", heartbeat_interval=0.05)
    service = WorkerService(tiny_engine, cfg, stop)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    beats: list[Heartbeat] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(beats) < 6:
            assert time.monotonic() < deadline and router.poll(1000), "worker went silent"
            msg = parse_backend(router.recv_multipart())
            if msg.kind is Kind.READY:
                router.send_multipart([msg.worker, *control_frames(Kind.HEARTBEAT)])
            elif msg.kind is Kind.HEARTBEAT:
                hb = Heartbeat.decode(msg.body)
                beats.append(hb)
                router.send_multipart([msg.worker, *control_frames(Kind.HEARTBEAT)])
                if hb.gauges is not None:  # what an older broker answers
                    refusal = error_body(
                        ErrorCode.BAD_BODY, "HEARTBEAT: Object contains unknown field `gauges`"
                    )
                    router.send_multipart([msg.worker, *control_frames(Kind.ERROR, refusal)])
    finally:
        stop.set()
        thread.join(TIMEOUT)
        router.close(0)
        ctx.term()
    assert beats[0].gauges is not None and beats[0].gauges.started_ns > 0
    with_gauges = [i for i, hb in enumerate(beats) if hb.gauges is not None]
    assert with_gauges[-1] <= 2  # at most the ones sent before the refusal arrived
    assert beats[-1].gauges is None and service.registrations == 1  # no re-registration
