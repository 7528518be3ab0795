"""The blocking client: a thin driver of :mod:`~kvroute.client.core`'s machines.

:class:`Client` owns one ZeroMQ context and DEALER (:class:`~kvroute.client.transport.Transport`);
each :class:`Session` streams its turns over it. Thread-safety: a client may be shared by
threads, each driving its own sessions (replies are routed to the request awaiting them); a
session runs one request at a time (another raises ``SessionBusy`` at once), except
:meth:`Session.cancel`, which may be called from any thread or a signal handler. Exceptions
(``KeyboardInterrupt`` included) may interrupt a request anywhere: the session and the client
stay usable, and the history follows the rule in :mod:`~kvroute.client.core`.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from kvroute.proto import Fleet

from .actions import Done, Machine, Phase, Receive, Yield
from .api import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_ON_OVERFLOW,
    ClientBase,
    SessionBase,
    StreamBase,
    advance,
    perform_quietly,
)
from .conversation import OnOverflow
from .core import PingMachine
from .errors import KvrouteError
from .queries import IndexMachine, LookupMachine
from .status import StatusMachine
from .transport import Transport


def drive(t: Transport, m: Machine) -> Yield | Done:
    """Run ``m`` until it yields a piece or is done, blocking for replies."""
    try:
        while isinstance(act := advance(t, m), Receive):
            m.on_reply(t.recv(act.key, act.waiting_for))
        return act
    except BaseException as exc:
        perform_quietly(t, m.fail(exc))
        raise


class ReplyStream(StreamBase):
    """The reply to one :meth:`Session.send`: iterate over it for the text pieces.

    Nothing is sent until iteration starts. Stopping early (``break``, :meth:`close`, or the
    stream dropped) cancels the turn and waits for its end, so the session is free again; the
    partial reply is kept. An exception raised while iterating leaves the history unchanged.
    A stream dropped without being iterated logs a warning (and a ``ResourceWarning``).
    """

    _t: Transport

    def __iter__(self) -> ReplyStream:
        return self

    def __next__(self) -> str:
        if self._m.phase is not Phase.DONE:
            act = drive(self._t, self._m)
            if isinstance(act, Yield):
                return act.text
        raise StopIteration

    def close(self) -> None:
        """Stop reading: cancel the turn if it is running, wait for its end and keep the
        partial reply (as the worker committed it). A no-op once the stream is done."""
        if self._m.close():
            try:
                drive(self._t, self._m)
            except KvrouteError as exc:
                self._close_failed(exc)

    def _dropped(self) -> None:
        if self._t.closed or self._t.receiving():
            # Collected inside a receive (by the cyclic garbage collector), waiting here would
            # wait on ourselves: cancel, and leave the END to the session's next request.
            super()._dropped()
        else:
            self.close()


class Session(SessionBase[Transport, ReplyStream]):
    """One chat session over a :class:`Client`; attributes and rules in
    :class:`~kvroute.client.api.SessionBase`."""

    _stream = ReplyStream

    def ask(
        self,
        text: str,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        on_overflow: OnOverflow = DEFAULT_ON_OVERFLOW,
        stop: str | Sequence[str] | None = None,
    ) -> str:
        """Send a user message and return the whole reply (``send`` without streaming).

        Same arguments, history rules and errors as :meth:`send`; ``last`` has the numbers.
        """
        args = (max_tokens, temperature, top_p, top_k, seed, on_overflow, stop)
        return "".join(self.send(text, *args))

    def reset(self, *, keep_history: bool = False) -> None:
        """Forget the worker's cache of this session and (unless ``keep_history``) the history
        except the system prompt. The next turn is cold (reason ``reset``)."""
        drive(self._t, self._core.reset(keep_history=keep_history))

    def close(self) -> None:
        """Free the session on the service (cache and pin). The history is kept: a later
        ``send`` starts again, cold."""
        drive(self._t, self._core.close())


class Client(ClientBase[Transport, Session]):
    """A blocking connection to a kvroute broker; a context manager. Arguments and errors as
    :class:`~kvroute.client.api.ClientBase`; thread-safe (see the module docstring)."""

    _transport = Transport
    _session = Session

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket and context (idempotent); this client's sessions stop working."""
        self._t.close()

    def ping(self) -> float:
        """Round-trip time to the broker in seconds (checks the broker, not the workers).

        Raises
        ------
        Timeout
            No PONG within ``timeout``.
        """
        m = PingMachine(self._t.ids.next())
        drive(self._t, m)
        return m.rtt

    def status(self) -> Fleet:
        """The fleet view, answered by the broker: every registered worker with its last
        heartbeat's gauges, the broker's counters, and counters added up over every worker
        process (see :mod:`kvroute.proto.status`).

        Raises
        ------
        Timeout
            No answer within ``timeout``.
        """
        m = StatusMachine(self._t.ids.next())
        drive(self._t, m)
        assert m.fleet is not None, "a STATUS that returns has its answer"
        return m.fleet

    def lookup(self, digest: bytes) -> str | None:
        """The session of this client's identity that the broker's transcript index records
        for ``digest`` (16..32 bytes), or None; see :mod:`kvroute.proto.transcripts`.

        Raises ValueError for a bad digest; Timeout without an answer.
        """
        m = LookupMachine(self._t.ids.next(), digest, self._owner)
        drive(self._t, m)
        return m.session_id

    def index(self, session_id: str, digest: bytes) -> None:
        """Record in the broker's transcript index that session ``session_id`` holds the
        transcript ``digest`` (as this client received it).

        Raises ValueError for a bad session id or digest; NotOwner if another client identity
        owns the session; Timeout without an answer.
        """
        m = IndexMachine(self._t.ids.next(), session_id, digest, self._owner)
        drive(self._t, m)
