"""The broker's I/O-free routing table: placement, stickiness, busy, liveness, loss."""

from __future__ import annotations

import pytest

from kvroute.broker.records import REFUSED_UNRUN
from kvroute.broker.routing import Action, Orphan, Registration, Route, RoutingTable
from kvroute.proto import ErrorCode, Heartbeat, Kind, LostReason, Overflow, Ready
from kvroute.proto.control import Resident, error_body
from kvroute.proto.kinds import FLAG_WORKER_LOST

EXPIRY = 3.0


def ready(
    worker: str, epoch: int = 1, capacity: int = 4, sessions: tuple[Resident, ...] = ()
) -> Ready:
    return Ready(worker, 100, epoch, capacity, "m", 2048, sessions)


@pytest.fixture
def table() -> RoutingTable:
    t = RoutingTable(EXPIRY)
    assert t.register(b"A", ready("a"), 0.0) == Registration()
    assert t.register(b"B", ready("b"), 0.0) == Registration()
    return t


def turn(t: RoutingTable, session: bytes, request: bytes = b"r", now: float = 0.0) -> Route:
    return t.route(Kind.TURN, session, request, b"client", now)


def end(t: RoutingTable, session: bytes, request: bytes = b"r", kind: Kind = Kind.END) -> None:
    worker = t.in_flight[session].worker
    assert t.on_reply(worker, kind, session, request, b"client", 0.0) is not None


def test_new_sessions_spread_then_stick(table: RoutingTable) -> None:
    first = turn(table, b"s1")
    second = turn(table, b"s2")
    assert first.action is second.action is Action.DELIVER
    assert {first.worker, second.worker} == {b"A", b"B"}  # least loaded: in flight, then sessions
    for _ in range(5):
        end(table, b"s1")
        again = turn(table, b"s1")
        assert again.worker == first.worker  # sticky
        assert again.flags == 0


def test_placement_order(table: RoutingTable) -> None:
    # Idle workers: fewer pinned sessions wins, then fewer KV bytes.
    turn(table, b"s1")
    end(table, b"s1")
    owner = table.owner(b"s1")
    assert owner is not None
    other = b"B" if owner.key == b"A" else b"A"
    assert turn(table, b"s2").worker == other
    end(table, b"s2")
    table.heartbeat(other, Heartbeat(load=0, sessions=1, kv_bytes=10**9), 0.0)
    table.heartbeat(owner.key, Heartbeat(load=0, sessions=1, kv_bytes=10), 0.0)
    assert turn(table, b"s3").worker == owner.key  # same sessions: fewer KV bytes
    # Turns in flight come first, relative to capacity.
    t = RoutingTable(EXPIRY)
    t.register(b"small", ready("small", capacity=1), 0.0)
    t.register(b"big", ready("big", capacity=8), 0.0)
    assert turn(t, b"x").worker == b"small"  # tie on everything: registration order
    assert turn(t, b"y").worker == b"big"  # small is full (1/1), big is at 0/8
    assert turn(t, b"z").worker == b"big"  # 1/8 < 1/1 even though big has more sessions


def test_busy_and_cancel(table: RoutingTable) -> None:
    first = turn(table, b"s1", b"r1")
    assert turn(table, b"s1", b"r2").kind is Kind.BUSY
    assert table.route(Kind.RESET, b"s1", b"r3", b"client", 0.0).kind is Kind.BUSY
    cancel = table.route(Kind.CANCEL, b"s1", b"r1", b"client", 0.0)
    assert (cancel.action, cancel.worker) == (Action.DELIVER, first.worker)
    # Tokens do not end the turn; the terminal does.
    assert table.on_reply(first.worker, Kind.TOKEN, b"s1", b"r1", b"client", 0.0) is not None
    assert b"s1" in table.in_flight
    end(table, b"s1", b"r1")
    assert turn(table, b"s1", b"r2").action is Action.DELIVER


def not_in_flight(r: Route) -> bool:
    return (r.action, r.code, r.worker) == (Action.REJECT, ErrorCode.NOT_IN_FLIGHT, b"")


def test_cancel_of_a_request_not_in_flight_is_answered(table: RoutingTable) -> None:
    first = turn(table, b"s1", b"r1")
    before = snapshot(table)
    # Another request id of a session whose turn runs, and a session nobody has.
    assert not_in_flight(table.route(Kind.CANCEL, b"s1", b"other", b"client", 0.0))
    assert not_in_flight(table.route(Kind.CANCEL, b"s9", b"r1", b"client", 0.0))
    assert snapshot(table) == before  # the running turn goes on; s9 was not created
    assert table.owner(b"s9") is None and table.principal(b"s9") is None
    # The turn's END went out before the CANCEL came (they raced): answered, nothing changes.
    end(table, b"s1", b"r1")
    before = snapshot(table)
    assert not_in_flight(table.route(Kind.CANCEL, b"s1", b"r1", b"client", 0.0))
    assert snapshot(table) == before
    assert turn(table, b"s1", b"r2").worker == first.worker
    # A request in flight at a broker that restarted since: this table never saw it.
    fresh = RoutingTable(EXPIRY)
    assert not_in_flight(fresh.route(Kind.CANCEL, b"s1", b"r1", b"client", 0.0))
    assert not fresh.pins and not fresh.in_flight


def test_cancel_answers_leak_nothing_to_a_stranger(table: RoutingTable) -> None:
    # A stranger gets not_owner whether the owner's request is in flight or not, and whatever
    # request id it names; not_in_flight only for a session nobody owns (its own ids echoed).
    turn(table, b"s1", b"r1")
    for rid in (b"r1", b"other"):
        r = table.route(Kind.CANCEL, b"s1", rid, b"stranger", 0.0)
        assert r.code is ErrorCode.NOT_OWNER, rid
    end(table, b"s1", b"r1")
    for rid in (b"r1", b"other"):
        assert table.route(Kind.CANCEL, b"s1", rid, b"stranger", 0.0).code is ErrorCode.NOT_OWNER
    # A lost worker's sessions stay their owner's: a stranger still gets not_owner.
    lost_on = table.owner(b"s1")
    assert lost_on is not None
    table.remove(lost_on.key, LostReason.EXITED)
    assert table.route(Kind.CANCEL, b"s1", b"r1", b"stranger", 0.0).code is ErrorCode.NOT_OWNER
    assert not_in_flight(table.route(Kind.CANCEL, b"s1", b"r1", b"client", 0.0))
    assert table.is_lost(b"s1") and table.principal(b"s1") == b"client"  # CANCEL forgot nothing
    assert not_in_flight(table.route(Kind.CANCEL, b"free", b"r1", b"stranger", 0.0))
    assert table.principal(b"free") is None


def test_stale_and_foreign_replies_are_refused(table: RoutingTable) -> None:
    r = turn(table, b"s1", b"r1")
    other = b"B" if r.worker == b"A" else b"A"
    assert table.on_reply(other, Kind.END, b"s1", b"r1", b"client", 0.0) is None
    assert table.on_reply(r.worker, Kind.END, b"s1", b"r0", b"client", 0.0) is None
    assert table.on_reply(r.worker, Kind.END, b"s1", b"r1", b"someone", 0.0) is None
    assert table.on_reply(b"ghost", Kind.END, b"s1", b"r1", b"client", 0.0) is None
    assert b"s1" in table.in_flight


def test_no_worker() -> None:
    t = RoutingTable(EXPIRY)
    r = turn(t, b"s1")
    assert (r.action, r.code) == (Action.REJECT, ErrorCode.NO_WORKER)
    assert not t.pins and not t.in_flight


def test_reset_and_close(table: RoutingTable) -> None:
    # Unpinned: the broker answers itself.
    assert table.route(Kind.RESET, b"new", b"r", b"c", 0.0).kind is Kind.RESET_OK
    assert table.route(Kind.CLOSE, b"new", b"r", b"c", 0.0).kind is Kind.CLOSE_OK
    assert b"new" not in table.pins
    # Pinned: forwarded to the owner; CLOSE_OK unpins, RESET_OK keeps the pin.
    owner = turn(table, b"s1").worker
    end(table, b"s1")
    reset = table.route(Kind.RESET, b"s1", b"r2", b"client", 0.0)
    assert (reset.action, reset.worker) == (Action.DELIVER, owner)
    end(table, b"s1", b"r2", Kind.RESET_OK)
    assert table.owner(b"s1") is not None
    close = table.route(Kind.CLOSE, b"s1", b"r3", b"client", 0.0)
    assert close.worker == owner
    end(table, b"s1", b"r3", Kind.CLOSE_OK)
    assert table.owner(b"s1") is None
    assert all(b"s1" not in w.sessions for w in table.workers.values())


def test_liveness_expiry(table: RoutingTable) -> None:
    r = turn(table, b"s1", b"r1", now=0.0)
    table.touch(b"A" if r.worker == b"B" else b"B", 2.0)
    table.on_reply(r.worker, Kind.TOKEN, b"s1", b"r1", b"client", 1.0)  # traffic counts
    assert table.expire(1.0 + EXPIRY) == []
    lost = table.expire(1.0 + EXPIRY + 0.01)
    assert [lw.worker.key for lw in lost] == [r.worker]
    assert lost[0].reason is LostReason.HEARTBEAT_TIMEOUT
    assert [(f.session_id, f.request_id) for f in lost[0].in_flight] == [(b"s1", b"r1")]
    assert lost[0].sessions == (b"s1",)
    assert r.worker not in table.workers and not table.in_flight


def test_worker_lost_flag_follows_the_session(table: RoutingTable) -> None:
    first = turn(table, b"s1", b"r1")
    turn(table, b"s2", b"r1")
    end(table, b"s2", b"r1")  # s2 idle on the other worker
    lost = table.remove(first.worker, LostReason.EXITED)
    assert lost is not None and lost.sessions == (b"s1",)
    assert table.is_lost(b"s1") and not table.is_lost(b"s2")
    # The retry lands on the survivor with the flag, which stays until a turn ENDs there.
    retry = turn(table, b"s1", b"r2")
    assert retry.worker != first.worker and retry.flags == FLAG_WORKER_LOST
    end(table, b"s1", b"r2", Kind.OVERFLOW)
    again = turn(table, b"s1", b"r3")
    assert again.flags == FLAG_WORKER_LOST
    end(table, b"s1", b"r3")
    assert turn(table, b"s1", b"r4").flags == 0


def test_reset_forgets_lost_mark(table: RoutingTable) -> None:
    r = turn(table, b"s1")
    end(table, b"s1")
    table.remove(r.worker, LostReason.DISCONNECTED)
    assert table.route(Kind.RESET, b"s1", b"r", b"client", 0.0).kind is Kind.RESET_OK
    assert turn(table, b"s1").flags == 0


def test_lost_memory_is_bounded() -> None:
    t = RoutingTable(EXPIRY, lost_memory=2)
    t.register(b"A", ready("a"), 0.0)
    for s in (b"s1", b"s2", b"s3"):
        turn(t, s)
        end(t, s)
    t.remove(b"A", LostReason.EXITED)
    assert sum(t.is_lost(s) for s in (b"s1", b"s2", b"s3")) == 2


def test_restart_with_new_epoch(table: RoutingTable) -> None:
    r = turn(table, b"s1", b"r1")
    name = table.workers[r.worker].worker_id
    # Same key, same epoch: a retransmitted READY changes nothing.
    assert table.register(r.worker, ready(name, epoch=1), 1.0) == Registration()
    assert b"s1" in table.in_flight
    # Same id, new epoch, new connection while the old one is connected and heard from: refused.
    refused = table.register(b"A2", ready(name, epoch=2), 2.0)
    assert refused.refused and not refused.lost
    assert table.worker_key(name) == r.worker and b"s1" in table.in_flight
    # The old connection is gone (the adapter asked ZeroMQ): the old incarnation is lost.
    lost = table.register(b"A2", ready(name, epoch=2), 2.0, other_connected=False).lost
    assert [lw.reason for lw in lost] == [LostReason.RESTARTED]
    assert lost[0].worker.key == r.worker and len(lost[0].in_flight) == 1
    assert table.worker_key(name) == b"A2" and r.worker not in table.workers
    assert table.workers[b"A2"].epoch == 2 and not table.workers[b"A2"].sessions
    # Same key, new epoch (the worker re-sent READY after DISCONNECT on the same socket).
    lost = table.register(b"A2", ready(name, epoch=3), 3.0).lost
    assert [lw.worker.epoch for lw in lost] == [2]
    assert table.workers[b"A2"].epoch == 3


def test_abort_and_orphan(table: RoutingTable) -> None:
    r = turn(table, b"s1", b"r0")
    end(table, b"s1", b"r0")
    turn(table, b"s1", b"r1")  # a later turn: its pin outlives an undelivered request
    table.abort(b"s1")
    assert b"s1" not in table.in_flight and table.owner(b"s1") is not None
    assert not table.workers[r.worker].turns
    turn(table, b"s1", b"r2")
    fl = table.orphan(b"s1", Orphan.CLIENT_GONE)
    assert fl is not None and fl.orphaned is Orphan.CLIENT_GONE
    assert table.orphan(b"s1", Orphan.SLOW_CLIENT) is None  # cancel only once
    assert table.route(Kind.CANCEL, b"s1", b"r2", b"client", 0.0).action is Action.DROP
    end(table, b"s1", b"r2")  # the worker's END (cancelled) still clears it
    assert not table.in_flight


def test_expired_worker_is_not_placed_before_the_sweep() -> None:
    t = RoutingTable(EXPIRY)
    t.register(b"A", ready("a"), 0.0)
    t.register(b"B", ready("b"), 10.0)
    assert turn(t, b"s1", now=10.0).worker == b"B"
    assert turn(t, b"s2", now=10.0).worker == b"B"  # A is past its deadline though not swept


# --- ownership, limits and forgetting --------------------------------------------------------


def snapshot(t: RoutingTable) -> tuple[object, ...]:
    """Everything a rejected request must leave as it was."""
    return (
        {s: (p.worker, p.principal, p.lost) for s, p in t.pins.items()},
        dict(t.in_flight),
        dict(t.sessions_of.counts),
        dict(t.requests_of.counts),
        {k: (set(w.sessions), set(w.turns)) for k, w in t.workers.items()},
    )


def test_only_the_owner_drives_a_session(table: RoutingTable) -> None:
    first = turn(table, b"s1", b"r1")  # created by b"client", in flight
    before = snapshot(table)
    for kind in (Kind.TURN, Kind.RESET, Kind.CLOSE, Kind.CANCEL):
        r = table.route(kind, b"s1", b"r1", b"stranger", 0.0)
        assert (r.action, r.code) == (Action.REJECT, ErrorCode.NOT_OWNER), kind  # not BUSY
    assert snapshot(table) == before
    assert table.principal(b"s1") == b"client"
    end(table, b"s1", b"r1")
    before = snapshot(table)
    for kind in (Kind.TURN, Kind.RESET, Kind.CLOSE, Kind.CANCEL):  # idle: same answer
        assert table.route(kind, b"s1", b"r2", b"stranger", 0.0).code is ErrorCode.NOT_OWNER
    assert snapshot(table) == before
    assert turn(table, b"s1", b"r3").worker == first.worker  # the owner still can


def test_principal_is_the_key_not_the_connection(table: RoutingTable) -> None:
    # Under CURVE two connections (routing ids) with the same key are one owner.
    r = table.route(Kind.TURN, b"s1", b"r1", b"conn-1", 0.0, principal=b"KEY")
    assert r.action is Action.DELIVER
    assert table.on_reply(r.worker, Kind.END, b"s1", b"r1", b"conn-1", 0.0) is not None
    again = table.route(Kind.TURN, b"s1", b"r2", b"conn-2", 0.0, principal=b"KEY")
    assert (again.action, again.worker) == (Action.DELIVER, r.worker)
    cancel = table.route(Kind.CANCEL, b"s1", b"r2", b"conn-3", 0.0, principal=b"KEY")
    assert cancel.action is Action.DELIVER
    other = table.route(Kind.TURN, b"s1", b"r3", b"conn-2", 0.0, principal=b"OTHER")
    assert other.code is ErrorCode.NOT_OWNER
    # Without the key, the connection that created the session is a stranger to it.
    assert table.route(Kind.CANCEL, b"s1", b"r2", b"conn-1", 0.0).code is ErrorCode.NOT_OWNER


def test_ownership_survives_worker_loss(table: RoutingTable) -> None:
    r = turn(table, b"s1")
    end(table, b"s1")
    table.remove(r.worker, LostReason.EXITED)
    assert table.principal(b"s1") == b"client" and not table.pins
    assert table.route(Kind.TURN, b"s1", b"r", b"stranger", 0.0).code is ErrorCode.NOT_OWNER
    assert table.route(Kind.RESET, b"s1", b"r", b"stranger", 0.0).code is ErrorCode.NOT_OWNER
    assert table.is_lost(b"s1")  # the stranger's attempts changed nothing
    retry = turn(table, b"s1", b"r2")
    assert retry.action is Action.DELIVER and retry.flags == FLAG_WORKER_LOST


def test_close_frees_the_session_id(table: RoutingTable) -> None:
    turn(table, b"s1")
    end(table, b"s1")
    assert table.route(Kind.CLOSE, b"s1", b"r2", b"client", 0.0).action is Action.DELIVER
    end(table, b"s1", b"r2", Kind.CLOSE_OK)
    assert table.principal(b"s1") is None
    r = table.route(Kind.TURN, b"s1", b"r3", b"newcomer", 0.0)
    assert r.action is Action.DELIVER and table.principal(b"s1") == b"newcomer"


def test_session_limit_per_client() -> None:
    t = RoutingTable(EXPIRY, max_sessions_per_client=2)
    t.register(b"A", ready("a"), 0.0)
    for s in (b"s1", b"s2"):
        turn(t, s)
        end(t, s)
    before = snapshot(t)
    r = turn(t, b"s3")
    assert (r.action, r.code) == (Action.REJECT, ErrorCode.LIMIT)
    assert "2 sessions (limit 2)" in r.message
    assert snapshot(t) == before and t.principal(b"s3") is None
    assert turn(t, b"s1").action is Action.DELIVER  # existing sessions go on
    end(t, b"s1")
    assert t.route(Kind.TURN, b"s3", b"r", b"other-client", 0.0).action is Action.DELIVER
    # Closing one makes room; so does losing the worker (the lost ones no longer count).
    t.route(Kind.CLOSE, b"s2", b"r", b"client", 0.0)
    end(t, b"s2", b"r", Kind.CLOSE_OK)
    assert turn(t, b"s3b").action is Action.DELIVER
    assert turn(t, b"s4").code is ErrorCode.LIMIT
    end(t, b"s3b")
    t.remove(b"A", LostReason.EXITED)
    assert not t.sessions_of.counts and not t.requests_of.counts


def test_requests_in_flight_limit_per_client() -> None:
    t = RoutingTable(EXPIRY, max_requests_per_client=2)
    t.register(b"A", ready("a"), 0.0)
    turn(t, b"s0")
    end(t, b"s0")
    turn(t, b"s1")
    turn(t, b"s2")
    before = snapshot(t)
    for kind, sid in ((Kind.TURN, b"s3"), (Kind.TURN, b"s0"), (Kind.CLOSE, b"s0")):
        r = t.route(kind, sid, b"r", b"client", 0.0)  # a new session, and a pinned idle one
        assert (r.action, r.code) == (Action.REJECT, ErrorCode.LIMIT), (kind, sid)
        assert "2 requests in flight (limit 2)" in r.message
    assert snapshot(t) == before
    assert t.route(Kind.TURN, b"x", b"r", b"other-client", 0.0).action is Action.DELIVER
    assert t.on_reply(b"A", Kind.END, b"x", b"r", b"other-client", 0.0) is not None
    end(t, b"s2")
    assert t.route(Kind.RESET, b"s2", b"r2", b"client", 0.0).action is Action.DELIVER
    assert t.route(Kind.RESET, b"s9", b"r", b"client", 0.0).kind is Kind.RESET_OK  # broker's own
    assert t.route(Kind.CANCEL, b"s1", b"r", b"client", 0.0).action is Action.DELIVER
    assert turn(t, b"s5").code is ErrorCode.LIMIT
    # A delivery that could not be sent gives its slot back, as do a terminal and a loss.
    t.abort(b"s2")
    assert turn(t, b"s5").action is Action.DELIVER
    t.remove(b"A", LostReason.EXITED)
    assert not t.requests_of.counts and not t.sessions_of.counts


def test_sweep_forgets_idle_pins_after_the_ttl() -> None:
    t = RoutingTable(1000.0, pin_ttl_s=10.0)  # (a long expiry: the worker stays live)
    t.register(b"A", ready("a"), 0.0)
    for s, now in ((b"old", 0.0), (b"busy", 1.0), (b"new", 5.0)):
        turn(t, s, now=now)
        if s != b"busy":
            end(t, s)
    assert t.sweep(10.0) == []
    forgotten = t.sweep(12.0)  # old idle for 12 s; busy older but in flight; new idle for 7 s
    assert [(f.session_id, f.worker) for f in forgotten] == [(b"old", b"A")]
    assert t.owner(b"old") is None and t.principal(b"old") is None
    assert b"old" not in t.workers[b"A"].sessions
    assert t.sessions_of[b"client"] == 2
    # The id is free: whoever creates it next owns it, as a new session.
    r = t.route(Kind.TURN, b"old", b"r", b"someone-else", 12.0)
    assert r.action is Action.DELIVER and r.flags == 0
    # A pin with a request in flight counts as used when the sweep meets it.
    end(t, b"busy")
    assert [f.session_id for f in t.sweep(20.0)] == [b"new"]
    assert t.owner(b"busy") is not None
    assert [f.session_id for f in t.sweep(22.1)] == [b"busy"]


def test_sweep_keeps_at_most_max_pins_least_recently_used_first() -> None:
    t = RoutingTable(1000.0, max_pins=2)
    t.register(b"A", ready("a"), 0.0)
    for i, s in enumerate((b"s1", b"s2", b"s3")):
        turn(t, s, now=float(i))
        end(t, s)
    turn(t, b"s1", now=5.0)  # s1 used again: now s2 is the least recently used
    end(t, b"s1")
    assert [f.session_id for f in t.sweep(6.0)] == [b"s2"]
    assert list(t.pins) == [b"s3", b"s1"] and t.sweep(7.0) == []
    turn(t, b"s4", now=8.0)  # in flight: never forgotten, even over the count
    turn(t, b"s3", now=9.0)
    assert [f.session_id for f in t.sweep(9.0)] == [b"s1"]
    assert set(t.pins) == {b"s3", b"s4"}


# --- registration: a worker id is not for the taking; announced sessions ------------------------


def resident(
    sid: bytes, owner: bytes = b"client", turn_ns: int = 100, idle_ms: float = 0.0
) -> Resident:
    return Resident(sid, owner, 1000, idle_ms, turn_ns)


def test_a_live_worker_id_cannot_be_claimed(table: RoutingTable) -> None:
    r = turn(table, b"s1")
    end(table, b"s1")
    owner = table.workers[r.worker]
    before = snapshot(table)
    claim = ready(owner.worker_id, epoch=9, sessions=(resident(b"s1"),))
    reg = table.register(b"IMPOSTOR", claim, 1.0)
    assert reg.refused and "another live connection" in reg.refused
    assert reg.lost == () and reg.drops == () and reg.repinned == 0
    assert snapshot(table) == before and b"IMPOSTOR" not in table.workers
    assert table.worker_key(owner.worker_id) == r.worker and turn(table, b"s1").worker == r.worker
    end(table, b"s1")
    # Silent past the expiry, the registration is as good as lost: a restart may take the id.
    table.touch(b"A" if r.worker == b"B" else b"B", EXPIRY + 1.0)
    reg = table.register(b"NEW", ready(owner.worker_id, epoch=10), EXPIRY + 1.0)
    assert not reg.refused and [lw.reason for lw in reg.lost] == [LostReason.RESTARTED]
    assert table.worker_key(owner.worker_id) == b"NEW"


def test_announced_sessions_are_pinned_with_their_owners() -> None:
    t = RoutingTable(EXPIRY)  # a broker that just started: it knows nothing
    sessions = (resident(b"s1", b"alice"), resident(b"s2", b"bob", idle_ms=500.0))
    reg = t.register(b"A", ready("a", sessions=sessions), 10.0)
    assert (reg.repinned, reg.drops, reg.lost, reg.refused) == (2, (), (), "")
    assert t.principal(b"s1") == b"alice" and t.principal(b"s2") == b"bob"
    assert t.workers[b"A"].sessions == {b"s1", b"s2"} and t.workers[b"A"].kv_bytes == 2000
    assert t.pins[b"s2"].last_used == pytest.approx(9.5)
    assert (t.sessions_of[b"alice"], t.sessions_of[b"bob"]) == (1, 1)
    t.register(b"B", ready("b"), 10.0)  # an empty worker would win a new placement
    r = t.route(Kind.TURN, b"s1", b"r", b"alice", 10.0)
    assert (r.action, r.worker, r.flags) == (Action.DELIVER, b"A", 0)  # sticky, not worker_lost
    stranger = t.route(Kind.TURN, b"s2", b"r", b"alice", 10.0)
    assert stranger.code is ErrorCode.NOT_OWNER


def test_the_newest_announced_turn_wins() -> None:
    t = RoutingTable(EXPIRY)
    t.register(b"A", ready("a", sessions=(resident(b"s", turn_ns=100),)), 0.0)
    reg = t.register(b"B", ready("b", sessions=(resident(b"s", turn_ns=200),)), 0.0)
    assert reg.repinned == 1 and [(f.session_id, f.worker) for f in reg.drops] == [(b"s", b"A")]
    assert t.pins[b"s"].worker == b"B" and b"s" not in t.workers[b"A"].sessions
    reg = t.register(b"C", ready("c", sessions=(resident(b"s", turn_ns=150),)), 0.0)
    assert reg.repinned == 0 and [(f.session_id, f.worker) for f in reg.drops] == [(b"s", b"C")]
    assert t.pins[b"s"].worker == b"B" and t.sessions_of[b"client"] == 1


def test_a_routed_pin_beats_any_announcement() -> None:
    t = RoutingTable(EXPIRY)
    t.register(b"A", ready("a", sessions=(resident(b"s", turn_ns=100),)), 0.0)
    assert turn(t, b"s").worker == b"A"
    end(t, b"s")
    # B's turn is later by its clock, but it ran before B registered with this broker, which
    # has routed a turn since: that one is the newest.
    reg = t.register(b"B", ready("b", sessions=(resident(b"s", turn_ns=10**18),)), 1.0)
    assert [(f.session_id, f.worker) for f in reg.drops] == [(b"s", b"B")]
    assert t.pins[b"s"].worker == b"A"


def test_an_announcement_never_changes_an_owner() -> None:
    t = RoutingTable(EXPIRY)
    t.register(b"A", ready("a"), 0.0)
    turn(t, b"s1")
    end(t, b"s1")
    t.remove(b"A", LostReason.EXITED)  # s1 remembered as the client's
    sessions = (
        resident(b"s1", owner=b"mallory"),  # known under another owner
        resident(b"gen", owner=b"\x00\x01\x02\x03\x04"),  # an id ZeroMQ made for another broker
        resident(b"ok", owner=b"carol"),
    )
    reg = t.register(b"B", ready("b", sessions=sessions), 1.0)
    assert sorted(f.session_id for f in reg.drops) == [b"gen", b"s1"]
    assert all(f.worker == b"B" for f in reg.drops) and reg.repinned == 1
    assert t.principal(b"s1") == b"client" and t.is_lost(b"s1")
    assert t.principal(b"gen") is None and t.principal(b"ok") == b"carol"
    # A generated id this very broker remembers is fine: its owner may still be connected.
    t.register(b"C", ready("c"), 1.0)
    r = t.route(Kind.TURN, b"g2", b"r", b"\x00\x09\x09\x09\x09", 1.0)
    t.on_reply(r.worker, Kind.END, b"g2", b"r", b"\x00\x09\x09\x09\x09", 1.0)
    t.remove(r.worker, LostReason.EXITED)
    again = (resident(b"g2", owner=b"\x00\x09\x09\x09\x09"),)
    assert t.register(b"D", ready("d", sessions=again), 2.0).repinned == 1


def test_a_worker_declared_lost_gets_its_sessions_back() -> None:
    t = RoutingTable(EXPIRY)
    t.register(b"A", ready("a"), 0.0)
    t.register(b"B", ready("b"), 0.0)
    for sid in (b"s1", b"s2"):
        t.route(Kind.TURN, sid, b"r", b"client", 0.0, principal=b"KEY")
        t.on_reply(t.in_flight[sid].worker, Kind.END, sid, b"r", b"client", 0.0)
    on_a = sorted(t.workers[b"A"].sessions)
    t.touch(b"B", 10.0)
    assert [lw.worker.key for lw in t.expire(10.0)] == [b"A"]  # hung, not dead
    assert all(t.is_lost(s) for s in on_a)
    # It wakes up, reconnects (new routing id, new epoch) and announces what it holds.
    back = tuple(resident(s, owner=b"KEY", turn_ns=1) for s in on_a)
    reg = t.register(b"A2", ready("a", epoch=2, sessions=back), 10.5)
    assert reg.repinned == len(on_a) and not reg.drops
    for s in on_a:
        r = t.route(Kind.TURN, s, b"r2", b"other-conn", 10.5, principal=b"KEY")
        assert (r.worker, r.flags) == (b"A2", 0)  # warm again, no worker_lost flag


def test_announced_pins_keep_the_lru_order_and_the_limits() -> None:
    t = RoutingTable(1000.0, max_sessions_per_client=2, pin_ttl_s=10.0)
    t.register(b"A", ready("a"), 0.0)
    turn(t, b"fresh", now=95.0)
    end(t, b"fresh")
    sessions = (
        resident(b"old", idle_ms=20_000.0),  # last used at 80: past the TTL at 95
        resident(b"recent", owner=b"other", idle_ms=1_000.0),  # used at 99
        resident(b"over", idle_ms=0.0),  # the client's third session: over its limit
    )
    reg = t.register(b"B", ready("b", sessions=sessions), 100.0)
    assert [f.session_id for f in reg.drops] == [b"over"] and reg.repinned == 2
    assert list(t.pins) == [b"old", b"fresh", b"recent"]  # ordered by last use
    assert [f.session_id for f in t.sweep(100.0)] == [b"old"]
    assert [f.session_id for f in t.sweep(106.0)] == [b"fresh"]
    assert list(t.pins) == [b"recent"]


# --- a TURN refused before it ran leaves no pin behind -----------------------------------------

OVERFLOW_BODY = Overflow(prompt_tokens=2000, max_tokens=100, n_ctx=2048).encode()
REFUSED = [
    (Kind.OVERFLOW, OVERFLOW_BODY),
    *((Kind.ERROR, error_body(code, "refused")) for code in sorted(REFUSED_UNRUN)),
]
REFUSED_IDS = ["overflow", *sorted(REFUSED_UNRUN)]


def reply(t: RoutingTable, session: bytes, request: bytes, kind: Kind, body: bytes) -> None:
    worker = t.in_flight[session].worker
    assert t.on_reply(worker, kind, session, request, b"client", 0.0, body) is not None


@pytest.mark.parametrize(("kind", "body"), REFUSED, ids=REFUSED_IDS)
def test_a_refused_first_turn_drops_its_pin(kind: Kind, body: bytes) -> None:
    t = RoutingTable(EXPIRY, max_sessions_per_client=1)
    t.register(b"A", ready("a"), 0.0)
    t.register(b"B", ready("b"), 0.0)
    assert turn(t, b"s1", b"r1").worker == b"A"  # a tie: registration order
    reply(t, b"s1", b"r1", kind, body)
    assert not t.pins and not t.in_flight
    assert not t.sessions_of.counts and not t.requests_of.counts
    assert all(not w.sessions and not w.turns for w in t.workers.values())
    assert t.principal(b"s1") is None and not t.is_lost(b"s1")
    # Placed anew: another client's turn runs on A now, so the retry goes to B (it would have
    # stuck to A), and it fits the limit of one session.
    assert t.route(Kind.TURN, b"y", b"ry", b"other", 0.0).worker == b"A"
    retry = turn(t, b"s1", b"r2")
    assert (retry.action, retry.worker, retry.flags) == (Action.DELIVER, b"B", 0)
    assert t.principal(b"s1") == b"client" and t.sessions_of[b"client"] == 1
    # A refused later turn keeps the pin: the worker holds the session's earlier turns.
    end(t, b"s1", b"r2")
    turn(t, b"s1", b"r3")
    reply(t, b"s1", b"r3", kind, body)
    assert t.owner(b"s1") is t.workers[b"B"] and t.sessions_of[b"client"] == 1
    assert turn(t, b"s1", b"r4").worker == b"B"


@pytest.mark.parametrize(("kind", "body"), REFUSED, ids=REFUSED_IDS)
def test_a_refused_first_turn_frees_the_id_and_the_session_count(kind: Kind, body: bytes) -> None:
    t = RoutingTable(EXPIRY, max_sessions_per_client=1)
    t.register(b"A", ready("a"), 0.0)
    for n in range(3):  # a client retrying with new ids never reaches its limit
        sid = b"new-%d" % n
        assert turn(t, sid).action is Action.DELIVER
        reply(t, sid, b"r", kind, body)
    assert turn(t, b"kept").action is Action.DELIVER
    end(t, b"kept")
    assert turn(t, b"one-too-many").code is ErrorCode.LIMIT  # the limit itself still holds
    # A refused id belongs to nobody: whoever sends the next TURN owns it.
    stranger = t.route(Kind.TURN, b"new-0", b"r", b"stranger", 0.0)
    assert stranger.action is Action.DELIVER and t.principal(b"new-0") == b"stranger"


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (Kind.ERROR, error_body(ErrorCode.INTERNAL, "the turn may still run")),
        (Kind.ERROR, error_body(ErrorCode.SHUTTING_DOWN, "not a refusal we know")),
        (Kind.ERROR, b"\xc1 not msgpack"),
        (Kind.ERROR, b""),
        (Kind.BUSY, b"\x80"),  # the worker has a turn for this id
        (Kind.END, b"\x80"),
    ],
    ids=["internal", "shutting_down", "garbage", "no-body", "busy", "end"],
)
def test_other_terminals_of_a_first_turn_keep_its_pin(kind: Kind, body: bytes) -> None:
    t = RoutingTable(EXPIRY)
    t.register(b"A", ready("a"), 0.0)
    turn(t, b"s1", b"r1")
    reply(t, b"s1", b"r1", kind, body)
    assert t.owner(b"s1") is t.workers[b"A"] and t.sessions_of[b"client"] == 1
    assert not t.in_flight and not t.requests_of.counts


def test_a_refused_first_turn_on_a_lost_session_keeps_its_owner_and_flag(
    table: RoutingTable,
) -> None:
    first = turn(table, b"s1", b"r1")
    end(table, b"s1", b"r1")
    table.remove(first.worker, LostReason.EXITED)
    retry = turn(table, b"s1", b"r2")  # creates a pin on the survivor, flagged
    assert retry.flags == FLAG_WORKER_LOST
    reply(table, b"s1", b"r2", Kind.ERROR, error_body(ErrorCode.OVERLOADED, "queue full"))
    assert not table.pins and not table.sessions_of.counts
    # Back to how it was before that TURN: remembered as lost, with its owner.
    assert table.principal(b"s1") == b"client" and table.is_lost(b"s1")
    assert table.route(Kind.TURN, b"s1", b"r", b"stranger", 0.0).code is ErrorCode.NOT_OWNER
    again = turn(table, b"s1", b"r3")
    assert (again.action, again.flags) == (Action.DELIVER, FLAG_WORKER_LOST)


def test_an_undelivered_first_turn_drops_its_pin() -> None:
    # The worker's queue was full (the adapter answers ERROR overloaded): it never saw the id.
    t = RoutingTable(EXPIRY, max_sessions_per_client=1)
    t.register(b"A", ready("a"), 0.0)
    turn(t, b"s1", b"r1")
    t.abort(b"s1")
    assert not t.pins and not t.in_flight and not t.sessions_of.counts
    assert not t.workers[b"A"].sessions and t.principal(b"s1") is None
    assert turn(t, b"s2").action is Action.DELIVER  # within the limit of one
