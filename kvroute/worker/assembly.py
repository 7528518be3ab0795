"""Build a worker's `Scheduler` from its `WorkerConfig`: KV budget, spill files, checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

from kvroute.engine.engine import Engine
from kvroute.engine.kv_codec import RestDtype
from kvroute.engine.model_store import sha256_of

from .checkpoint import Checkpoints
from .config import MIB, WorkerConfig
from .scheduler import Scheduler, SchedulerConfig
from .spill import SpillDir, SpillIdentity

logger = logging.getLogger(__name__)


def build_scheduler(engine: Engine, config: WorkerConfig, worker_id: str) -> Scheduler:
    """The scheduler a worker serves ``engine`` with, as ``config`` describes it."""
    # Spill files and checkpoints both live under --spill-dir; hash the model only if used.
    ident = spill_identity(engine) if config.spill_dir is not None else None
    kv_dtype = engine.live_kv_dtype(config.kv_dtype)
    logger.info("worker %s: live KV caches hold %s", worker_id, kv_dtype)
    cfg = SchedulerConfig(
        config.prefill_chunk,
        config.kv_budget_bytes,
        config.admission,
        kv_rest=RestDtype(config.kv_rest),
        kv_dtype=kv_dtype,
        spill=_spill_dir(config, worker_id, ident),
        checkpoints=_checkpoints(config, worker_id, ident),
    )
    return Scheduler(engine, cfg, worker_id)


def spill_identity(engine: Engine) -> SpillIdentity:
    """What a worker's spill and checkpoint files are written for."""
    assert engine.path is not None, "a served engine comes from a file"
    a = engine.model.args
    return SpillIdentity(sha256_of(engine.path), engine.n_ctx, a.n_layers, a.n_kv_heads, a.head_dim)


def _spill_dir(c: WorkerConfig, worker_id: str, ident: SpillIdentity | None) -> SpillDir | None:
    """This worker's spill files (``--spill-dir``/spill-<worker id>), or None."""
    if c.spill_dir is None or ident is None:
        return None
    directory = Path(c.spill_dir) / f"spill-{worker_id}"
    logger.info("worker %s: spilling to %s (%g MiB)", worker_id, directory, c.spill_mb)
    return SpillDir(directory, int(c.spill_mb * MIB), ident)


def _checkpoints(
    c: WorkerConfig, worker_id: str, ident: SpillIdentity | None
) -> Checkpoints | None:
    """The checkpoints every worker sharing ``--spill-dir`` reads (``checkpoints/``)."""
    if not c.checkpoint or c.spill_dir is None or ident is None:
        return None
    directory = Path(c.spill_dir) / "checkpoints"
    logger.info(
        "worker %s: checkpoints in %s (%g MiB, %g s)",
        worker_id,
        directory,
        c.checkpoint_mb,
        c.checkpoint_ttl_s,
    )
    return Checkpoints(
        directory, ident, RestDtype(c.kv_rest), int(c.checkpoint_mb * MIB), c.checkpoint_ttl_s
    )
