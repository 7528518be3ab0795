"""Worker configuration (the CLI takes its defaults from here), and the default KV budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import psutil

from kvroute.engine import quant
from kvroute.engine.cache import KV_DTYPE_ASKS
from kvroute.engine.engine import DEFAULT_N_CTX, MIN_N_CTX
from kvroute.engine.kv_codec import RestDtype
from kvroute.proto.endpoint import parse_endpoint
from kvroute.proto.identity import KeyPair
from kvroute.proto.limits import (
    HEARTBEAT_INTERVAL_S,
    LIVENESS,
    MAX_CAPACITY,
    MAX_N_CTX,
    check_heartbeat,
)

from .admission import AdmissionConfig
from .checkpoint import DEFAULT_BUDGET_MIB, DEFAULT_TTL_S

MIB = 1 << 20
KV_SHARE = 0.5  # of the machine's memory, for all workers' weights and KV caches together
WORKER_BASE_MIB = 800  # a worker's RSS before any session (default model: f32 weights 513 MiB)
KV_DEFAULT_MIN_MIB = 64
KV_DEFAULT_MAX_MIB = 4096  # beyond a few GiB, more idle sessions kept warm buy little
KV_DEFAULT_RULE = (
    f"{KV_SHARE:g} x RAM / workers on the host - {WORKER_BASE_MIB} MiB,"
    f" within {KV_DEFAULT_MIN_MIB}..{KV_DEFAULT_MAX_MIB} MiB"
)
"""The default budget rule in words (CLI help, the worker's start-up log)."""


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's memory limit if that is lower (containers)."""
    total = int(psutil.virtual_memory().total)
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_kv_budget_mib(host_workers: int, memory_bytes: int | None = None) -> int:
    """The KV budget of one worker when none is given (see `KV_DEFAULT_RULE`).

    Each of ``host_workers`` workers on the machine gets an equal part of ``KV_SHARE`` of its
    memory, less what the worker itself holds; the rest is left to the OS, the broker, clients
    and the copies caches make while they grow.
    """
    memory = machine_memory_bytes() if memory_bytes is None else memory_bytes
    per_worker = KV_SHARE * memory / MIB / max(1, host_workers) - WORKER_BASE_MIB
    return int(min(KV_DEFAULT_MAX_MIB, max(KV_DEFAULT_MIN_MIB, per_worker)))


@dataclass
class WorkerConfig:
    """How a worker process connects, what it loads and how it runs.

    Raises ValueError at construction for a setting that cannot work (a bad address, a
    heartbeat of 0, a capacity of 0, a negative KV budget, ...).
    """

    connect: str = "tcp://127.0.0.1:5556"  # the broker's backend ROUTER
    worker_id: str = ""  # stable id shown by serve and reported in END; "" = w<pid>
    model: str = "default"  # GGUF path or "default"
    n_ctx: int = DEFAULT_N_CTX  # positions per session (prompt + reply)
    kernels: str | None = None  # quantized kernels asked for (quant.ASKS); None: $KVROUTE_QUANT
    kv_budget_mb: float | None = None  # KV cache for all sessions; None: KV_DEFAULT_RULE
    # Live KV: f32, f16 (half the bytes), or auto: f16 where the attention kernels read it as
    # stored, f32 where numpy would have to widen it at every step (see Engine.live_kv_dtype).
    kv_dtype: str = "auto"
    kv_rest: str = RestDtype.Q8_0.value  # idle sessions compressed to this when RAM is short
    spill_dir: str | None = None  # sessions leaving RAM are written here (one subdir per worker)
    spill_mb: float = 4096.0  # disk budget of one worker's spill files (LRU beyond it)
    checkpoint: bool = False  # checkpoint committed KV in spill_dir, for other workers to resume
    checkpoint_mb: float = DEFAULT_BUDGET_MIB  # disk budget of all workers' checkpoints (LRU)
    checkpoint_ttl_s: float = DEFAULT_TTL_S  # checkpoints not written for this long are deleted
    host_workers: int = 1  # workers sharing this machine's memory (serve sets it): default budget
    # Prompt tokens per step: bounds the time between socket polls, which a turn arriving
    # mid-step waits. The kernels cost the same per token at 128 rows as at 256.
    prefill_chunk: int = 128
    threads: int = 1  # BLAS threads: N workers on few cores must not fight over them
    capacity: int = 16  # turns run at once (advertised in READY); more wait in a fair queue
    max_waiting: int = 256  # turns waiting for a slot; beyond, ERROR overloaded (retryable)
    max_waiting_per_client: int = 64  # of those, from one client (session owner)
    max_wait_s: float = 10.0  # a turn waiting longer gets ERROR overloaded
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S  # seconds between HEARTBEATs to the broker
    liveness: int = LIVENESS  # silent intervals before the broker is presumed gone (re-register)
    linger_ms: int = 100  # time given to the last frames when the socket closes
    hwm: int = 10_000  # frames queued towards the broker before a send would block
    # CURVE (both or neither): the broker's public key (a .key file or z85 text), and this
    # worker's key pair (a .key_secret file, or (public, secret) z85 as serve passes its own).
    server_key: str | None = None
    key: str | KeyPair | None = None

    def __post_init__(self) -> None:
        self.connect = parse_endpoint(self.connect)  # one-line error, not a ZMQError later
        check_heartbeat(self.heartbeat_interval, self.liveness)
        if not MIN_N_CTX <= self.n_ctx <= MAX_N_CTX:
            raise ValueError(f"n_ctx must be in {MIN_N_CTX}..{MAX_N_CTX}, not {self.n_ctx}")
        if self.kernels is not None and self.kernels not in quant.ASKS:
            raise ValueError(
                f"kernels must be one of {', '.join(quant.ASKS)}, not {self.kernels!r}"
            )
        if not 1 <= self.capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be in 1..{MAX_CAPACITY}, not {self.capacity}")
        mb = self.kv_budget_mb
        if mb is not None and not (math.isfinite(mb) and mb >= 0):
            raise ValueError(f"kv_budget_mb must be >= 0 MiB (or None), not {mb!r}")
        self.kv_rest = RestDtype(self.kv_rest).value  # ValueError names a bad one
        if self.kv_dtype not in KV_DTYPE_ASKS:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPE_ASKS}, not {self.kv_dtype!r}")
        if self.checkpoint and self.spill_dir is None:
            raise ValueError("checkpoint needs a spill_dir (shared by the workers)")
        if not (math.isfinite(self.spill_mb) and self.spill_mb > 0):
            raise ValueError(f"spill_mb must be > 0 MiB, not {self.spill_mb!r}")
        for name in ("checkpoint_mb", "checkpoint_ttl_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, not {value!r}")
        for name in ("host_workers", "prefill_chunk", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.hwm < 0:
            raise ValueError("hwm must be >= 0")
        _ = self.admission  # its own checks: capacity, queue bounds, max_wait_s

    @property
    def kv_budget_bytes(self) -> int:
        """The KV budget in bytes: ``kv_budget_mb``, or the default for this machine."""
        mb = self.kv_budget_mb
        return int((default_kv_budget_mib(self.host_workers) if mb is None else mb) * MIB)

    def describe_kv_budget(self) -> str:
        """``kv budget N MiB (why)``, for the worker's start-up log."""
        mib = self.kv_budget_bytes // MIB
        if self.kv_budget_mb is not None:
            return f"kv budget {mib} MiB (--kv-budget-mb)"
        memory = machine_memory_bytes() // MIB
        return (
            f"kv budget {mib} MiB (default: {KV_DEFAULT_RULE};"
            f" RAM {memory} MiB, {self.host_workers} workers)"
        )

    @property
    def admission(self) -> AdmissionConfig:
        """Capacity and queue bounds for the scheduler."""
        return AdmissionConfig(
            capacity=self.capacity,
            max_waiting=self.max_waiting,
            max_waiting_per_client=self.max_waiting_per_client,
            max_wait_s=self.max_wait_s,
        )
