"""Checkpoints: each session's committed KV, compressed, in a directory all workers share, so a
session whose worker dies goes on warm on another.

At every turn end the worker appends to the session's file only the positions that turn added
(`Checkpoints.save`); a turn that kept fewer positions than the file holds (an edited history)
rewrites it whole, atomically. When a turn arrives with the broker's word that the session's
worker was lost, the worker it lands on reads the file (`Checkpoints.load`, END ``kv_source``
checkpoint); the scheduler uses it only if the turn's prompt extends its text, control tokens in
place (the text-prefix path), and otherwise goes cold.

One file per session, ``<session id hex>.ckpt``::

    head:    MAGIC (8), format (u16), header length (u32), msgpack `CheckpointHeader`,
             sha256 of all that (32)
    records: length (u32), then a record: its msgpack `Segment` length (u32), the `Segment`
             (first position, the committed text and the ids it adds), key codes, value codes
             of its positions; then the record's sha256 (32)

A record cut short at the end of the file (a worker killed mid-append) is ignored: the records
before it are a whole committed state. Any other fault (a bad head, a record that fails its
checksum, a foreign model or layout, a gap in positions) makes the file unusable: `load` raises
`SpillInvalid` and deletes it.

The directory is bounded (`Checkpoints.sweep`): files not written for ``ttl_s`` are deleted, and
beyond ``budget_bytes`` the least recently written go first (by mtime, across all workers, so
each sweep sees every worker's files). A worker sweeps at most every `SWEEP_INTERVAL_S`, sooner
when its own writes since its last sweep may have passed the budget. Several workers may sweep
at once: deleting a missing file is fine. A writer holds a shared `flock` on ``.lock`` while it
appends or renames, and a sweep deletes only under the exclusive lock, after checking the file's
mtime again: it never deletes a file mid-write, nor one written since it listed the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from kvroute.engine.cache import KVCache, RestKV
from kvroute.engine.durable import PART, write_atomic
from kvroute.engine.kv_codec import Packed, RestDtype, decode, encode, packed_nbytes

from .spill import Spilled, SpillIdentity, SpillInvalid

logger = logging.getLogger(__name__)

MAGIC = b"KVRCKPT1"
FORMAT = 1
SUFFIX = ".ckpt"
_HEAD = struct.Struct("<8sHI")
_U32 = struct.Struct("<I")
_SUM = 32
LOCK = ".lock"  # writers share it, a sweep takes it alone

DEFAULT_BUDGET_MIB = 4096.0
DEFAULT_TTL_S = 24 * 3600.0
SWEEP_INTERVAL_S = 60.0  # between sweeps, unless the budget may have been passed


class CheckpointHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Who a checkpoint file is for."""

    model_sha256: str
    n_ctx: int
    layout: tuple[int, int, int]  # (n_layers, n_kv_heads, head_dim)
    dtype: str
    session_id: bytes


class Segment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One appended record: positions ``start ..`` with their ids, and the text up to them."""

    start: int
    text: str
    ids: list[int]
    k_bytes: int
    v_bytes: int


@dataclass
class _Written:
    """What this process last wrote to a file (it may append only after its own writes)."""

    tokens: list[int]


class Checkpoints:
    """The checkpoint files of a shared directory.

    Parameters
    ----------
    directory:
        Shared by the workers of one service (created if missing).
    ident:
        The model, context and KV layout files must match.
    dtype:
        How positions are stored (``none``: float32).
    budget_bytes:
        Most bytes of checkpoint files in the directory (all workers' together).
    ttl_s:
        Files not written for this long are deleted (sessions that never came back).
    clock:
        Wall-clock time, compared with file mtimes (tests inject their own).
    """

    def __init__(
        self,
        directory: Path,
        ident: SpillIdentity,
        dtype: RestDtype,
        budget_bytes: int = int(DEFAULT_BUDGET_MIB * (1 << 20)),
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ident = ident
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self._written: dict[bytes, _Written] = {}
        self.saved = self.appended_bytes = self.loaded = self.invalid = 0
        self.expired = self.evicted = 0
        self._last_sweep = -float("inf")
        self._estimate = 0  # bytes in the directory at the last sweep, plus ours written since
        self.maybe_sweep()  # what earlier runs left

    @contextlib.contextmanager
    def _lock(self, op: int) -> Iterator[None]:
        """Hold the directory's lock: ``LOCK_SH`` to write a file, ``LOCK_EX`` to delete."""
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, op)
            yield
        finally:
            os.close(fd)  # releases the lock

    def path(self, session_id: bytes) -> Path:
        """The file of a session."""
        return self.directory / (session_id.hex() + SUFFIX)

    def _head(self, session_id: bytes) -> bytes:
        i = self.ident
        header = msgspec.msgpack.encode(
            CheckpointHeader(
                i.model_sha256,
                i.n_ctx,
                (i.n_layers, i.n_kv_heads, i.head_dim),
                self.dtype.value,
                session_id,
            )
        )
        head = _HEAD.pack(MAGIC, FORMAT, len(header)) + header
        return head + hashlib.sha256(head).digest()

    def _record(self, start: int, text: str, tokens: list[int], cache: KVCache) -> bytes:
        end = len(tokens)
        k = encode(cache.k[:, :, start:end], self.dtype).tobytes()
        v = encode(cache.v[:, :, start:end], self.dtype).tobytes()
        seg = msgspec.msgpack.encode(Segment(start, text, tokens[start:end], len(k), len(v)))
        payload = _U32.pack(len(seg)) + seg + k + v
        return _U32.pack(len(payload)) + payload + hashlib.sha256(payload).digest()

    def save(self, session_id: bytes, text: str, tokens: list[int], cache: KVCache) -> None:
        """Record a session's committed (T, K, S) after a turn (best effort: logged on error).

        Appends the positions past what this process last wrote for it when K only grew;
        otherwise writes the file anew.
        """
        assert not cache.parked and cache.length >= len(tokens)
        prev = self._written.get(session_id)
        path = self.path(session_id)
        try:
            with self._lock(fcntl.LOCK_SH):  # no sweep deletes while we write
                # Checked under the lock: another worker's sweep may have deleted the file.
                if prev is not None and tokens[: len(prev.tokens)] == prev.tokens and path.exists():
                    data = self._record(len(prev.tokens), text, tokens, cache)
                    with open(path, "ab") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                else:
                    data = self._head(session_id) + self._record(0, text, tokens, cache)
                    write_atomic(path, data)
        except OSError:
            logger.exception("checkpointing session %r failed", session_id)
            self.drop(session_id)
            return
        self._written[session_id] = _Written(list(tokens))
        self.saved += 1
        self.appended_bytes += len(data)
        self._estimate += len(data)  # counts a rewrite's old file too: errs towards sweeping
        self.maybe_sweep()

    def maybe_sweep(self) -> None:
        """Sweep if `SWEEP_INTERVAL_S` passed since the last one or our writes may have passed
        the budget (cheap otherwise; never raises)."""
        now = self.clock()
        if now - self._last_sweep < SWEEP_INTERVAL_S and self._estimate <= self.budget_bytes:
            return
        try:
            self.sweep()
        except OSError:
            logger.exception("sweeping checkpoints in %s failed", self.directory)
            self._last_sweep = now

    def _scan(self) -> list[tuple[int, int, Path]]:
        """(mtime in ns, size, path) of every checkpoint and part file, oldest first."""
        found: list[tuple[int, int, Path]] = []
        for entry in os.scandir(self.directory):
            if not entry.name.endswith((SUFFIX, PART)):
                continue
            with contextlib.suppress(OSError):  # deleted meanwhile
                st = entry.stat()
                found.append((st.st_mtime_ns, st.st_size, Path(entry.path)))
        found.sort(key=lambda f: f[0])
        return found

    def sweep(self) -> None:
        """Delete files older than ``ttl_s``, leftovers of crashed rewrites, then the least
        recently written until the directory is within ``budget_bytes``."""
        now = self.clock()
        old = int((now - self.ttl_s) * 1e9)  # mtimes before it have expired
        files = self._scan()  # listed without the lock: only the deletions need it
        total = sum(size for _, size, _ in files)
        doomed: list[tuple[int, int, Path]] = []
        for f in files:
            mtime, size, path = f
            if path.name.endswith(PART) or mtime < old or total > self.budget_bytes:
                doomed.append(f)
                total -= size
        if doomed:
            with self._lock(fcntl.LOCK_EX):  # no writer is mid-append or mid-rename now
                for mtime, size, path in doomed:
                    try:
                        if path.stat().st_mtime_ns != mtime:
                            total += size  # written since we listed it: in use, keep it
                            continue
                        path.unlink()
                    except OSError:  # another worker's sweep took it first
                        continue
                    if path.name.endswith(SUFFIX):
                        if mtime < old:
                            self.expired += 1
                        else:
                            self.evicted += 1
                    logger.debug("checkpoint %s deleted (age %.0f s)", path.name, now - mtime / 1e9)
        self._estimate = max(0, total)
        self._last_sweep = now
        # Forget what we wrote to files that are gone (ours or another worker's sweep).
        for sid in [sid for sid in self._written if not self.path(sid).exists()]:
            del self._written[sid]

    def has(self, session_id: bytes) -> bool:
        """Whether a checkpoint file exists for the session."""
        return self.path(session_id).exists()

    def load(self, session_id: bytes) -> Spilled:
        """The session's last complete checkpointed state; raises `SpillInvalid` (the file is
        then deleted)."""
        path = self.path(session_id)
        try:
            buf = path.read_bytes()
            spilled = self._parse(session_id, buf)
        except (OSError, SpillInvalid) as exc:
            self.invalid += 1
            logger.warning("checkpoint of session %r not used: %s", session_id, exc)
            self.drop(session_id)
            raise SpillInvalid(str(exc)) from None
        self.loaded += 1
        self._written.pop(session_id, None)  # another process wrote it: rewrite before appending
        return spilled

    def _parse(self, session_id: bytes, buf: bytes) -> Spilled:
        if len(buf) < _HEAD.size + _SUM:
            raise SpillInvalid("truncated head")
        magic, fmt, n = _HEAD.unpack_from(buf)
        if magic != MAGIC or fmt != FORMAT:
            raise SpillInvalid("not a checkpoint of this format")
        end = _HEAD.size + n
        if len(buf) < end + _SUM or hashlib.sha256(buf[:end]).digest() != buf[end : end + _SUM]:
            raise SpillInvalid("head checksum mismatch")
        try:
            h = msgspec.msgpack.decode(buf[_HEAD.size : end], type=CheckpointHeader)
            dtype = RestDtype(h.dtype)
        except (msgspec.DecodeError, ValueError) as exc:
            raise SpillInvalid(f"bad header: {exc}") from None
        i = self.ident
        if h.model_sha256 != i.model_sha256 or h.n_ctx != i.n_ctx:
            raise SpillInvalid("written for another model or n_ctx")
        if tuple(h.layout) != (i.n_layers, i.n_kv_heads, i.head_dim):
            raise SpillInvalid("written for another KV layout")
        if h.session_id != session_id:
            raise SpillInvalid("written for another session")
        pos = end + _SUM
        text, ids = "", list[int]()
        ks: list[np.ndarray] = []
        vs: list[np.ndarray] = []
        while pos < len(buf):
            if pos + _U32.size > len(buf):
                break  # a record cut short: a worker died mid-append
            (size,) = _U32.unpack_from(buf, pos)
            if pos + _U32.size + size + _SUM > len(buf):
                break
            payload = buf[pos + _U32.size : pos + _U32.size + size]
            digest = buf[pos + _U32.size + size : pos + _U32.size + size + _SUM]
            if hashlib.sha256(payload).digest() != digest:
                raise SpillInvalid(f"record at byte {pos} fails its checksum")
            seg_text, seg_ids, k, v = self._segment(payload, dtype, len(ids))
            text, ids = seg_text, ids + seg_ids
            ks.append(k)
            vs.append(v)
            pos += _U32.size + size + _SUM
        if not ids or len(ids) > i.n_ctx:
            raise SpillInvalid(f"{len(ids)} positions")
        k_all = np.concatenate(ks, axis=2)
        v_all = np.concatenate(vs, axis=2)
        rest = RestKV(encode(k_all, RestDtype.NONE), encode(v_all, RestDtype.NONE))
        return Spilled(text, ids, rest)

    def _segment(
        self, payload: bytes, dtype: RestDtype, have: int
    ) -> tuple[str, list[int], np.ndarray, np.ndarray]:
        (n,) = _U32.unpack_from(payload)
        try:
            seg = msgspec.msgpack.decode(payload[_U32.size : _U32.size + n], type=Segment)
        except msgspec.DecodeError as exc:
            raise SpillInvalid(f"bad record: {exc}") from None
        if seg.start != have:
            raise SpillInvalid(f"record starts at {seg.start}, {have} positions before it")
        i = self.ident
        shape = (i.n_layers, i.n_kv_heads, len(seg.ids), i.head_dim)
        want = packed_nbytes(dtype, shape)
        start = _U32.size + n
        if seg.k_bytes != want or seg.v_bytes != want or len(payload) != start + 2 * want:
            raise SpillInvalid("record size does not match its positions")
        k = decode(Packed.frombytes(dtype, shape, payload[start : start + want]))
        v = decode(Packed.frombytes(dtype, shape, payload[start + want :]))
        return seg.text, list(seg.ids), k, v

    def drop(self, session_id: bytes) -> None:
        """Delete a session's checkpoint (idempotent)."""
        self._written.pop(session_id, None)
        with contextlib.suppress(OSError):
            self.path(session_id).unlink()
