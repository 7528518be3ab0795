"""Spill files: an idle session's compressed KV on disk, so leaving RAM does not mean going cold.

When the KV budget is short and parking idle sessions at rest is not enough, the session store
writes the least recently used ones here instead of dropping them; the session's next turn reads
its file back (END ``kv_source`` disk) and deletes it. The directory holds at most
``budget_bytes`` of files, least recently written dropped first (those sessions go cold with
``evicted``).

One file per session, ``<session id hex>.kvs``::

    head:     MAGIC (8 bytes), format (u16), header length (u32)
    header:   msgpack `SpillHeader`: model sha256, n_ctx, rest dtype, KV shape, token count,
              session id, the committed text and ids, the sizes of the key and value codes
    payload:  key codes, value codes (``kv_codec`` layouts)
    trailer:  sha256 of everything before it (32 bytes)

A file is used only if every check passes: magic, format, size, checksum, the model's sha256 and
n_ctx and KV layout (a foreign file), the session id and the token count (a stale or misplaced
one). Anything else raises `SpillInvalid`, and the file is deleted: the turn goes cold with
``spill_invalid``. Writes are atomic (a temporary ``.part`` file, fsync, rename, fsync of the
directory), so a crash mid-write leaves at most a ``.part`` file, which is never read and is
removed when the directory is opened again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import msgspec

from kvroute.engine.cache import RestKV
from kvroute.engine.durable import PART, write_atomic
from kvroute.engine.kv_codec import Packed, RestDtype, packed_nbytes

logger = logging.getLogger(__name__)

MAGIC = b"KVRSPILL"
FORMAT = 1
SUFFIX = ".kvs"
_HEAD = struct.Struct("<8sHI")  # magic, format, header length
_SUM = 32  # sha256 trailer


class SpillInvalid(Exception):
    """A spill file that must not be used (truncated, corrupt, foreign, stale)."""


class SpillHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a spill file says about itself."""

    model_sha256: str
    n_ctx: int
    dtype: str
    shape: tuple[int, int, int, int]  # (n_layers, n_kv_heads, positions, head_dim)
    n_tokens: int
    session_id: bytes
    text: str
    ids: list[int]
    k_bytes: int
    v_bytes: int


@dataclass(frozen=True)
class SpillIdentity:
    """What a file must have been written for: this model, context and KV layout."""

    model_sha256: str
    n_ctx: int
    n_layers: int
    n_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Spilled:
    """A session read back from disk."""

    text: str
    tokens: list[int]
    rest: RestKV


def encode_file(
    ident: SpillIdentity, session_id: bytes, text: str, tokens: list[int], rest: RestKV
) -> bytes:
    """The bytes of a spill file."""
    k, v = rest.k.tobytes(), rest.v.tobytes()
    header = msgspec.msgpack.encode(
        SpillHeader(
            model_sha256=ident.model_sha256,
            n_ctx=ident.n_ctx,
            dtype=rest.k.dtype.value,
            shape=(ident.n_layers, ident.n_kv_heads, rest.length, ident.head_dim),
            n_tokens=len(tokens),
            session_id=session_id,
            text=text,
            ids=tokens,
            k_bytes=len(k),
            v_bytes=len(v),
        )
    )
    body = _HEAD.pack(MAGIC, FORMAT, len(header)) + header + k + v
    return body + hashlib.sha256(body).digest()


def decode_file(ident: SpillIdentity, session_id: bytes, buf: bytes) -> Spilled:
    """Check a spill file whole and return what it holds; raises `SpillInvalid`."""
    if len(buf) < _HEAD.size + _SUM:
        raise SpillInvalid(f"truncated: {len(buf)} bytes")
    body, digest = buf[:-_SUM], buf[-_SUM:]
    magic, fmt, n_header = _HEAD.unpack_from(body)
    if magic != MAGIC:
        raise SpillInvalid("not a spill file")
    if fmt != FORMAT:
        raise SpillInvalid(f"format {fmt}, this worker reads {FORMAT}")
    if hashlib.sha256(body).digest() != digest:
        raise SpillInvalid("checksum mismatch (truncated or corrupt)")
    try:
        h = msgspec.msgpack.decode(body[_HEAD.size : _HEAD.size + n_header], type=SpillHeader)
        dtype = RestDtype(h.dtype)
    except (msgspec.DecodeError, ValueError) as exc:
        raise SpillInvalid(f"bad header: {exc}") from None
    if h.model_sha256 != ident.model_sha256:
        raise SpillInvalid("written for another model")
    layout = (ident.n_layers, ident.n_kv_heads, ident.head_dim)
    if h.n_ctx != ident.n_ctx or (h.shape[0], h.shape[1], h.shape[3]) != layout:
        raise SpillInvalid(f"written for n_ctx {h.n_ctx} and KV {h.shape}")
    if h.session_id != session_id:
        raise SpillInvalid("written for another session")
    n = h.shape[2]
    if not (h.n_tokens == len(h.ids) == n <= ident.n_ctx):
        raise SpillInvalid(f"{n} positions, {h.n_tokens} tokens, {len(h.ids)} ids")
    want = packed_nbytes(dtype, h.shape)
    start = _HEAD.size + n_header
    if h.k_bytes != want or h.v_bytes != want or len(body) != start + 2 * want:
        raise SpillInvalid("payload size does not match the header")
    k = Packed.frombytes(dtype, h.shape, body[start : start + want])
    v = Packed.frombytes(dtype, h.shape, body[start + want :])
    return Spilled(h.text, list(h.ids), RestKV(k, v))


class SpillDir:
    """One worker's spill files, bounded by a disk budget (LRU by write).

    Parameters
    ----------
    directory:
        Created if missing. Files left by an earlier process (sessions this one never held)
        and ``.part`` files of a write that crashed are removed.
    budget_bytes:
        Most bytes of files kept.
    ident:
        The model, context and KV layout files must match.
    """

    def __init__(self, directory: Path, budget_bytes: int, ident: SpillIdentity) -> None:
        self.directory = Path(directory)
        self.budget_bytes = budget_bytes
        self.ident = ident
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in [*self.directory.glob("*" + SUFFIX), *self.directory.glob("*" + PART)]:
            with contextlib.suppress(OSError):
                stale.unlink()
        self._files: OrderedDict[bytes, int] = OrderedDict()  # session id -> size, oldest first
        self.written = self.read = self.invalid = self.dropped = 0

    def __contains__(self, session_id: bytes) -> bool:
        return session_id in self._files

    def __len__(self) -> int:
        return len(self._files)

    @property
    def nbytes(self) -> int:
        """Bytes of files held."""
        return sum(self._files.values())

    def path(self, session_id: bytes) -> Path:
        """The file of a session."""
        return self.directory / (session_id.hex() + SUFFIX)

    def write(self, session_id: bytes, text: str, tokens: list[int], rest: RestKV) -> list[bytes]:
        """Spill a session; returns the sessions whose files were dropped to stay in budget.

        The session itself is among them if its file cannot be written or alone exceeds the
        budget (its caller then forgets it like an evicted one).
        """
        data = encode_file(self.ident, session_id, text, tokens, rest)
        self.drop(session_id)
        if len(data) > self.budget_bytes:
            return [session_id]
        dropped: list[bytes] = []
        while self._files and self.nbytes + len(data) > self.budget_bytes:
            oldest = next(iter(self._files))
            self.drop(oldest)
            dropped.append(oldest)
        try:
            write_atomic(self.path(session_id), data)
        except OSError:
            logger.exception("spilling session %r failed", session_id)
            return [*dropped, session_id]
        self._files[session_id] = len(data)
        self.written += 1
        self.dropped += len(dropped)
        return dropped

    def take(self, session_id: bytes) -> Spilled:
        """Read a session's file back and delete it; raises `SpillInvalid` (file deleted too)."""
        path = self.path(session_id)
        self._files.pop(session_id, None)
        t0 = time.perf_counter()
        try:
            buf = path.read_bytes()
        except OSError as exc:
            raise SpillInvalid(f"unreadable: {exc}") from None
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
        try:
            spilled = decode_file(self.ident, session_id, buf)
        except SpillInvalid as exc:
            self.invalid += 1
            logger.warning("spill file of session %r not used: %s", session_id, exc)
            raise
        self.read += 1
        logger.debug("read spill of %r in %.1f ms", session_id, (time.perf_counter() - t0) * 1e3)
        return spilled

    def drop(self, session_id: bytes) -> None:
        """Delete a session's file, if any (idempotent)."""
        if self._files.pop(session_id, None) is not None:
            with contextlib.suppress(OSError):
                self.path(session_id).unlink()
