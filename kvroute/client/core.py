"""The client's turn lifecycle as one I/O-free state machine, in the style of h11 (sans-I/O).

A :class:`RequestMachine` runs one call on a session: a ``send()``'s reply stream (its TURN,
sent again after an overflow the policy handles), a RESET or a CLOSE; :class:`PingMachine` runs
a PING. A machine takes replies in and hands actions out, one at a time; it never touches a
socket, and reads the time only through the clock it is given. The blocking and asyncio drivers
(:mod:`~kvroute.client.sync`, :mod:`~kvroute.client.aio`) run the same loop over it and differ
only in how they wait::

    m.start()                     # claim the session (SessionBusy if another call holds it)
    loop: act = m.next_action()
        Send(frames, key)   open key's reply queue (if key), send frames
        Receive(key, ...)   m.on_reply(next reply for key)   (None: nothing more will come)
        Discard(key)        stop collecting replies for key
        Yield(text)         hand text to the caller; its next call goes on from here
        Done(result)        the call is over
        Raise(error)        raise it
    on any exception: perform m.fail(exc) without waiting, and re-raise

Phases: NEW -> SETTLING (the session's pending request, if any, is cancelled again and waited
out) -> RUNNING (ours is on the wire) -> DONE. An overflow the policy handles goes back to
SETTLING, from where the smaller TURN goes out at once; :meth:`RequestMachine.close` goes back to
SETTLING on its own, cancelled turn, and from there to DONE.

The history rule (docs/design.md, 'Client turn lifecycle'): a turn is appended exactly as
streamed once its END checks out; a turn whose stream the caller *closed* is cancelled and
appended, partial, when its END arrives; a turn *interrupted* by an exception (an interrupt, a
Timeout, an error reply, a failed check) leaves the history unchanged, and its request stays
*pending*, cancelled, until the session's next call has waited for its end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from kvroute.proto import Kind, Reply, TurnEnd, request_frames

from .actions import (
    Action,
    Cleanup,
    Clock,
    Discard,
    Done,
    Phase,
    Raise,
    Receive,
    Send,
    Yield,
)
from .conversation import Attempt, Conversation
from .demux import Key, RequestIds, ends_request
from .errors import ContextOverflow, KvrouteError, SessionBusy, Timeout
from .replies import ack_error, turn_reply
from .result import TurnResult

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    """A session's request from the moment its Send is handed out until its terminal reply is
    seen. It outlives the call that sent it when that call is left early (it is then *pending*).
    The fields from ``attempt`` to ``broken`` are for TURNs only.

    Every request has a CANCEL: a TURN's stops it; any request's, sent while it is waited out,
    makes a broker that has no record of it in flight (it restarted since) answer ERROR
    ``not_in_flight`` for it at once, which ends the wait."""

    key: Key
    t0: float
    cancel: list[bytes]  # its CANCEL (same session and request id)
    attempt: Attempt | None = None
    parts: list[str] = field(default_factory=list)  # TOKEN texts so far (their count: next seq)
    ttft_ms: float | None = None
    sent: bool = False  # the driver asked for more after its Send: CANCEL may follow now
    keep_partial: bool = False  # its stream was closed: commit the END when it comes
    broken: bool = False  # a client-side check failed: nothing of it is committed


# --- one session ---------------------------------------------------------------------------------


class SessionCore:
    """Who holds a session and which of its requests is on the wire.

    Parameters
    ----------
    conversation
        The session's history, where finished turns are committed.
    ids
        The client's request ids.
    clock
        Where turns read the time (TTFT, elapsed).
    owner
        The owner token presented on every request (the owner frame), or empty for none.

    ``holder`` is the machine of the call running on the session, ``request`` the session's
    request whose terminal reply has not been seen: it outlives its call when the call is left
    early. Claiming takes a short lock (never held across I/O), so sessions may be driven from
    several threads, one call at a time.
    """

    def __init__(
        self,
        conversation: Conversation,
        ids: RequestIds,
        clock: Clock = time.perf_counter,
        owner: bytes = b"",
    ) -> None:
        self.conv = conversation
        self.ids = ids
        self.clock = clock
        self.owner = owner
        self.holder: RequestMachine | None = None
        self.request: Request | None = None
        self._guard = threading.Lock()

    def turn(self, attempt: Attempt) -> RequestMachine:
        """The machine of one ``send()``."""
        return RequestMachine(self, Kind.TURN, attempt)

    def reset(self, *, keep_history: bool) -> RequestMachine:
        """The machine of a RESET (it forgets the history unless ``keep_history``)."""
        return RequestMachine(self, Kind.RESET, keep_history=keep_history)

    def close(self) -> RequestMachine:
        """The machine of a CLOSE."""
        return RequestMachine(self, Kind.CLOSE)

    def cancel(self) -> Cleanup | None:
        """Cancel the turn in flight: None if there is none, else the CANCEL to send now (none
        while its TURN is not out yet: the machine sends it right after). Lock-free."""
        holder = self.holder
        return None if holder is None else holder.cancel()

    def claim(self, machine: RequestMachine) -> None:
        with self._guard:
            if self.holder is not None and self.holder is not machine:
                raise SessionBusy(self.conv.id)
            self.holder = machine

    def release(self, machine: RequestMachine) -> None:
        with self._guard:
            if self.holder is machine:
                self.holder = None


class RequestMachine:
    """One call on a session (see the module docstring); get one from :class:`SessionCore`."""

    def __init__(
        self,
        session: SessionCore,
        kind: Kind,
        attempt: Attempt | None = None,
        *,
        keep_history: bool = True,
    ) -> None:
        assert (kind is Kind.TURN) == (attempt is not None), "a TURN, and only a TURN, has text"
        self.phase = Phase.NEW
        self.attempt = attempt
        self._s = session
        self._kind = kind
        self._keep_history = keep_history
        self._ok = _OK.get(kind)  # the reply that ends a RESET or CLOSE well
        self._waiting_for = "TURN reply" if self._ok is None else f"{self._ok.name} reply"
        self._own: Request | None = None  # our latest request
        self._recancelled: Request | None = None  # the pending request we sent CANCEL again for
        self._cancel = False  # cancel() was called
        self._closing = False  # close() was called
        self._result: TurnResult | None = None
        self._queue: deque[Action] = deque()

    def start(self) -> None:
        """Claim the session; raises SessionBusy at once if another call holds it."""
        assert self.phase is Phase.NEW, "start() once"
        self._s.claim(self)
        self.phase = Phase.SETTLING

    def next_action(self) -> Action:
        """What the driver does next (see the module docstring)."""
        if self._queue:
            return self._queue.popleft()
        req = self._s.request
        if self.phase is Phase.SETTLING:
            if req is not None:
                if req is not self._own and req is not self._recancelled:
                    # An earlier call's request: its CANCEL may have been lost with a broker
                    # that died since; one the broker (or its successor) sees is answered.
                    self._recancelled = req
                    return Send(req.cancel)
                return Receive(req.key, "end of an interrupted request", draining=True)
            if self._closing:
                self._finish()
                return Done(self._result)
            return self._send()
        assert self.phase is Phase.RUNNING, f"next_action() in phase {self.phase.name}"
        assert req is not None and req is self._own, "a request that ended was not failed"
        if not req.sent:  # asked again: the driver has sent it
            req.sent = True
            if self._cancel:
                return Send(req.cancel)  # cancel() came before the TURN was out
        return Receive(req.key, self._waiting_for)

    def on_reply(self, reply: Reply | None) -> None:
        """The reply a :class:`Receive` waited for (None: nothing more will come for it)."""
        req = self._s.request
        assert req is not None, "on_reply() without a request on the wire"
        if self.phase is Phase.SETTLING:
            self._settle(req, reply)
            return
        assert reply is not None, "only a request being waited out ends without a reply"
        if req.attempt is not None:
            self._turn_reply(req, reply)
            return
        assert self._ok is not None
        if ends_request(reply):
            self._forget(req)
        err = ack_error(reply, self._ok, self._s.conv.id)
        if err is not None:
            self._queue.append(Raise(err))
            return
        if self._kind is Kind.RESET and not self._keep_history:
            self._s.conv.forget()
        self._finish()
        self._queue.append(Done())

    def cancel(self) -> Cleanup | None:
        """See :meth:`SessionCore.cancel`."""
        if self._kind is not Kind.TURN or self.phase not in (Phase.SETTLING, Phase.RUNNING):
            return None
        self._cancel = True  # first, then look at ``sent``: next_action() does the reverse
        req = self._own
        if req is not None and req.sent and req is self._s.request:
            return [Send(req.cancel)]
        return []

    def close(self) -> bool:
        """The caller stops reading: cancel our turn and wait for its END, which commits the
        partial reply. True if the driver must now run the machine to its Done; False if there is
        nothing to wait for (the call never started, or is over)."""
        if self.phase is Phase.NEW or self.phase is Phase.DONE:
            self.phase = Phase.DONE
            return False
        req = self._own
        if req is not None and req is self._s.request and req.attempt is not None:
            req.keep_partial = not req.broken
            self._queue.append(Send(req.cancel))
        self._closing = True
        self.phase = Phase.SETTLING
        return True

    def fail(self, exc: BaseException) -> Cleanup:
        """An exception went through the driver (the caller's, an interrupt, a Raise): cancel
        our turn, keep nothing of it, and leave the request pending for the session's next call
        to wait out; but a Timeout while waiting one out gives up on that request."""
        return self._leave(keep_partial=False, give_up=isinstance(exc, Timeout))

    def abandon(self) -> Cleanup:
        """The caller dropped the stream and cannot wait (a finalizer): cancel our turn; the
        session's next call waits for its END and commits the partial reply."""
        return self._leave(keep_partial=True, give_up=False)

    # --- internals ------------------------------------------------------------------------------

    def _send(self) -> Send:
        s, attempt = self._s, self.attempt
        sid, rid, owner = s.conv.key, s.ids.next(), s.owner
        cancel = request_frames(Kind.CANCEL, sid, rid, owner=owner)
        if attempt is None:
            req = Request((sid, rid), s.clock(), cancel)
            frames = request_frames(self._kind, sid, rid, owner=owner)
        else:
            if self._own is None:
                attempt.refresh(s.conv.history)  # as it is now, not when send() was called
            req = Request((sid, rid), s.clock(), cancel, attempt)
            frames = request_frames(Kind.TURN, sid, rid, attempt.body, owner)
        s.request = self._own = req
        self.phase = Phase.RUNNING
        return Send(frames, req.key)

    def _turn_reply(self, req: Request, reply: Reply) -> None:
        out = turn_reply(req.parts, reply, self._s.conv.id)
        if isinstance(out, str):
            if out:
                if req.ttft_ms is None:
                    req.ttft_ms = self._ms(req)
                self._queue.append(Yield(out))
        elif isinstance(out, TurnEnd):
            self._forget(req)
            result = self._commit(req, out)
            self._finish()
            self._queue.append(Done(result))
        else:
            if ends_request(reply):
                self._forget(req)
            else:
                req.broken = True  # a TOKEN failed its check: fail() cancels the turn
            assert self.attempt is not None
            if isinstance(out, ContextOverflow) and self.attempt.shrink(out, self._s.conv.id):
                self.phase = Phase.SETTLING  # nothing is pending: the smaller TURN goes out
            else:
                self._queue.append(Raise(out))

    def _settle(self, req: Request, reply: Reply | None) -> None:
        """A reply of the request being waited out: dropped, except that a turn whose stream
        was closed commits its END. A broken stream there is only logged."""
        if reply is None:
            self._forget(req)
            self._queue.append(Discard(req.key))
            return
        if req.keep_partial and not req.broken:
            out = turn_reply(req.parts, reply, self._s.conv.id)
            if isinstance(out, TurnEnd):
                result = self._commit(req, out)
                if req is self._own:
                    self._result = result
            elif isinstance(out, KvrouteError):
                req.broken = True
                sid = self._s.conv.id
                logger.warning("session %s: the closed turn did not end cleanly: %s", sid, out)
        if ends_request(reply):
            self._forget(req)

    def _leave(self, *, keep_partial: bool, give_up: bool) -> Cleanup:
        out: Cleanup = [a for a in self._queue if isinstance(a, Discard)]
        self._queue.clear()
        if self.phase is not Phase.SETTLING and self.phase is not Phase.RUNNING:
            self.phase = Phase.DONE
            return out
        req = self._s.request
        if req is not None and give_up and self.phase is Phase.SETTLING:
            self._forget(req)
            out.append(Discard(req.key))
        elif req is not None and req.attempt is not None:  # a RESET or CLOSE cannot be stopped
            if req is self._own:  # never upgrades another call's turn, never downgrades a close
                req.keep_partial = (req.keep_partial or keep_partial) and not req.broken
            out.append(Send(req.cancel))
        self._finish()
        return out

    def _commit(self, req: Request, end: TurnEnd) -> TurnResult:
        assert req.attempt is not None
        text = "".join(req.parts)
        return self._s.conv.commit(req.attempt, end, text, req.ttft_ms, self._ms(req))

    def _ms(self, req: Request) -> float:
        return (self._s.clock() - req.t0) * 1e3

    def _forget(self, req: Request) -> None:
        if self._s.request is req:
            self._s.request = None

    def _finish(self) -> None:
        self.phase = Phase.DONE
        self._s.release(self)


_OK = {Kind.RESET: Kind.RESET_OK, Kind.CLOSE: Kind.CLOSE_OK}


class PingMachine:
    """A PING to the broker (outside any session); ``rtt`` is its round trip in seconds."""

    def __init__(self, request_id: bytes, clock: Clock = time.perf_counter) -> None:
        self.phase = Phase.NEW
        self.rtt = 0.0  # set when Done
        self._key: Key = (b"", request_id)
        self._clock = clock
        self._t0 = 0.0
        self._queue: deque[Action] = deque()

    def start(self) -> None:
        self.phase = Phase.RUNNING
        self._t0 = self._clock()
        self._queue.append(Send(request_frames(Kind.PING, b"", self._key[1]), self._key))

    def next_action(self) -> Action:
        return self._queue.popleft() if self._queue else Receive(self._key, "PONG")

    def on_reply(self, reply: Reply | None) -> None:
        assert reply is not None
        err = ack_error(reply, Kind.PONG, "")
        if err is not None:
            self._queue.append(Raise(err))
            return
        self.rtt = self._clock() - self._t0
        self.phase = Phase.DONE
        self._queue.append(Done())

    def fail(self, exc: BaseException) -> Cleanup:
        self.phase = Phase.DONE
        return [Discard(self._key)]
