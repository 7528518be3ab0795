"""The worker's session store: per session text T, token ids K and KV cache S (I/O-free).

Sessions are created by one factory (new, reset and re-created-after-eviction all go through
`SessionStore._fresh`) so no path forgets a field. Memory is bounded by a KV budget in bytes:
idle sessions are evicted least-recently-used; a session with a turn in flight never is. A session
that is gone (evicted or reset) is remembered by id so its next turn can say why it runs cold; a
closed one is forgotten entirely, so whoever reuses its id starts ``new``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kvroute.engine.cache import KVCache
from kvroute.engine.kv_codec import RestDtype
from kvroute.proto.messages import ColdReason, KvSource

from .spill import SpillDir, Spilled, SpillInvalid

logger = logging.getLogger(__name__)

REMEMBER_GONE = 100_000  # ids of evicted/reset sessions remembered for their cold reason


@dataclass
class Session:
    """One chat session's committed state (T, K, S) plus bookkeeping.

    Invariant: ``cache.length == len(tokens)`` and ``tokens`` are the ids whose text is
    ``text``. Only the turn verbs change them, and each checks the invariant:

    - `begin` marks a turn in flight that will reuse the first ``keep`` positions; it changes
      nothing else, so a turn cancelled before it feeds the model leaves no trace;
    - `trim_to_keep` drops the positions past ``keep`` right before the turn's first forward
      pass (from then on the cache holds ``keep`` positions plus what the turn fed);
    - `commit` ends the turn with new (T, K), ids the cache already holds;
    - `rollback` ends it without committing: back to the old (T, K) if the cache still holds
      them, else empty.
    """

    session_id: bytes
    cache: KVCache
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    in_flight: bytes | None = None  # request id of the running turn
    cold_reason: ColdReason = ColdReason.NEW  # reported if the next turn finds nothing to reuse
    turns: int = 0  # turns committed
    keep: int = 0  # positions of K the turn in flight reuses
    feeding: bool = False  # the turn in flight has trimmed the cache to ``keep`` and feeds it
    # Announced in READY when the worker registers again (the broker re-pins the session):
    owner: bytes = b""  # the principal the broker gave with the session's last TURN
    last_turn_ns: int = 0  # wall clock (ns) when its last turn was accepted
    kv_from: KvSource = KvSource.HOT  # where the cache's positions came from, while parked
    load_ms: float = 0.0  # time spent reading it back from disk, owed to its next turn's stats

    def check(self) -> None:
        """Assert the session invariant (our own bug if it fails)."""
        if self.feeding:
            assert self.keep <= self.cache.length, (
                f"session {self.session_id!r}: cache holds {self.cache.length} positions, "
                f"below the {self.keep} its turn reuses"
            )
            return
        assert self.cache.length == len(self.tokens), (
            f"session {self.session_id!r}: cache holds {self.cache.length} positions, "
            f"K has {len(self.tokens)}"
        )

    def begin(self, request_id: bytes, keep: int) -> None:
        """Mark a turn in flight that reuses the first ``keep`` positions of K."""
        assert self.in_flight is None, f"session {self.session_id!r}: a turn is already in flight"
        assert 0 <= keep <= len(self.tokens), f"keep {keep} outside K of {len(self.tokens)}"
        self.check()
        self.in_flight, self.keep, self.feeding = request_id, keep, False

    def trim_to_keep(self, n_new: int = 0) -> None:
        """Drop cache positions past ``keep``, before the turn's first forward pass (idempotent).

        Deferred to here rather than done in `begin` because a full hit or an edited history
        trims positions that K still needs: until the model is fed, a cancel loses nothing. A
        parked cache is decoded here (what is kept of it, with room for ``n_new`` positions).
        """
        assert self.in_flight is not None, f"session {self.session_id!r}: no turn in flight"
        if not self.feeding:
            self.cache.truncate(self.keep)
            self.cache.unpark(n_new)
            self.feeding = True

    def commit(self, text: str, tokens: list[int]) -> None:
        """End the turn in flight with (T, K) = (``text``, ``tokens``).

        ``tokens`` must be ids the cache already holds (the reused positions, then what the turn
        fed): the cache is cut back to them, never grown.
        """
        assert self.in_flight is not None and self.feeding, "commit without a turn that fed"
        assert len(tokens) <= self.cache.length, (
            f"session {self.session_id!r}: committing {len(tokens)} ids, "
            f"the cache holds {self.cache.length}"
        )
        assert tokens[: self.keep] == self.tokens[: self.keep], "the reused prefix changed"
        self.cache.truncate(len(tokens))
        self.text, self.tokens = text, tokens
        self.turns += 1
        self._land()

    def rollback(self) -> None:
        """End the turn in flight without committing anything.

        If the cache still starts with K (the turn fed nothing, or only appended to K), (T, K)
        stay as they were and the cache is cut back to K. Otherwise positions K needs were
        trimmed (a full hit, an edited or diverged history) and the session starts over empty.
        An empty session says ``cancelled`` on its next cold turn.
        """
        assert self.in_flight is not None, f"session {self.session_id!r}: no turn in flight"
        if self.feeding and self.keep < len(self.tokens):
            self.text, self.tokens = "", []
        self.cache.truncate(len(self.tokens))
        if not self.tokens:
            self.cold_reason = ColdReason.CANCELLED
        self._land()

    def _land(self) -> None:
        self.in_flight, self.keep, self.feeding = None, 0, False
        if not self.cache.parked:
            self.kv_from = KvSource.HOT
        self.check()


class SessionStore:
    """Sessions of one worker, bounded by a KV budget in bytes.

    Parameters
    ----------
    new_cache:
        Factory for an empty KV cache (``Engine.new_cache``).
    kv_budget_bytes:
        Target for the sum of all sessions' cache bytes (as held: parked ones count their
        codes); None = unbounded.
    rest:
        How idle sessions are parked when the budget is short (``none``: they are not, and
        are evicted at once). Parking is deferred while the budget has room.
    spill:
        Where sessions that must leave RAM are written instead of dropped (None: dropped).
    clock:
        Monotonic clock (injected for tests).
    """

    def __init__(
        self,
        new_cache: Callable[[], KVCache],
        kv_budget_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        rest: RestDtype = RestDtype.NONE,
        spill: SpillDir | None = None,
    ) -> None:
        self._new_cache = new_cache
        self.kv_budget_bytes = kv_budget_bytes
        self.rest = rest
        self.spill = spill
        self._clock = clock
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()  # LRU order, oldest first
        self._gone: OrderedDict[bytes, ColdReason] = OrderedDict()  # session id -> cold reason
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: bytes) -> bool:
        return session_id in self._sessions

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def get(self, session_id: bytes) -> Session | None:
        """The live session, or None."""
        return self._sessions.get(session_id)

    def recent(self, limit: int) -> list[Session]:
        """Up to ``limit`` sessions, most recently used first (read-only: nothing moves)."""
        out: list[Session] = []
        for session in reversed(self._sessions.values()):
            if len(out) >= limit:
                break
            out.append(session)
        return out

    @property
    def kv_bytes(self) -> int:
        """Bytes held by all sessions' KV caches."""
        return sum(s.cache.nbytes for s in self._sessions.values())

    def _fresh(self, session_id: bytes, cold_reason: ColdReason) -> Session:
        """The one factory for an empty session (new, reset, re-created after eviction)."""
        session = Session(
            session_id=session_id,
            cache=self._new_cache(),
            last_used=self._clock(),
            cold_reason=cold_reason,
        )
        self._sessions[session_id] = session
        return session

    def acquire(self, session_id: bytes) -> Session:
        """Get or create a session and mark it most recently used.

        A session remembered as gone (evicted, reset, worker lost) comes back empty with that
        cold reason; an unknown one with reason ``new``.
        """
        session = self._sessions.get(session_id)
        if session is None:
            session = self._fresh(session_id, self._gone.pop(session_id, ColdReason.NEW))
        self._sessions.move_to_end(session_id)
        session.last_used = self._clock()
        return session

    def reset(self, session_id: bytes, reason: ColdReason = ColdReason.RESET) -> bool:
        """Forget a session (idempotent). Its next turn runs cold with ``reason``.

        Returns whether a live session was dropped. The caller ends a turn in flight first.
        """
        session = self._sessions.pop(session_id, None)
        if self.spill is not None:
            self.spill.drop(session_id)
        self._remember(session_id, reason)
        return session is not None

    def forget(self, session_id: bytes) -> bool:
        """Drop a session and every memory of it (idempotent): the id is free again.

        Returns whether a live session was dropped. The caller ends a turn in flight first.
        """
        self._gone.pop(session_id, None)
        if self.spill is not None:
            self.spill.drop(session_id)
        return self._sessions.pop(session_id, None) is not None

    def _remember(self, session_id: bytes, reason: ColdReason) -> None:
        self._gone[session_id] = reason
        self._gone.move_to_end(session_id)
        while len(self._gone) > REMEMBER_GONE:
            self._gone.popitem(last=False)

    def park(self, session: Session) -> int:
        """Compress an idle session's cache into the rest dtype; returns the bytes freed.

        A session with a turn in flight, already parked, or empty is left as it is (0).
        """
        cache = session.cache
        if self.rest is RestDtype.NONE or session.in_flight is not None or cache.parked:
            return 0
        if not session.tokens:
            return 0
        before = cache.nbytes
        cache.park(self.rest)
        session.kv_from = KvSource.REST
        return before - cache.nbytes

    def _spill(self, session: Session) -> list[bytes]:
        """Write a session leaving RAM to disk; returns the sessions that are now gone (it, if
        there is no spill directory or its file could not be kept, and those dropped from disk
        to make room)."""
        if self.spill is None or not session.tokens:
            return [session.session_id]
        cache = session.cache
        cache.park(self.rest)  # the form it is written in (none: float32)
        assert cache.rest is not None
        return self.spill.write(session.session_id, session.text, session.tokens, cache.rest)

    def restore_spilled(self, session_id: bytes) -> Session | None:
        """Bring a spilled session back into RAM (parked, ``kv_from`` disk), before its turn is
        planned. None if it is not on disk, or its file is unusable: then its next turn goes
        cold with ``spill_invalid``, and the file is gone."""
        if session_id in self._sessions or self.spill is None or session_id not in self.spill:
            return None
        t0 = time.perf_counter()
        try:
            spilled = self.spill.take(session_id)
        except SpillInvalid:
            self._remember(session_id, ColdReason.SPILL_INVALID)
            return None
        return self.install(session_id, spilled, KvSource.DISK, (time.perf_counter() - t0) * 1e3)

    def respill(self, session_id: bytes) -> None:
        """Write a session read back by `restore_spilled` to disk again, as it was (its turn was
        refused before it began: an overflow must leave the session where it was)."""
        session = self._sessions.get(session_id)
        if session is None or session.in_flight is not None:
            return
        del self._sessions[session_id]
        for sid in self._spill(session):
            self._remember(sid, ColdReason.EVICTED)

    def install(
        self, session_id: bytes, spilled: Spilled, source: KvSource, load_ms: float
    ) -> Session:
        """Make a session of state read back from disk (parked until its turn runs).

        ``load_ms`` (the reading time) is reported in its next turn's ``restore_ms``.
        """
        reason = self._gone.pop(session_id, ColdReason.EVICTED)
        self._sessions.pop(session_id, None)
        session = self._fresh(session_id, reason)
        session.cache.load(spilled.rest)
        session.text, session.tokens = spilled.text, spilled.tokens
        session.kv_from = source
        session.load_ms = load_ms
        session.check()
        return session

    def evict_to_fit(self, extra_bytes: int = 0) -> list[bytes]:
        """Park, then evict idle sessions, least recently used first, until the budget holds.

        ``extra_bytes`` is room wanted on top of what is held (a turn about to grow its cache).
        Idle sessions are first compressed at rest (`park`), oldest first; only if that is not
        enough are they evicted, to the spill directory if there is one. Sessions with a turn
        in flight are neither, so the budget may stay exceeded while they run; that is logged,
        not refused. Returns the ids that are gone (not those written to disk).
        """
        if self.kv_budget_bytes is None:
            return []
        evicted: list[bytes] = []
        total = self.kv_bytes + extra_bytes
        for session in list(self._sessions.values()):
            if total <= self.kv_budget_bytes:
                break
            total -= self.park(session)
        for session in list(self._sessions.values()):
            if total <= self.kv_budget_bytes:
                break
            if session.in_flight is not None:
                continue
            total -= session.cache.nbytes
            del self._sessions[session.session_id]
            for sid in self._spill(session):
                self._remember(sid, ColdReason.EVICTED)
                evicted.append(sid)
        if evicted:
            self.evictions += len(evicted)
            logger.info("evicted %d idle sessions to fit the KV budget: %s", len(evicted), evicted)
        if total > self.kv_budget_bytes:
            logger.warning(
                "KV budget exceeded by sessions in flight: %d > %d bytes",
                total,
                self.kv_budget_bytes,
            )
        return evicted
