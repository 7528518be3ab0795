"""Bodies of the transcript index: which session holds a conversation, as its client received it.

A client that knows no session id for a conversation (an OpenAI-style client sends the whole
history every time) can still continue the session that holds it. After a turn, the client
INDEXes the digest of the transcript it received (history plus reply) under the session; before
a turn, it LOOKs UP the digest of the history it is about to send. The broker keeps the index
(bounded, least recently used first out) and answers both itself; entries are per principal,
so a client only ever finds its own sessions (or those of clients sharing its identity).

The digest is opaque to the broker: 16..32 bytes the clients compute alike (the gateway hashes
the role and text of every message, see :func:`kvroute.gateway.affinity.transcript_digest`).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from msgspec import Meta

from . import limits as L
from .control import SessionId
from .fields import Body

Digest = Annotated[bytes, Meta(min_length=L.MIN_DIGEST_BYTES, max_length=L.MAX_DIGEST_BYTES)]


class Lookup(Body, frozen=True):
    """LOOKUP body: which of the caller's sessions holds the transcript ``digest``?

    Sent with an empty session id frame; answered FOUND."""

    WHAT: ClassVar[str] = "LOOKUP"
    digest: Digest


class Found(Body, frozen=True):
    """FOUND body: the session recorded for the digest, or nil (none of the caller's)."""

    WHAT: ClassVar[str] = "FOUND"
    session: SessionId | None


class Index(Body, frozen=True):
    """INDEX body: the session named by the session id frame holds the transcript ``digest``.

    Answered INDEX_OK, or ERROR ``not_owner`` when another principal owns the session. A
    session nobody owns (never created, or forgotten) is not recorded."""

    WHAT: ClassVar[str] = "INDEX"
    digest: Digest
