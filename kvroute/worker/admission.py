"""When a turn may start: capacity, the KV budget, and fairness between clients (I/O-free).

A worker runs at most ``capacity`` turns at once. A turn that cannot start yet waits in a
bounded queue; one that waits longer than ``max_wait_s``, or finds the queue full, is answered
ERROR ``overloaded`` (retryable) by the scheduler. Waiting turns start in round-robin order over
clients (a client is the session's owner as the broker reports it), so one client's flood of
turns delays another client's turn by at most one of its own per free slot. And a client that
already has a turn running may not take the last ``spare`` free slots: they are kept for a client
with nothing running, whose turn then starts at once instead of waiting for a flood's turns to end.
Once running, the step's prefill budget goes first to the clients running the fewest turns
(`Admission.step_plan`), so that turn's prompt is fed in the next step. While several clients
share the worker (run turns now, or ended one within ``shared_window_s``), steps are kept short
so that the step a new turn arrives in ends soon: each feeds either a few prompt tokens or the
decode rows; and the step that gives a light client with nothing streaming yet its first token
comes next and feeds that prompt alone.

Memory is admitted by reservation. A running turn may grow its session's cache up to its
*horizon*, the prompt plus ``max_tokens`` (the cache never allocates past it, see
`KVCache.growth_limit`), so it reserves that many positions. A turn starts only if the
reservations of the running turns, its own and the bytes of sessions with a turn waiting fit the
budget; idle sessions are then evicted least recently used to make room. Resident KV thus stays
within the budget, plus the copy a growing cache makes (at most one growth step per running
turn). A turn that does not fit even alone is run when nothing else runs, so the queue never
stalls (it is logged).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from .sessions import SessionStore
from .turn import Turn

logger = logging.getLogger(__name__)

T = TypeVar("T")
StepKind = Literal["all", "prompts", "decode", "solo"]  # what a step feeds (`step_plan`)


@dataclass
class AdmissionConfig:
    """Limits of admission (the worker's CLI options map onto these)."""

    capacity: int = 16  # turns run at once (advertised in READY)
    max_waiting: int = 256  # turns waiting for a slot, all clients together
    max_waiting_per_client: int = 64  # of which one client may hold this many
    max_wait_s: float = 10.0  # a turn waiting longer is answered overloaded (clients retry)
    spare_slots: int | None = None  # None: capacity // 8, at least 1 (0 when capacity is 1)
    shared_prefill_chunk: int = 32  # prompt tokens per step while several clients are active
    # A client whose last turn ended this recently still shares the worker: its next turn is
    # likely on its way, and should not arrive in the middle of a long step.
    shared_window_s: float = 5.0

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.max_waiting < 0 or self.max_waiting_per_client < 0:
            raise ValueError("capacity must be >= 1 and queue bounds >= 0")
        if not self.max_wait_s > 0:
            raise ValueError("max_wait_s must be positive")
        if self.spare_slots is not None and not 0 <= self.spare_slots < self.capacity:
            raise ValueError("spare_slots must be in 0..capacity-1")
        if self.shared_prefill_chunk < 1:
            raise ValueError("shared_prefill_chunk must be >= 1")
        if not self.shared_window_s >= 0:
            raise ValueError("shared_window_s must be >= 0")

    @property
    def spare(self) -> int:
        """Free slots a client that already runs a turn may not take."""
        if self.spare_slots is not None:
            return self.spare_slots
        return max(1, self.capacity // 8) if self.capacity > 1 else 0


@dataclass
class Waiting(Generic[T]):
    """One queued item and who queued it when."""

    key: bytes  # unique among waiting items (the session id)
    client: bytes
    item: T
    since: float


class FairQueue(Generic[T]):
    """Items waiting per client, taken round-robin over clients, bounded in total and per client.

    Each client's items keep their order; `heads` offers each client's oldest item, starting with
    the client served least recently, and `take` moves that client to the back of the rotation.
    """

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self._by_client: dict[bytes, deque[Waiting[T]]] = {}
        self._order: deque[bytes] = deque()  # clients with items, next to serve first
        self._by_key: dict[bytes, Waiting[T]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: bytes) -> bool:
        return key in self._by_key

    def get(self, key: bytes) -> T | None:
        """The item waiting under ``key``, or None."""
        w = self._by_key.get(key)
        return None if w is None else w.item

    def items(self) -> Iterator[T]:
        """Every waiting item (any order)."""
        return (w.item for w in self._by_key.values())

    def has_room(self, client: bytes) -> bool:
        """Whether `push` would accept an item from ``client`` now."""
        mine = self._by_client.get(client)
        return len(self) < self.max_total and (mine is None or len(mine) < self.max_per_client)

    def push(self, key: bytes, client: bytes, item: T, now: float) -> None:
        """Queue ``item`` (check `has_room` first; ``key`` must not be waiting already)."""
        assert self.has_room(client) and key not in self._by_key
        w = Waiting(key, client, item, now)
        if client not in self._by_client:
            self._by_client[client] = deque()
            self._order.append(client)
        self._by_client[client].append(w)
        self._by_key[key] = w

    def heads(self) -> Iterator[Waiting[T]]:
        """Each client's oldest item, in round-robin order."""
        return (self._by_client[c][0] for c in list(self._order))

    def take(self, key: bytes) -> T:
        """Remove a head offered by `heads`; its client goes to the back of the rotation."""
        w = self._by_key.pop(key)
        mine = self._by_client[w.client]
        assert mine[0] is w, "take() a head"
        mine.popleft()
        self._order.remove(w.client)
        if mine:
            self._order.append(w.client)
        else:
            del self._by_client[w.client]
        return w.item

    def remove(self, key: bytes) -> T | None:
        """Remove the item under ``key`` wherever it waits (the rotation is unchanged)."""
        w = self._by_key.pop(key, None)
        if w is None:
            return None
        mine = self._by_client[w.client]
        mine.remove(w)
        if not mine:
            del self._by_client[w.client]
            self._order.remove(w.client)
        return w.item

    def remove_where(self, pred: Callable[[Waiting[T]], bool]) -> list[T]:
        """Remove and return every item for which ``pred`` holds, oldest first."""
        gone = sorted((w for w in self._by_key.values() if pred(w)), key=lambda w: w.since)
        return [item for w in gone if (item := self.remove(w.key)) is not None]


class Admission:
    """Turns waiting to start on one worker, and the rule that starts them.

    Parameters
    ----------
    config:
        Capacity and queue bounds.
    store:
        The worker's sessions: its KV budget, and where idle sessions are evicted.
    n_ctx:
        Positions a session may hold (caps a turn's horizon).
    clock:
        Monotonic seconds (injected for tests).
    """

    def __init__(
        self,
        config: AdmissionConfig,
        store: SessionStore,
        n_ctx: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.store = store
        self.n_ctx = n_ctx
        self.clock = clock
        self.queue: FairQueue[Turn] = FairQueue(config.max_waiting, config.max_waiting_per_client)
        self._client_of: dict[bytes, bytes] = {}  # session id -> client, for turns started here
        # Clients whose last running turn ended within shared_window_s, oldest first.
        self._ended_at: dict[bytes, float] = {}
        self._last_kind: StepKind = "all"  # what the last step fed
        self.expired = 0  # turns that waited too long

    def __len__(self) -> int:
        return len(self.queue)

    def __contains__(self, session_id: bytes) -> bool:
        return session_id in self.queue

    def get(self, session_id: bytes) -> Turn | None:
        """The session's waiting turn, or None."""
        return self.queue.get(session_id)

    def has_room(self, client: bytes) -> bool:
        """Whether a turn from ``client`` may wait (else it is answered overloaded now)."""
        return self.queue.has_room(client)

    def wait(self, turn: Turn, client: bytes) -> None:
        """Queue a turn whose session has begun it (``session.in_flight`` protects the session
        from eviction while it waits). Check `has_room` first; `admit` may start it at once."""
        self.queue.push(turn.session.session_id, client, turn, self.clock())

    def remove(self, session_id: bytes) -> Turn | None:
        """Take the session's waiting turn out of the queue (reset, close)."""
        return self.queue.remove(session_id)

    def expel(self) -> tuple[list[Turn], list[Turn]]:
        """Remove waiting turns that were cancelled, and those that waited too long.

        Returns ``(cancelled, expired)``; the caller ends the first with END ``cancelled`` and
        the second with ERROR ``overloaded``.
        """
        cancelled = self.queue.remove_where(lambda w: w.item.cancelled)
        deadline = self.clock() - self.config.max_wait_s
        expired = self.queue.remove_where(lambda w: w.since < deadline)
        self.expired += len(expired)
        return cancelled, expired

    def horizon(self, turn: Turn) -> int:
        """Positions the turn's session may hold by its end: prompt plus ``max_tokens``."""
        return min(self.n_ctx, len(turn.plan.prompt_ids) + turn.params.max_tokens)

    def reservation(self, turn: Turn) -> int:
        """KV bytes a turn may hold by its end (what it already holds, if that is more)."""
        cache = turn.session.cache
        return max(cache.nbytes, self.horizon(turn) * cache.bytes_per_token)

    def admit(self, running: MutableMapping[bytes, Turn]) -> list[Turn]:
        """Start waiting turns while a slot and the budget allow, in fair order.

        Started turns are added to ``running`` (session id -> turn), their caches' growth is
        capped at their horizon, and idle sessions are evicted to make room for what they
        reserve. Returns the started turns.
        """
        for sid in [s for s in self._client_of if s not in running]:
            self.release(sid)  # ended without being released (a failed turn)
        per_client = Counter(self._client_of.values())
        capacity, spare = self.config.capacity, self.config.spare
        started: list[Turn] = []
        while self.queue and len(running) < capacity:
            free = capacity - len(running)
            pick = next(
                (w for w in self.queue.heads() if free > spare or per_client[w.client] == 0),
                None,
            )
            if pick is None or not self._fits(pick.item, running):
                break  # the next turn in fair order waits for a slot or memory to free up
            turn = self.queue.take(pick.key)
            running[pick.key] = turn
            self._client_of[pick.key] = pick.client
            per_client[pick.client] += 1
            turn.session.cache.growth_limit = self.horizon(turn)
            started.append(turn)
        if started:
            self.store.evict_to_fit(self._outstanding(running))
        return started

    def release(self, session_id: bytes) -> None:
        """A running turn ended (the caller took it out of ``running``); its client still
        shares the worker for ``shared_window_s``."""
        client = self._client_of.pop(session_id, None)
        if client is not None:
            now = self.clock()
            self._ended_at.pop(client, None)  # re-inserted: the dict stays in time order
            self._ended_at[client] = now
            self._forget_ended(now)

    def step_plan(self, running: Mapping[bytes, Turn], chunk: int) -> tuple[list[Turn], int]:
        """The running turns the next step feeds, in fair order, and its prompt token budget.

        Fair order groups the turns by client, the clients running fewest turns first. A step
        hands its prefill budget out in this order, so a client with one short prompt gets it
        fed in the next step even while another client's many prompts are prefilling.

        While one client has the worker to itself, a step feeds every running turn: one token
        for each that decodes, prompts within ``chunk``. While several clients share it (they
        run turns, or one ended a turn within ``shared_window_s``), a turn that arrives waits
        out the step in progress and then its first step, so both are kept short:

        - a step feeds either prompts (at most ``shared_prefill_chunk`` tokens) or the decode
          rows, in turn: a pass costs about the sum of its rows, so one long step gains little
          over two short ones;
        - a step that feeds the prompt of a client running fewer turns than another (first in
          fair order) feeds that prompt only;
        - when that client has nothing streaming yet and its prompts end in this step, the
          step comes next whatever came before, unless the last step was such a step too: its
          first token then waits out one step and costs its own prompt alone.
        """
        groups = self._groups(running)  # once per step: every answer derives from it
        order = [turn for _, group in groups for turn in group]
        kind, turns, budget = self._plan(groups, order, chunk)
        self._last_kind = kind
        return turns, budget

    def _groups(self, running: Mapping[bytes, Turn]) -> list[tuple[bytes, list[Turn]]]:
        """Running turns per client, fewest first (stable: ties keep start order)."""
        by_client: dict[bytes, list[Turn]] = {}
        for sid, turn in running.items():
            by_client.setdefault(self._client_of.get(sid, sid), []).append(turn)
        return sorted(by_client.items(), key=lambda cg: len(cg[1]))

    def _plan(
        self, groups: list[tuple[bytes, list[Turn]]], order: list[Turn], chunk: int
    ) -> tuple[StepKind, list[Turn], int]:
        if not groups or not self._shared(groups):
            return "all", order, chunk
        budget = min(chunk, self.config.shared_prefill_chunk)
        light = groups[0][1]
        if len(light) < len(groups[-1][1]):
            pending = sum(len(t.pending) for t in light if t.prefilling)
            solo = all(t.prefilling for t in light) and self._last_kind != "solo"
            if pending and pending <= budget and solo:
                return "solo", light, pending
            if pending:
                budget = min(budget, pending)
        prompts = [t for t in order if t.prefilling]
        decode = [t for t in order if not t.prefilling]
        if prompts and (not decode or self._last_kind == "decode"):
            return "prompts", prompts, budget
        return "decode", decode, 0

    def _shared(self, groups: list[tuple[bytes, list[Turn]]]) -> bool:
        """Whether several clients use the worker: run turns now, or ended one recently."""
        if len(groups) >= 2:
            return True
        self._forget_ended(self.clock())
        running = {client for client, _ in groups}
        return any(client not in running for client in self._ended_at)

    def _forget_ended(self, now: float) -> None:
        horizon = now - self.config.shared_window_s
        while self._ended_at:
            client, when = next(iter(self._ended_at.items()))
            if when >= horizon:
                return
            del self._ended_at[client]

    def _fits(self, turn: Turn, running: MutableMapping[bytes, Turn]) -> bool:
        budget = self.store.kv_budget_bytes
        if budget is None:
            return True
        need = self.reservation(turn) + sum(self.reservation(t) for t in running.values())
        # Sessions with a turn waiting cannot be evicted either.
        need += sum(t.session.cache.nbytes for t in self.queue.items() if t is not turn)
        if need <= budget:
            return True
        if not running:
            logger.warning(
                "a turn reserving %d KV bytes runs alone over the %d-byte budget",
                self.reservation(turn),
                budget,
            )
            return True
        return False

    def _outstanding(self, running: MutableMapping[bytes, Turn]) -> int:
        """Bytes running turns may still allocate (reserved, not yet held)."""
        return sum(self.reservation(t) - t.session.cache.nbytes for t in running.values())
