"""Worker configuration (the CLI takes its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.engine.engine import DEFAULT_N_CTX
from kvroute.proto.identity import KeyPair


@dataclass
class WorkerConfig:
    """How a worker process connects, what it loads and how it runs."""

    connect: str = "tcp://127.0.0.1:5556"  # the broker's backend ROUTER
    worker_id: str = ""  # stable id shown by serve and reported in END; "" = w<pid>
    model: str = "default"  # GGUF path or "default"
    n_ctx: int = DEFAULT_N_CTX  # positions per session (prompt + reply)
    kv_budget_mb: float | None = None  # KV cache for all sessions; idle LRU ones evicted beyond
    prefill_chunk: int = 256  # prompt tokens per step: bounds the time between socket polls
    threads: int = 1  # BLAS threads: N workers on few cores must not fight over them
    capacity: int = 16  # turns run together (advertised in READY; more queue in the broker)
    heartbeat_interval: float = 1.0  # seconds between HEARTBEATs to the broker
    liveness: int = 3  # silent intervals before the broker is presumed gone (re-register)
    linger_ms: int = 100  # time given to the last frames when the socket closes
    hwm: int = 10_000  # frames queued towards the broker before a send would block
    # CURVE (both or neither): the broker's public key (a .key file or z85 text), and this
    # worker's key pair (a .key_secret file, or (public, secret) z85 as serve passes its own).
    server_key: str | None = None
    key: str | KeyPair | None = None

    @property
    def kv_budget_bytes(self) -> int | None:
        """The KV budget in bytes, or None for unbounded."""
        return None if self.kv_budget_mb is None else int(self.kv_budget_mb * (1 << 20))
