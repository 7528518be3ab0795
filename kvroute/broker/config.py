"""Broker configuration and counters."""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.proto.endpoint import parse_endpoint
from kvroute.proto.limits import (
    HEARTBEAT_INTERVAL_S,
    LIVENESS,
    MAX_BODY_BYTES,
    MAX_MSG_SIZE,
    check_heartbeat,
)


@dataclass
class BrokerConfig:
    """Addresses and knobs of the broker (the CLI takes its defaults from here).

    Raises ValueError at construction for settings that cannot work together.
    """

    frontend: str = "tcp://127.0.0.1:5555"  # clients' DEALERs connect here
    backend: str = "tcp://127.0.0.1:5556"  # workers' DEALERs connect here
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S  # seconds between HEARTBEATs to each worker
    liveness: int = LIVENESS  # silent intervals before a worker is declared lost
    max_msg_size: int = MAX_MSG_SIZE  # socket MAXMSGSIZE: bigger frames are dropped by ZeroMQ
    hwm: int = 1000  # messages queued per peer before sends raise zmq.Again
    linger_ms: int = 100  # time given to goodbye messages when the sockets close
    batch: int = 256  # messages drained from one socket before looking at the other
    lost_memory: int = 65536  # lost sessions remembered for the worker_lost flag
    # --- limits. A client is its CURVE key, or without CURVE its connection identity
    # (the library client's owner token), so without CURVE they bound accidents, not attackers.
    max_body_bytes: int = MAX_BODY_BYTES  # request bodies above get ERROR too_large (<= 1 MiB)
    max_sessions_per_client: int = 4096  # sessions pinned per client; a new one beyond: limit
    max_requests_per_client: int = 256  # TURN/RESET/CLOSE in flight per client; beyond: limit
    pin_ttl_s: float = 3600.0  # a session idle this long is forgotten (and closed on its worker)
    max_pins: int = 100_000  # sessions pinned in all; the least recently used idle ones go first
    max_transcripts: int = 65536  # transcript digests indexed (LOOKUP/INDEX), LRU out
    # --- CURVE: curve_secret and allow_keys both or neither. Clients and workers have separate
    # allow-lists: a client key on the backend could register as a worker and read every turn.
    curve_secret: str | None = None  # the broker's secret certificate (NAME.key_secret)
    allow_keys: str | None = None  # directory of the clients' public certificates (frontend)
    allow_worker_keys: str | None = None  # directory of the workers' public certificates (backend)
    extra_worker_keys: tuple[bytes, ...] = ()  # z85 keys also let in on the backend (serve's own)

    def __post_init__(self) -> None:
        self.frontend = parse_endpoint(self.frontend, bind=True)
        self.backend = parse_endpoint(self.backend, bind=True)
        check_heartbeat(self.heartbeat_interval, self.liveness)
        if (self.curve_secret is None) != (self.allow_keys is None):
            raise ValueError("CURVE needs both curve_secret and allow_keys (or neither)")
        if self.allow_worker_keys is not None and self.curve_secret is None:
            raise ValueError("allow_worker_keys needs CURVE (curve_secret and allow_keys)")
        if not 0 < self.max_body_bytes <= MAX_BODY_BYTES:
            raise ValueError(f"max_body_bytes must be 1..{MAX_BODY_BYTES}")
        if self.max_msg_size < self.max_body_bytes:
            # Bodies in between would vanish with the connection instead of getting an ERROR.
            raise ValueError("max_msg_size must be >= max_body_bytes")
        for name in (
            "max_sessions_per_client",
            "max_requests_per_client",
            "max_pins",
            "max_transcripts",
            "batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.pin_ttl_s > 0:
            raise ValueError("pin_ttl_s must be positive")
        if self.hwm < 0 or self.lost_memory < 0:
            raise ValueError("hwm and lost_memory must be >= 0")

    @property
    def expiry_s(self) -> float:
        """Silence after which a worker is lost."""
        return self.heartbeat_interval * self.liveness

    @property
    def curve(self) -> bool:
        """Whether both ROUTERs are CURVE servers with ZAP authentication."""
        return self.curve_secret is not None


@dataclass
class BrokerStats:
    """Counters updated by the broker thread (read them from anywhere, approximately)."""

    client_messages: int = 0
    worker_messages: int = 0
    errors_sent: int = 0
    workers_lost: int = 0
    sessions_lost_sent: int = 0
    cancels_sent: int = 0  # on behalf of vanished or slow clients
    pins_forgotten: int = 0  # idle sessions forgotten (pin_ttl_s / max_pins)
    keys_refused: int = 0  # CURVE handshakes refused by ZAP (updated by the ZAP thread)
    sessions_repinned: int = 0  # sessions workers announced in READY and the broker pinned
    connections_closed: int = 0  # connections the socket monitors saw close (both sockets)
    lookups: int = 0  # LOOKUP requests answered
    lookups_found: int = 0  # of those, answered with a session
