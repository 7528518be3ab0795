"""Broker configuration and counters."""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.proto.limits import MAX_MSG_SIZE


@dataclass
class BrokerConfig:
    """Addresses and knobs of the broker (the CLI takes its defaults from here)."""

    frontend: str = "tcp://127.0.0.1:5555"  # clients' DEALERs connect here
    backend: str = "tcp://127.0.0.1:5556"  # workers' DEALERs connect here
    heartbeat_interval: float = 1.0  # seconds between HEARTBEATs to each worker
    liveness: int = 3  # silent intervals before a worker is declared lost
    max_msg_size: int = MAX_MSG_SIZE  # socket MAXMSGSIZE: bigger frames are dropped by ZeroMQ
    hwm: int = 1000  # messages queued per peer before sends raise zmq.Again
    linger_ms: int = 100  # time given to goodbye messages when the sockets close
    batch: int = 256  # messages drained from one socket before looking at the other
    lost_memory: int = 65536  # lost sessions remembered for the worker_lost flag

    @property
    def expiry_s(self) -> float:
        """Silence after which a worker is lost."""
        return self.heartbeat_interval * self.liveness


@dataclass
class BrokerStats:
    """Counters updated by the broker thread (read them from anywhere, approximately)."""

    client_messages: int = 0
    worker_messages: int = 0
    errors_sent: int = 0
    workers_lost: int = 0
    sessions_lost_sent: int = 0
    cancels_sent: int = 0  # on behalf of vanished or slow clients
