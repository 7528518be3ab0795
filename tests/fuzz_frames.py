"""Seeded generators of hostile messages for both broker hops, each with the answer it must get.

:class:`FrontendFuzzer` makes cases for a client DEALER on the frontend (one or more messages:
malformed frames and headers, mutated TURN bodies, the attacker's own sessions driven through
RESET / CANCEL / CLOSE, pipelined turns); :class:`BackendFuzzer` makes messages for a DEALER on
the backend that pretends to be a worker but never registers. Values come from
:mod:`fuzz_values`, answers from :mod:`fuzz_oracle`. Nothing here touches a socket.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fuzz_oracle import (
    TURN_RAN,
    Expect,
    cancel_racing_end,
    error,
    expect_backend,
    expect_frontend,
)
from fuzz_values import (
    BAD_READY,
    Rand,
    msgpack_garbage,
    mutate_turn,
    pack,
    valid_ready,
    valid_turn_map,
)

from kvroute.proto import EMPTY_BODY, ErrorCode, Heartbeat, Kind, ProtocolViolation, Ready
from kvroute.proto import limits as L
from kvroute.proto.kinds import CLIENT_KINDS, HEADERS, REPLY_KINDS, WORKER_CONTROL_KINDS

E = ErrorCode
SESSION_POOL = 64  # session ids the frontend attacker draws from (its lifecycle cases CLOSE them)
HONEST_PREFIX = b"honest"
"""Session ids of the honest sessions start with this, and the fuzzer never uses them: what a
stranger may do to another client's session is session ownership (test_broker_access.py); here
the honest sessions must come out exactly as without the fuzz."""


# --- frontend cases -------------------------------------------------------------------------


@dataclass
class Request:
    """One message of a case, and the answer it must get. With ``wait``, the driver first
    collects the answers of the requests before it (else they are sent back to back)."""

    frames: list[bytes]
    expect: Expect
    wait: bool = False


@dataclass
class Case:
    """A fuzz case: one or more messages sent back to back by the attacker."""

    category: str
    requests: list[Request] = field(default_factory=list)


class FrontendFuzzer:
    """Cases for a client DEALER on the broker's frontend. Request ids are unique per fuzzer."""

    def __init__(self, seed: int) -> None:
        self.r = Rand(random.Random(seed))
        self._n = 0

    def rid(self) -> bytes:
        self._n += 1
        return b"f%x" % self._n

    def sid(self) -> bytes:
        """A session id of the attacker's: odd ones sometimes, else one of a small pool, so
        that turns also land on sessions with history (and the attacker stays far below the
        broker's sessions-per-client limit)."""
        if self.r.chance(0.1):
            return self.r.pick([b"\xff\xfe\x00", b"s" * 64, b"\x00", "sé".encode()])
        return b"fz-%d" % self.r.rng.randrange(SESSION_POOL)

    def case(self) -> Case:
        """The next case (categories weighted towards what reaches the worker)."""
        k = self.r.rng.randrange(100)
        if k < 35:
            return self._turn_body()
        if k < 45:
            return self._frame_counts()
        if k < 60:
            return self._headers()
        if k < 70:
            return self._routing_frames()
        if k < 80:
            return self._random_frames()
        if k < 88:
            return self._control_kinds()
        if k < 94:
            return self._lifecycle()
        return self._pipelined()

    def one(self, category: str, frames: list[bytes]) -> Case:
        return Case(category, [Request(frames, expect_frontend(frames))])

    def _turn_body(self) -> Case:
        category, body, code = mutate_turn(self.r, valid_turn_map(self.r))
        frames = [HEADERS[Kind.TURN], self.sid(), self.rid(), body]
        expect = expect_frontend(frames)
        # The mutation's own claim and the oracle must agree (else the oracle is wrong).
        claimed = error(code, echo=frames[2]) if code else Expect(TURN_RAN, echo=frames[2])
        assert expect == claimed, (category, expect, claimed)
        return Case(f"turn:{category}", [Request(frames, expect)])

    def _frame_counts(self) -> Case:
        good = [HEADERS[Kind.TURN], self.sid(), self.rid(), pack(valid_turn_map(self.r))]
        n = self.r.pick([1, 2, 3, 5, 6, 9])
        frames = (good + [self.r.raw() for _ in range(n)])[:n]
        return self.one(f"frame_count:{n}", frames)

    def _headers(self) -> Case:
        kind = self.r.pick(list(CLIENT_KINDS))
        header = self.r.pick(
            [
                b"",
                b"KVR",
                b"KVR\x01",
                HEADERS[kind] + b"\x00",
                b"XYZ\x01" + bytes([kind]),
                b"kvr\x01" + bytes([kind]),
                b"KVR" + bytes([self.r.pick([0, 2, 9, 255]), kind]),
                b"KVR\x01" + bytes([self.r.pick([0x00, 0x06, 0x0F, 0x19, 0x23, 0x7F, 0xFF])]),
                HEADERS[self.r.pick([k for k in Kind if k not in CLIENT_KINDS])],
            ]
        )
        return self.one("header", [header, self.sid(), self.rid(), EMPTY_BODY])

    def _routing_frames(self) -> Case:
        kind = self.r.pick([Kind.TURN, Kind.RESET, Kind.CLOSE, Kind.PING, Kind.CANCEL])
        sid, rid = self.sid(), self.rid()
        body = pack(valid_turn_map(self.r)) if kind is Kind.TURN else EMPTY_BODY
        j = self.r.rng.randrange(6)
        if j == 0:
            sid = b""
        elif j == 1:
            sid = b"s" * (L.MAX_SESSION_ID_BYTES + 1)
        elif j == 2:
            rid = b""
        elif j == 3:
            rid = b"r" * (L.MAX_REQUEST_ID_BYTES + 1)
        elif j == 4:
            body = b"\x80" + b"\x00" * L.MAX_BODY_BYTES  # just above the 1 MiB body limit
        else:
            body = b""
        return self.one(f"routing:{kind.name}", [HEADERS[kind], sid, rid, body])

    def _random_frames(self) -> Case:
        n = self.r.rng.randint(1, 6)
        frames = [self.r.raw() for _ in range(n)]
        if self.r.chance(0.6):
            frames[0] = HEADERS[self.r.pick(list(CLIENT_KINDS))]
        return self.one("random_frames", frames)

    def _control_kinds(self) -> Case:
        kind = self.r.pick(
            [Kind.RESET, Kind.CLOSE, Kind.PING, Kind.CANCEL, Kind.LOOKUP, Kind.INDEX, Kind.STATUS]
        )
        body = EMPTY_BODY if self.r.chance(0.4) else pack(self.r.value())
        if kind in (Kind.LOOKUP, Kind.INDEX) and self.r.chance(0.5):
            body = pack({"digest": self.r.rng.randbytes(self.r.pick([15, 16, 32, 33]))})
        if self.r.chance(0.3):
            body = msgpack_garbage(self.r, EMPTY_BODY)[1]
        sessionless = kind in (Kind.PING, Kind.LOOKUP, Kind.STATUS)
        sid = b"" if sessionless and self.r.chance(0.5) else self.sid()
        frames = [HEADERS[kind], sid, self.rid(), body]
        if self.r.chance(0.3):  # an owner frame: another principal (or a malformed one)
            frames.insert(3, self.r.pick([b"tok-%d" % self.r.rng.randrange(3), b"", b"\x00t"]))
        return self.one(f"control:{kind.name}", frames)

    def _lifecycle(self) -> Case:
        """A session of the attacker's own: TURN, then RESET / CANCEL / CLOSE (forwarded to its
        worker) with empty or garbage bodies."""
        sid = self.sid()
        m = valid_turn_map(self.r)
        m["max_tokens"] = self.r.rng.randint(1, 8)
        turn = [HEADERS[Kind.TURN], sid, self.rid(), pack(m)]
        reqs = [Request(turn, expect_frontend(turn))]
        for kind in (Kind.CANCEL, Kind.RESET, Kind.CLOSE):
            body = EMPTY_BODY if self.r.chance(0.5) else msgpack_garbage(self.r, EMPTY_BODY)[1]
            frames = [HEADERS[kind], sid, self.rid(), body]
            # Each waits for the one before: a RESET while the TURN runs would get BUSY.
            reqs.append(Request(frames, expect_frontend(frames), wait=True))
        return Case("lifecycle", reqs)

    def _pipelined(self) -> Case:
        """Two TURNs on one session back to back (the second is BUSY if the first still runs),
        and a CANCEL of the first: every request still ends with exactly one terminal."""
        sid = self.sid()
        first, second = valid_turn_map(self.r), valid_turn_map(self.r)
        first["max_tokens"] = self.r.rng.randint(16, 120)
        first["messages"] = first["messages"][-1:]
        r1, r2 = self.rid(), self.rid()
        busy_or_ran = Expect(TURN_RAN | {Kind.BUSY}, echo=r2)
        return Case(
            "pipelined",
            [
                Request([HEADERS[Kind.TURN], sid, r1, pack(first)], Expect(TURN_RAN, echo=r1)),
                Request([HEADERS[Kind.TURN], sid, r2, pack(second)], busy_or_ran),
                Request([HEADERS[Kind.CANCEL], sid, r1, EMPTY_BODY], cancel_racing_end(r1)),
            ],
        )


# --- backend cases --------------------------------------------------------------------------


Claim = ErrorCode | None
"""What a generator claims its frames must get: an ERROR code, or None (see the oracle)."""


class BackendFuzzer:
    """Cases for a rogue DEALER on the broker's backend that never registers."""

    def __init__(self, seed: int) -> None:
        self.r = Rand(random.Random(seed))

    def case(self) -> tuple[str, list[bytes], Expect]:
        """(category, frames, expected answer)."""
        gens: list[Callable[[], tuple[str, list[bytes], Claim]]] = [
            self._bad_ready,
            self._bad_ready,
            self._heartbeat,
            self._error_control,
            self._bogus_reply,
            self._bogus_reply,
            self._frame_counts,
            self._headers,
            self._random_frames,
            self._disconnect,
        ]
        while True:
            category, frames, claim = self.r.pick(gens)()
            if _registers(frames):
                continue  # random bytes made a valid READY (never seen; cheap to rule out)
            expect = expect_backend(frames)
            if claim is not None:
                assert expect == error(claim), (category, expect, claim)
            return category, frames, expect

    def _bad_ready(self) -> tuple[str, list[bytes], Claim]:
        m = valid_ready(f"rogue-{self.r.rng.randrange(1000)}", self.r)
        k = self.r.rng.randrange(5)
        if k == 0:
            del m[self.r.pick(list(m))]
            return "ready:missing_field", [HEADERS[Kind.READY], pack(m)], E.BAD_BODY
        if k == 1:
            m["gpu"] = self.r.value()
            return "ready:extra_field", [HEADERS[Kind.READY], pack(m)], E.BAD_BODY
        if k == 2:
            body = msgpack_garbage(self.r, pack(m))[1]
            return "ready:garbage", [HEADERS[Kind.READY], body], E.BAD_BODY
        if k == 3:
            m["worker"] = "MARK"
            body = pack(m).replace(b"\xa4MARK", b"\xa4\xff\xfe\xfd\xfc")
            return "ready:invalid_utf8", [HEADERS[Kind.READY], body], E.BAD_BODY
        name = self.r.pick(list(BAD_READY))
        m[name], code = self.r.pick(BAD_READY[name])
        return "ready:absurd_value", [HEADERS[Kind.READY], pack(m)], code

    def _heartbeat(self) -> tuple[str, list[bytes], Claim]:
        m: dict[str, Any] = {"load": 0, "sessions": 0, "kv_bytes": 0}
        k = self.r.rng.randrange(4)
        if k == 0:
            m[self.r.pick(list(m))], code = self.r.pick(
                [
                    (-1, E.OUT_OF_RANGE),
                    (2**63, E.OUT_OF_RANGE),
                    (1.5, E.BAD_BODY),
                    (None, E.BAD_BODY),
                ]
            )
            return "heartbeat:bad_value", [HEADERS[Kind.HEARTBEAT], pack(m)], code
        if k == 1:
            m["extra"] = 1
            return "heartbeat:extra_field", [HEADERS[Kind.HEARTBEAT], pack(m)], E.BAD_BODY
        if k == 2:
            body = msgpack_garbage(self.r, pack(m))[1]
            return "heartbeat:garbage", [HEADERS[Kind.HEARTBEAT], body], E.BAD_BODY
        return "heartbeat:stranger", [HEADERS[Kind.HEARTBEAT], pack(m)], None  # DISCONNECT

    def _error_control(self) -> tuple[str, list[bytes], Claim]:
        m: dict[str, Any] = {"code": self.r.pick(list(ErrorCode)).value, "message": "m"}
        k = self.r.rng.randrange(4)
        if k == 0:
            m["code"], code = self.r.pick([("nope", E.OUT_OF_RANGE), (3, E.BAD_BODY)])
            return "error:bad_code", [HEADERS[Kind.ERROR], pack(m)], code
        if k == 1:
            m["message"] = "x" * (L.MAX_ERROR_MESSAGE_CHARS + 1)
            return "error:long_message", [HEADERS[Kind.ERROR], pack(m)], E.TOO_LARGE
        if k == 2:
            body = msgpack_garbage(self.r, pack(m))[1]
            return "error:garbage", [HEADERS[Kind.ERROR], body], E.BAD_BODY
        return "error:valid", [HEADERS[Kind.ERROR], pack(m)], None  # logged, not answered

    def _bogus_reply(self) -> tuple[str, list[bytes], Claim]:
        """A reply for a client, session and request nobody forwarded to this peer."""
        kind = self.r.pick(list(REPLY_KINDS))
        client = self.r.pick([b"\x00" + self.r.rng.randbytes(4), b"", self.r.raw(1, 300)])
        sid = self.r.pick([b"honest-0", b"fz-x", b"", b"s" * 65])
        rid = self.r.pick([b"1", b"a", b"", b"r" * 33])
        body = self.r.pick([EMPTY_BODY, self.r.raw(), pack(self.r.value())])
        return f"reply:{kind.name}", [HEADERS[kind], client, sid, rid, body], None

    def _frame_counts(self) -> tuple[str, list[bytes], Claim]:
        n = self.r.pick([1, 3, 4, 6, 7])
        frames = [HEADERS[Kind.HEARTBEAT]] + [self.r.raw() for _ in range(n - 1)]
        return f"frame_count:{n}", frames, E.BAD_FRAME

    def _headers(self) -> tuple[str, list[bytes], Claim]:
        header, code = self.r.pick(
            [
                (b"", E.BAD_FRAME),
                (b"KVR\x02\x20", E.BAD_VERSION),
                (b"KVR\x01\x99", E.UNKNOWN_KIND),
                (b"XXX\x01\x21", E.BAD_FRAME),
                (HEADERS[Kind.TURN], E.UNKNOWN_KIND),  # a client kind from a worker
                (HEADERS[Kind.PONG], E.UNKNOWN_KIND),
            ]
        )
        if self.r.chance(0.5):
            return "header:control", [header, pack(Heartbeat().to_map())], code
        return "header:reply", [header, b"c", b"s", b"r", EMPTY_BODY], code

    def _random_frames(self) -> tuple[str, list[bytes], Claim]:
        frames = [self.r.raw() for _ in range(self.r.rng.randint(1, 6))]
        if self.r.chance(0.5):
            frames[0] = HEADERS[self.r.pick(list(WORKER_CONTROL_KINDS | REPLY_KINDS))]
        return "random_frames", frames, None

    def _disconnect(self) -> tuple[str, list[bytes], Claim]:
        body = self.r.pick([EMPTY_BODY, self.r.raw()])
        return "disconnect", [HEADERS[Kind.DISCONNECT], body], None


def _registers(frames: list[bytes]) -> bool:
    """Whether ``frames`` is a valid READY (which would make the rogue a real worker)."""
    if len(frames) != 2 or frames[0] != HEADERS[Kind.READY]:
        return False
    try:
        Ready.decode(frames[1])
    except ProtocolViolation:
        return False
    return True
