"""The option sets of the service's processes: the heartbeat (broker, serve, worker), the
broker's (broker, serve) and the worker's (serve, worker).

Each set is handed to the command as one dict of config keywords (see
:func:`.options.option_group`), its defaults taken from ``BrokerConfig`` and ``WorkerConfig``.
"""

from __future__ import annotations

from typing import Any

import click

from kvroute.broker.config import BrokerConfig
from kvroute.engine.cache import KV_DTYPE_ASKS
from kvroute.engine.kv_codec import RestDtype
from kvroute.proto.limits import MAX_BODY_BYTES, MAX_CAPACITY, MIN_HEARTBEAT_INTERVAL_S
from kvroute.worker.config import KV_DEFAULT_RULE, WorkerConfig

from .options import FiniteRange, option_group

_B = BrokerConfig()
_W = WorkerConfig()

# --- heartbeat (broker and worker; serve gives both the same) ---

heartbeat_options = option_group(
    "heartbeat_kw",
    (
        (
            "heartbeat_interval",
            click.option(
                "--heartbeat",
                "heartbeat_interval",
                type=FiniteRange(min=MIN_HEARTBEAT_INTERVAL_S),
                default=_B.heartbeat_interval,
                show_default=True,
                help="Seconds between heartbeats (broker and workers must agree).",
            ),
        ),
        (
            "liveness",
            click.option(
                "--liveness",
                type=click.IntRange(min=1),
                default=_B.liveness,
                show_default=True,
                help="Silent heartbeat intervals before the other side is presumed dead.",
            ),
        ),
    ),
)
"""``--heartbeat --liveness``, handed over as ``heartbeat_kw`` (keywords of both configs)."""

# --- broker ---


def _check_broker(kw: dict[str, Any]) -> None:
    if (kw["curve_secret"] is None) != (kw["allow_keys"] is None):
        raise click.UsageError("--curve-secret and --allow-keys go together")
    if kw["allow_worker_keys"] is not None and kw["curve_secret"] is None:
        raise click.UsageError("--allow-worker-keys needs --curve-secret and --allow-keys")
    if kw["max_msg_size"] < kw["max_body_bytes"]:
        raise click.UsageError("--max-msg-size must be at least --max-body-bytes")


def _check_worker(kw: dict[str, Any]) -> None:
    if kw["checkpoint"] and kw["spill_dir"] is None:
        raise click.UsageError("--checkpoint needs --spill-dir (shared by the workers)")


broker_options = option_group(
    "broker_kw",
    (
        (
            "curve_secret",
            click.option(
                "--curve-secret",
                metavar="FILE",
                default=None,
                help="The broker's secret certificate (server.key_secret): clients and workers "
                "must speak CURVE with an allowed key. Needs --allow-keys.",
            ),
        ),
        (
            "allow_keys",
            click.option(
                "--allow-keys",
                metavar="DIR",
                default=None,
                help="Directory of the public certificates (*.key) of the clients let in.",
            ),
        ),
        (
            "allow_worker_keys",
            click.option(
                "--allow-worker-keys",
                metavar="DIR",
                default=None,
                help="Directory of the public certificates (*.key) of the workers let in (a key "
                "may not be in both). Needed by `broker` with CURVE; `serve` lets its own "
                "workers in.",
            ),
        ),
        (
            "max_sessions_per_client",
            click.option(
                "--max-sessions-per-client",
                type=click.IntRange(min=1),
                default=_B.max_sessions_per_client,
                show_default=True,
                help="Sessions one client (CURVE key, or connection) may have open.",
            ),
        ),
        (
            "max_requests_per_client",
            click.option(
                "--max-requests-per-client",
                type=click.IntRange(min=1),
                default=_B.max_requests_per_client,
                show_default=True,
                help="Turns (and resets, closes) one client may have in flight.",
            ),
        ),
        (
            "max_body_bytes",
            click.option(
                "--max-body-bytes",
                type=click.IntRange(1, MAX_BODY_BYTES),
                default=_B.max_body_bytes,
                show_default=True,
                help="Largest request body; bigger ones get ERROR too_large.",
            ),
        ),
        (
            "max_msg_size",
            click.option(
                "--max-msg-size",
                type=click.IntRange(min=1),
                default=_B.max_msg_size,
                show_default=True,
                help="Socket limit per frame: ZeroMQ drops bigger ones and the peer's connection.",
            ),
        ),
        (
            "pin_ttl_s",
            click.option(
                "--pin-ttl",
                "pin_ttl_s",
                type=FiniteRange(min=0, min_open=True),
                default=_B.pin_ttl_s,
                show_default=True,
                help="Seconds an idle session stays pinned; then it is forgotten and closed.",
            ),
        ),
        (
            "max_pins",
            click.option(
                "--max-pins",
                type=click.IntRange(min=1),
                default=_B.max_pins,
                show_default=True,
                help="Sessions pinned in all; beyond it the least recently used idle ones are "
                "closed.",
            ),
        ),
    ),
    _check_broker,
)
"""CURVE and per-client limits, handed over as ``broker_kw`` (BrokerConfig keywords)."""

# --- worker ---

worker_options = option_group(
    "worker_kw",
    (
        (
            "capacity",
            click.option(
                "--capacity",
                type=click.IntRange(1, MAX_CAPACITY),
                default=_W.capacity,
                show_default=True,
                help=(
                    "Turns a worker runs at once; more wait in a queue fair across clients"
                    f" (up to {_W.max_waiting}, {_W.max_waiting_per_client} per client,"
                    f" {_W.max_wait_s:g} s), then get the retryable ERROR overloaded."
                ),
            ),
        ),
        (
            "kv_budget_mb",
            click.option(
                "--kv-budget-mb",
                type=FiniteRange(min=0),
                default=_W.kv_budget_mb,
                show_default=KV_DEFAULT_RULE,
                help="KV cache budget per worker in MiB; idle sessions are evicted LRU beyond "
                "it, and turns wait while it is reserved by turns running.",
            ),
        ),
        (
            "kv_dtype",
            click.option(
                "--kv-dtype",
                type=click.Choice(KV_DTYPE_ASKS),
                default=_W.kv_dtype,
                show_default=True,
                help="How live KV caches hold keys and values: f16 halves their bytes and the "
                "attention kernels read it as stored; with --kernels off numpy widens it to "
                "f32 at every step, which slows long contexts. auto: f16 where the kernels "
                "run, else f32.",
            ),
        ),
        (
            "kv_rest",
            click.option(
                "--kv-rest",
                type=click.Choice([d.value for d in RestDtype]),
                default=_W.kv_rest,
                show_default=True,
                help="How idle sessions are compressed when the KV budget is short, before "
                "any is evicted (none: evicted at once).",
            ),
        ),
        (
            "spill_dir",
            click.option(
                "--spill-dir",
                type=click.Path(file_okay=False),
                default=_W.spill_dir,
                help="Write sessions that must leave RAM here (one subdirectory per worker) "
                "instead of dropping them; their next turn reads them back.",
            ),
        ),
        (
            "spill_mb",
            click.option(
                "--spill-mb",
                type=FiniteRange(min=0, min_open=True),
                default=_W.spill_mb,
                show_default=True,
                help="Disk budget of one worker's spill files in MiB (least recently written "
                "dropped beyond it).",
            ),
        ),
        (
            "checkpoint",
            click.option(
                "--checkpoint/--no-checkpoint",
                default=_W.checkpoint,
                show_default=True,
                help="At each turn end, append the session's new KV to a checkpoint in "
                "--spill-dir, so that another worker sharing it resumes the session warm if "
                "this one dies.",
            ),
        ),
        (
            "checkpoint_mb",
            click.option(
                "--checkpoint-mb",
                type=FiniteRange(min=0, min_open=True),
                default=_W.checkpoint_mb,
                show_default=True,
                help="Disk budget in MiB of all checkpoints in --spill-dir (shared by the "
                "workers; least recently written deleted beyond it).",
            ),
        ),
        (
            "checkpoint_ttl_s",
            click.option(
                "--checkpoint-ttl",
                "checkpoint_ttl_s",
                type=FiniteRange(min=0, min_open=True),
                default=_W.checkpoint_ttl_s,
                show_default=True,
                help="Seconds after its last write a checkpoint is deleted (its session never "
                "came back).",
            ),
        ),
        (
            "prefill_chunk",
            click.option(
                "--prefill-chunk",
                type=click.IntRange(min=1),
                default=_W.prefill_chunk,
                show_default=True,
                help="Prompt tokens per scheduler step (bounds the time between socket polls).",
            ),
        ),
        (
            "threads",
            click.option(
                "--threads",
                type=click.IntRange(min=1),
                default=_W.threads,
                show_default=True,
                help="BLAS threads per worker.",
            ),
        ),
    ),
    _check_worker,
)
"""``--capacity --kv-budget-mb --kv-dtype --kv-rest --spill-dir --spill-mb --checkpoint
--checkpoint-mb --checkpoint-ttl --prefill-chunk --threads``, handed over as ``worker_kw``
(WorkerConfig keywords)."""
