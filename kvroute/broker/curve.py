"""The broker's CURVE side: its key pair, the public keys it lets in, and the ZAP handler.

Both ROUTERs become CURVE servers (``curve_server`` and the secret key set before ``bind``), each
with its own ZAP domain. Without a ZAP handler anyone who knows the broker's public key gets in,
so a :class:`zmq.auth.thread.ThreadAuthenticator` runs in the broker's context (the handler
listens on ``inproc://zeromq.zap.01``, which is per context) and asks :meth:`CurveServer.callback`
about every handshake. The frontend lets in the keys of ``allow_keys`` (clients); the backend
those of ``allow_worker_keys`` plus ``extra_worker_keys`` (the throwaway pair ``kvroute serve``
makes for its own workers). The two lists are kept apart, and a key in both is a configuration
error: a worker sees every turn in plain text and answers for it, so a client key that also opened
the backend would let its holder register as a worker, be placed other users' sessions and
answer them.

A refused peer learns nothing: the handshake fails, ZeroMQ retries quietly, and its requests
are never delivered (its client times out). The authenticated key, z85 text, reaches the
broker with every message as the ``User-Id`` property; it is the client's identity for session
ownership and limits.
"""

from __future__ import annotations

import logging

import zmq
from zmq.auth.thread import ThreadAuthenticator

from kvroute.proto.identity import KeyFileError, load_allowed_keys, load_key_pair

from .config import BrokerConfig, BrokerStats

logger = logging.getLogger(__name__)

FRONTEND_DOMAIN: str = "kvroute-clients"
BACKEND_DOMAIN: str = "kvroute-workers"
_LOGGED_REFUSALS = 1024  # distinct refused keys worth a warning each; later ones log at debug


class CurveServer:
    """Keys and ZAP policy of one broker. Build it with :meth:`load`; the broker thread calls
    :meth:`start` / :meth:`apply` / :meth:`stop`.

    Parameters
    ----------
    public, secret
        The broker's key pair (z85).
    allowed
        ``{ZAP domain: public keys (z85) let in}``.
    stats
        ``keys_refused`` is counted here (from the ZAP thread).
    """

    def __init__(
        self,
        public: bytes,
        secret: bytes,
        allowed: dict[str, frozenset[bytes]],
        stats: BrokerStats,
    ) -> None:
        self.public = public
        self._secret = secret
        self.allowed = allowed
        self._stats = stats
        self._refused: set[bytes] = set()
        self._auth: ThreadAuthenticator | None = None

    @classmethod
    def load(cls, config: BrokerConfig, stats: BrokerStats) -> CurveServer | None:
        """Read the key files named in ``config``; None if CURVE is off.

        Raises
        ------
        KeyFileError
            A missing, unreadable or malformed key file or directory; no worker key at all
            (neither ``allow_worker_keys`` nor ``extra_worker_keys``); or a key allowed both as
            a client and as a worker.
        """
        if config.curve_secret is None or config.allow_keys is None:
            return None
        public, secret = load_key_pair(config.curve_secret)
        clients = load_allowed_keys(config.allow_keys)
        workers = frozenset(config.extra_worker_keys)
        if config.allow_worker_keys is not None:
            workers |= load_allowed_keys(config.allow_worker_keys)
        if not workers:
            raise KeyFileError(
                "no worker keys: give the directory of the workers' public certificates"
                " (--allow-worker-keys); client keys are not let in on the backend"
            )
        both = sorted(clients & workers)
        if both:
            raise KeyFileError(
                f"key {both[0].decode()} is allowed both as a client and as a worker: keep the"
                " two directories apart (a client must not be able to register as a worker)"
            )
        return cls(public, secret, {FRONTEND_DOMAIN: clients, BACKEND_DOMAIN: workers}, stats)

    def start(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        """Start the ZAP handler in ``ctx`` (before any CURVE socket binds)."""
        auth = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
        self._auth = auth  # first, so stop() cleans up after a start that failed half-way
        auth.start()
        for domain in self.allowed:
            auth.configure_curve_callback(domain, self)
        logger.info(
            "CURVE on: %d client keys, %d worker keys allowed",
            len(self.allowed[FRONTEND_DOMAIN]),
            len(self.allowed[BACKEND_DOMAIN]),
        )

    def apply(self, sock: zmq.Socket[bytes], domain: str) -> None:
        """Make ``sock`` a CURVE server checked by ZAP in ``domain`` (call before ``bind``)."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question (in its thread): may ``key`` (z85) connect in ``domain``?"""
        if key in self.allowed.get(domain, frozenset()):
            return True
        self._stats.keys_refused += 1
        if key not in self._refused and len(self._refused) < _LOGGED_REFUSALS:
            self._refused.add(key)
            logger.warning("CURVE key %s refused on %s (not in the allowed keys)", key, domain)
        else:
            logger.debug("CURVE key %s refused on %s", key, domain)
        return False

    def stop(self) -> None:
        """Stop the ZAP handler (idempotent; before the context terminates)."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
