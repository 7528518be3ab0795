"""The kvroute wire protocol: one owner for kinds, frames, bodies, error codes and limits.

Sockets: clients connect a DEALER to the broker's frontend ROUTER; workers connect a DEALER to
the broker's backend ROUTER. The broker pins each session to one worker and forwards bodies
without decoding them; bodies are decoded (and validated) only by their final consumer.

Frames (the ROUTER adds / strips the peer's routing id in front)
------------------------------------------------------------------
header = ``b"KVR"`` + version byte (1) + kind byte (:class:`Kind`). Routing frames: session id
(1..64 bytes; may be empty on PING/PONG and LOOKUP/FOUND), request id (1..32 bytes), flags (1
byte). Body: one msgpack map, at most 1 MiB (:mod:`~kvroute.proto.limits`).

- client -> broker: ``[header, session_id, request_id, body]``, or
  ``[header, session_id, request_id, owner, body]`` with an owner token (see below)
- broker -> worker: ``[header, client, session_id, request_id, flags, body]`` (flags bit 0:
  the session's previous worker was lost; drop any state for it, report cold ``worker_lost``),
  or with ``principal`` (the session's owner) before the body when it is not ``client``
- worker -> broker: ``[header, client, session_id, request_id, body]`` echoing the delivery
- worker <-> broker control: ``[header, body]``
- broker -> client: ``[header, session_id, request_id, body]``

Build and parse them with :mod:`~kvroute.proto.frames` (``request_frames``/``parse_reply`` for
clients, ``parse_delivery``/``reply_frames``/``control_frames`` for workers).

Kinds and bodies
----------------
Client -> service (each TURN/RESET/CLOSE occupies its session until its terminal reply):

- TURN: :class:`TurnRequest` {messages: [{role, content}], max_tokens, temperature, top_p,
  top_k, seed, stop?}. Answer: TOKEN* then one of END, OVERFLOW, ERROR, SESSION_LOST, BUSY.
  ``stop`` (optional, <= 4 strings, left out when empty): the worker ends the reply before the
  first occurrence of any of them (END ``finish_reason`` stop); the match is neither streamed
  nor committed, and text it held back while a stop string could still begin is streamed once
  ruled out.
- CANCEL (empty body; request id = the TURN's): stop generating; the TURN then ends with END
  ``finish_reason`` cancelled. No reply of its own while that turn is in flight (its END is
  the answer). If the broker has no such request in flight on the session (it ended, never
  ran, or ran at a broker that has restarted since), it answers at once ERROR
  ``not_in_flight`` under that request id, the request's terminal for a client still waiting
  for it. A CANCEL racing its turn's END thus gets a second terminal for the same request id:
  clients drop replies for a request whose terminal they already had. A stranger's CANCEL gets
  ERROR ``not_owner``; a CANCEL with a non-empty body is dropped unanswered.
- RESET (empty): forget the session's cache; answer RESET_OK (next turn cold ``reset``).
- CLOSE (empty): forget the session and its pin; answer CLOSE_OK.
- PING (empty): answered PONG by the broker (checks the broker, not a worker).
- LOOKUP :class:`Lookup` {digest} (empty session id): answered FOUND :class:`Found` {session or
  nil} by the broker: the caller's session recorded for that transcript digest, if any.
- INDEX :class:`Index` {digest} on a session: the broker records that the session holds the
  transcript (as the client received it) and answers INDEX_OK; ERROR ``not_owner`` if another
  principal owns the session. Entries are per principal, bounded (least recently used out) and
  dropped when the broker forgets the session; see :mod:`.transcripts`.
- STATUS (empty; empty session id allowed): answered FLEET :class:`Fleet` {broker, workers,
  unlisted, totals} by the broker: every registered worker with its last heartbeat's gauges,
  the broker's own counters, and counters added up over every worker process (see
  :mod:`.status`).

Service -> client:

- TOKEN :class:`Token` {seq, text, ids}: seq counts from 0 per request without gaps.
- END :class:`TurnEnd` {seq (= TOKEN frames sent), finish_reason stop|length|cancelled,
  reply_sha256, stats: :class:`TurnStats` {prompt_tokens, cached_tokens, prefill_tokens,
  generated_tokens, path cold|text_prefix|token_prefix, cold_reason new|evicted|reset|cancelled|
  diverged|worker_lost|nil, ttft_ms, decode_ms, worker}}.
- OVERFLOW :class:`Overflow` {prompt_tokens, max_tokens, n_ctx}: nothing changed.
- ERROR :class:`ErrorReply` {code (:class:`ErrorCode`), message}.
- SESSION_LOST :class:`SessionLost` {worker, reason (:class:`LostReason`), retryable}.
- BUSY (empty): the session already has a request in flight; this one was not run.
- RESET_OK, CLOSE_OK, PONG, INDEX_OK (empty); FOUND (see LOOKUP); FLEET (see STATUS).

Worker <-> broker control:

- READY :class:`Ready` {worker, pid, epoch, capacity, model, n_ctx, sessions?}: first message on
  every new socket; a new epoch each time. Answered at once with HEARTBEAT; the same connection
  and epoch again changes nothing. A known worker id from a new connection = restart (its old
  turns end SESSION_LOST), unless the old connection is still there and heard from: then the
  READY is refused with ERROR ``not_owner``. ``sessions`` (optional, <= 2048): the sessions the
  worker still holds (:class:`Resident` [id, owner, kv_bytes, idle_ms, last_turn_ns]); the broker
  pins them to it again, or sends a CLOSE for each one it gives to another worker.
- HEARTBEAT: worker -> broker :class:`Heartbeat` {load, sessions, kv_bytes, gauges?}; broker ->
  worker an empty body. ``gauges`` (optional, :class:`WorkerGauges`): what the fleet view shows
  of the worker. Every ``heartbeat_interval`` (1 s); a peer silent for ``liveness`` (3) intervals is
  dead. Any message counts as a heartbeat.
- DISCONNECT :class:`Disconnect` {reason}: a worker leaving; or the broker saying "unknown
  worker": the worker ends its turns, recreates its socket, sends READY again (announcing its
  sessions).
- ERROR (control form, 2 frames): answer to a malformed control message.

Identity, ownership and limits
------------------------------
A session belongs to the client identity (*principal*) that created it with its first TURN:

- with CURVE (``kvroute broker --curve-secret FILE --allow-keys DIR --allow-worker-keys
  WDIR``; both ROUTERs are CURVE servers behind a ZAP handler that lets in only the clients'
  keys in DIR on the frontend and the workers' keys in WDIR on the backend), the principal is the
  client's authenticated public key (z85), which the broker reads per message as the
  ``User-Id`` property. Any connection holding the key may drive the key's sessions.
- without CURVE, the principal is the client's routing id on the frontend. The library client
  sets it (``ZMQ_ROUTING_ID``) to an *owner token*: 128 random bits, :mod:`~.identity`. It is a
  bearer secret the client presents on every request without a single extra frame (the ROUTER
  prepends it), stable across reconnects, and never echoed to other clients (workers see it in
  the ``client`` frame). One connection at a time may present a token (the ROUTER ignores a
  second one with the same routing id), so a token resumes sessions sequentially, e.g. from a
  new process. A DEALER that sets none gets ZeroMQ's per-connection id, so owns its sessions
  for as long as it stays connected. A client may instead present its token in an *owner
  frame* on every request (the 5-frame form; 1..255 bytes, first byte not zero): then the token
  is the principal whatever the routing id, so any number of connections presenting it share
  its sessions at once (several gateways fronting one broker). The library does this when it
  is given an owner token; the broker passes the token to workers as the delivery's principal.
  Under CURVE an owner frame is refused (``bad_frame``). This keeps sessions apart from
  clients that know or guess their ids; against eavesdroppers and rogue workers, use CURVE.

A TURN, RESET, CLOSE, CANCEL or INDEX on a session another principal owns is answered ERROR
``not_owner`` and changes nothing (checked first: a stranger does not even learn BUSY). A
session id is free again once the broker forgets it: after CLOSE, after it was idle longer than
the pin TTL or pushed out by the pin count (the broker then sends its worker a CLOSE of its own,
with an empty client frame, and drops the CLOSE_OK), and after a RESET of a session whose
worker was lost. When the TURN that created a session is refused without running (OVERFLOW, or
ERROR overloaded, bad_body, out_of_range or too_large: the worker kept nothing), the broker
forgets the session too: its id and the client's session count are as before that TURN.

Per principal, the broker enforces (``BrokerConfig``): sessions pinned (a TURN creating one
more gets ERROR ``limit``), and TURN/RESET/CLOSE requests in flight (ERROR ``limit``); request
bodies above ``max_body_bytes`` (<= 1 MiB) get ``too_large``. Without CURVE these bound
accidents, since a client can open more connections; with CURVE they bound each key.

Errors and limits
-----------------
Untrusted bytes are validated at the edge and answered with ERROR to their sender only; a frame
above the socket's ``MAXMSGSIZE`` (4 MiB) is dropped by ZeroMQ. Validation raises
:class:`ProtocolViolation` (``code``, ``message``); codes are in :class:`ErrorCode`: bad_frame,
bad_version, unknown_kind, bad_body, out_of_range, too_large, no_worker, overloaded,
slow_consumer, shutting_down, not_owner, limit, not_in_flight, internal. Unknown body fields are
rejected (a typo must not become a default); a new field means a new version. Two exceptions,
left out when empty so that a sender not using them sends the bytes of before: READY's
``sessions`` (a broker that rejects it makes the worker register again without it) and TURN's
``stop`` (a worker that rejects it answers ``bad_body``: stop strings are never ignored); and
HEARTBEAT's ``gauges`` (a broker that rejects it makes the worker stop sending them).

Limits: session id 1..64 bytes, request id 1..32 bytes, body <= 1 MiB (:mod:`.limits`). Each
body's fields, types, limits and defaults are declared once, as a msgspec ``Struct`` in
:mod:`.messages` or :mod:`.control` (see :mod:`.fields`); the reference tables in
``docs/design.md`` are generated from those declarations (:mod:`.reference`).

Who checks what: the broker checks headers and routing-frame sizes of every message (cheap
length comparisons), ownership and per-client limits of every request, and decodes only control
bodies addressed to it; a request's body is validated by the worker, a reply's by the client.
"""

from .control import (
    Disconnect,
    ErrorReply,
    Heartbeat,
    LostReason,
    Ready,
    Resident,
    SessionLost,
    error_body,
)
from .errors import RETRYABLE_CODES, ErrorCode, ProtocolViolation
from .fields import EMPTY_BODY, decode_empty
from .frames import (
    ClientRequest,
    Control,
    Delivery,
    Reply,
    WorkerControl,
    WorkerReply,
    control_frames,
    parse_delivery,
    parse_reply,
    reply_frames,
    request_frames,
)
from .kinds import FLAG_WORKER_LOST, HEADERS, TERMINAL_KINDS, VERSION, Kind
from .messages import (
    CachePath,
    ChatMessage,
    ColdReason,
    FinishReason,
    KvSource,
    Overflow,
    Role,
    Token,
    TurnEnd,
    TurnRequest,
    TurnStats,
    reply_sha256,
)
from .status import (
    BrokerCounters,
    Fleet,
    TurnOutcome,
    WorkerCounters,
    WorkerGauges,
    WorkerView,
)
from .transcripts import Found, Index, Lookup

__all__ = [
    "EMPTY_BODY",
    "FLAG_WORKER_LOST",
    "HEADERS",
    "RETRYABLE_CODES",
    "TERMINAL_KINDS",
    "VERSION",
    "BrokerCounters",
    "CachePath",
    "ChatMessage",
    "ClientRequest",
    "ColdReason",
    "Control",
    "Delivery",
    "Disconnect",
    "ErrorCode",
    "ErrorReply",
    "FinishReason",
    "Fleet",
    "Found",
    "Heartbeat",
    "Index",
    "Kind",
    "KvSource",
    "Lookup",
    "LostReason",
    "Overflow",
    "ProtocolViolation",
    "Ready",
    "Reply",
    "Resident",
    "Role",
    "SessionLost",
    "Token",
    "TurnEnd",
    "TurnOutcome",
    "TurnRequest",
    "TurnStats",
    "WorkerControl",
    "WorkerCounters",
    "WorkerGauges",
    "WorkerReply",
    "WorkerView",
    "control_frames",
    "decode_empty",
    "error_body",
    "parse_delivery",
    "parse_reply",
    "reply_frames",
    "reply_sha256",
    "request_frames",
]
