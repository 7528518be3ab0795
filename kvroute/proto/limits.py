"""Every size and range limit of the protocol, in one place.

Frame-level limits are checked by the broker without decoding bodies (a length comparison);
body-level limits are checked by whoever decodes the body (the worker for requests, the client
for replies). The socket-level :data:`MAX_MSG_SIZE` is enforced by ZeroMQ itself: a peer that sends
a bigger frame is disconnected and the frame dropped, with no ERROR (there is no one to tell).
"""

from __future__ import annotations

import math

# --- frames (checked by the broker on every message) ---
MAX_SESSION_ID_BYTES: int = 64
"""Session id frame: 1..64 bytes (0 allowed only on PING). Clients pick them, e.g. uuid4 hex."""
MAX_REQUEST_ID_BYTES: int = 32
"""Request id frame: 1..32 bytes, unique per session among requests in flight."""
MAX_BODY_BYTES: int = 1 << 20
"""Body frame (msgpack map) at most 1 MiB; above it the broker answers ERROR ``too_large``."""
MAX_MSG_SIZE: int = 4 << 20
"""Socket ``MAXMSGSIZE`` default: frames above 4 MiB are dropped by ZeroMQ (peer disconnected),
so a hostile peer cannot make the broker allocate without bound."""

# --- TURN body ---
MAX_MESSAGES: int = 1024
"""Chat messages per TURN."""
MAX_TEXT_CHARS: int = 256 * 1024
"""Characters of ``content`` summed over all messages of a TURN (n_ctx overflows long before)."""
MAX_MAX_TOKENS: int = 32768
"""Upper bound of ``max_tokens`` (lower bound 1); the worker's n_ctx is the real cap (OVERFLOW)."""
MAX_TEMPERATURE: float = 100.0
"""``temperature`` in [0, 100], finite; 0 means greedy."""
MAX_TOP_K: int = 1 << 20
"""``top_k`` in [0, 2**20]; 0 disables top-k."""
MAX_SEED: int = (1 << 64) - 1
"""``seed`` in [0, 2**64 - 1] or nil (nil: the worker picks)."""

MAX_STOP: int = 4
"""Stop strings per TURN (OpenAI's limit)."""
MAX_STOP_CHARS: int = 256
"""Characters of one stop string (at least 1). The worker holds back up to this many characters
of the stream minus one, while they could still begin a stop string."""

# --- transcript index (LOOKUP / INDEX, answered by the broker) ---
MIN_DIGEST_BYTES: int = 16
MAX_DIGEST_BYTES: int = 32
"""A transcript digest: 16..32 bytes, opaque to the broker (clients hash what they received)."""

# --- replies and control ---
MAX_TOKEN_IDS: int = 4096
"""Token ids carried by one TOKEN frame (a worker may coalesce several tokens)."""
MAX_TOKEN_ID: int = (1 << 31) - 1
MAX_TOKEN_TEXT_CHARS: int = 64 * 1024
"""Characters of ``text`` in one TOKEN frame."""
MAX_SEQ: int = (1 << 32) - 1
MAX_COUNT: int = (1 << 63) - 1
"""Upper bound of token counts, byte counts, loads, epochs and pids."""
MAX_MS: float = 1e9
"""Upper bound of the millisecond timings in turn stats (about 11 days)."""
MAX_NAME_CHARS: int = 128
"""Worker ids, model names and DISCONNECT reasons."""
MAX_ERROR_MESSAGE_CHARS: int = 1024
MAX_CAPACITY: int = 4096
"""READY ``capacity``: turns the worker runs concurrently (>= 1)."""
MAX_N_CTX: int = 1 << 24

# --- heartbeats (docs/design.md, *Failure semantics*): broker and worker must agree ---
HEARTBEAT_INTERVAL_S: float = 1.0
"""Default seconds between HEARTBEATs, each way."""
MIN_HEARTBEAT_INTERVAL_S: float = 0.01
"""Shortest interval accepted: the broker's loop ticks at a quarter of it (at most 0.1 s), so
shorter ones would only spin."""
LIVENESS: int = 3
"""Default silent intervals (>= 1) after which a peer is presumed dead."""


def check_heartbeat(interval: float, liveness: int) -> None:
    """Raise ValueError unless ``interval`` is finite and at least
    :data:`MIN_HEARTBEAT_INTERVAL_S` and ``liveness`` is at least 1 (both configs call this)."""
    if not (math.isfinite(interval) and interval >= MIN_HEARTBEAT_INTERVAL_S):
        raise ValueError(
            f"heartbeat_interval must be at least {MIN_HEARTBEAT_INTERVAL_S:g} s, not {interval!r}"
        )
    if liveness < 1:
        raise ValueError(f"liveness must be at least 1, not {liveness!r}")


# --- READY's resident sessions (a worker re-registering announces the sessions it holds) ---
MAX_OWNER_BYTES: int = 255
"""A session's owner (principal) as the broker knows it: a client's routing id (ZeroMQ's limit
is 255 bytes; the library's owner token is 22) or a z85 CURVE public key (40 characters)."""
MAX_RESIDENT_SESSIONS: int = 2048
"""Sessions one READY may announce. At the worst case (64-byte ids, 255-byte owners, every number
at its widest) 2048 entries encode to about 720 KiB, inside :data:`MAX_BODY_BYTES`, so READY
needs no chunking. A worker holding more announces its most recently used ones and drops the
rest (their next turn runs cold): a session the broker does not know must not stay on a worker,
where a later session with the same id could find it."""
MAX_IDLE_MS: float = 1e10
"""Upper bound of a resident session's ``idle_ms`` (about 116 days)."""

# --- the fleet view (STATUS, answered by the broker with FLEET) ---
MAX_FLEET_WORKERS: int = 256
"""Workers one FLEET lists (the rest are only counted). At the worst case (every name 128
four-byte characters, every number at its widest) 256 entries encode to about 525 KiB, inside
:data:`MAX_BODY_BYTES`."""
