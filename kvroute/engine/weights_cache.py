"""One prepared copy of a model's weights per host, memory-mapped read-only by every worker.

Preparing a model (dequantising every tensor, fusing and permuting matrices, see
`models/llama.py`) takes seconds and yields several times the GGUF's size in float32. Done in
each worker, that is a private copy per process and a slow start. Instead, the first process to
load a model writes the prepared arrays, with the GGUF metadata, to one file per model sha256
under ``$KVROUTE_HOME/weights``; every process maps that file read-only, so the kernel keeps one
copy in the page cache and a later start only maps it. Reading the metadata back from here also
skips the GGUF parser, which is the slowest part of opening a model.

File layout (all integers little-endian)::

    MAGIC (8 bytes), zero padding to ALIGN
    arrays, each at an ALIGN-byte boundary, zero-padded to the next one
    header: UTF-8 JSON {format, model_sha256, layout, meta, arrays: [{name, dtype, shape,
            offset, nbytes, sum}]}
    trailer: header length (u64), sha256 of the header (32 bytes), END_MAGIC (8 bytes)

A file is used only if every check passes: both magics, the header's own sha256, the format
number, the model's sha256 (a foreign or stale file), the file size (a partial one), and a
checksum of every array (the 64-bit wrapping sum of its padded words: it costs one read of the
data, which a worker does anyway, and it catches truncation, zeroed pages and bit flips; it is a
guard against accidents, not tampering). Otherwise the file is rebuilt. Writes go to a
temporary file that is renamed into place, so a reader sees the old file or the new one, never
half of one; a lock file keeps two processes starting together from building it twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .durable import replacing
from .model_store import weights_dir

logger = logging.getLogger(__name__)

FORMAT = 1
MAGIC = b"KVRWGT\x00\x01"
END_MAGIC = b"KVRWEND\x01"
ALIGN = 64  # every array starts on a cache line
_TRAILER = struct.Struct("<Q32s8s")  # header length, header sha256, END_MAGIC
SUFFIX = ".kvw"


@dataclass(frozen=True)
class CacheConfig:
    """Whether and where prepared weights are cached."""

    enabled: bool = True
    directory: Path | None = None  # None: $KVROUTE_HOME/weights, resolved when used
    # Smaller GGUFs are prepared in memory: that takes milliseconds and there is little to share.
    min_model_bytes: int = 16 << 20

    def resolved_directory(self) -> Path | None:
        """The cache directory, or None if caching is off."""
        if not self.enabled:
            return None
        return self.directory if self.directory is not None else weights_dir()


class CacheInvalid(Exception):
    """A cache file exists but must not be used; the message says why."""


@dataclass
class Prepared:
    """A model's prepared arrays and GGUF metadata.

    ``arrays`` are read-only views of the mapped cache file, or plain arrays when no file could
    be written (``path`` is then None).
    """

    layout: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    path: Path | None = None


@dataclass
class Recipe:
    """How to prepare a model that is not cached: what `WeightsCache.load` writes.

    ``arrays`` is consumed once, so a large model is written one array at a time.
    """

    layout: str
    meta: dict[str, Any]
    arrays: Iterable[tuple[str, np.ndarray]] = field(default_factory=list)


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _checksum(padded: np.ndarray) -> int:
    """Wrapping 64-bit sum of a region whose size is a multiple of ALIGN bytes."""
    return int(np.add.reduce(padded.view(np.uint64), dtype=np.uint64))


def cache_file(directory: Path, model_sha256: str, form: str) -> Path:
    """Where the prepared weights of the model with this sha256 live, in this form (the model
    says what its forms hold; a process uses one of them, see `quant.mode`)."""
    return directory / f"{model_sha256}.{form}{SUFFIX}"


def write(path: Path, model_sha256: str, recipe: Recipe) -> None:
    """Write a cache file atomically (temporary file, fsync, rename).

    Raises
    ------
    OSError
        If the directory is not writable or the disk is full; ``path`` is then unchanged.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, mode=0o644) as f:  # the weights are no secret
        f.write(MAGIC + bytes(ALIGN - len(MAGIC)))
        entries = []
        for name, arr in recipe.arrays:
            arr = np.ascontiguousarray(arr)
            raw = arr.reshape(-1).view(np.uint8)
            pad = _padded(raw.nbytes) - raw.nbytes
            padded = np.concatenate([raw, np.zeros(pad, np.uint8)]) if pad else raw
            entries.append(
                {
                    "name": name,
                    "dtype": arr.dtype.str,
                    "shape": list(arr.shape),
                    "offset": f.tell(),
                    "nbytes": raw.nbytes,
                    "sum": _checksum(padded),
                }
            )
            f.write(padded.data)
        header = json.dumps(
            {
                "format": FORMAT,
                "model_sha256": model_sha256,
                "layout": recipe.layout,
                "meta": recipe.meta,
                "arrays": entries,
            }
        ).encode()
        f.write(header)
        f.write(_TRAILER.pack(len(header), hashlib.sha256(header).digest(), END_MAGIC))


def read(path: Path, model_sha256: str, verify_data: bool = True) -> Prepared:
    """Map a cache file read-only and check it whole (the arrays too, if ``verify_data``).

    Raises
    ------
    CacheInvalid
        If the file is missing, partial, corrupt, of another format or of another model.
    """
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:  # missing, unreadable, or empty (mmap of 0 bytes)
        raise CacheInvalid(f"cannot map ({exc})") from exc
    size = mm.shape[0]
    if size < ALIGN + _TRAILER.size or bytes(mm[: len(MAGIC)]) != MAGIC:
        raise CacheInvalid("not a kvroute weights file (bad magic or too short)")
    hlen, hsha, end = _TRAILER.unpack(bytes(mm[size - _TRAILER.size :]))
    if end != END_MAGIC or hlen > size - ALIGN - _TRAILER.size:
        raise CacheInvalid("partial file (no trailer)")
    hstart = size - _TRAILER.size - hlen
    raw_header = bytes(mm[hstart : hstart + hlen])
    if hashlib.sha256(raw_header).digest() != hsha:
        raise CacheInvalid("corrupt header (sha256 mismatch)")
    try:
        header = json.loads(raw_header)
        if header["format"] != FORMAT:
            raise CacheInvalid(f"format {header['format']}, expected {FORMAT}")
        if header["model_sha256"] != model_sha256:
            raise CacheInvalid(f"written for another model (sha256 {header['model_sha256']})")
        arrays: dict[str, np.ndarray] = {}
        for e in header["arrays"]:
            start, nbytes = int(e["offset"]), int(e["nbytes"])
            if start % ALIGN or start < ALIGN or start + _padded(nbytes) > hstart:
                raise CacheInvalid(f"array {e['name']} lies outside the data")
            if verify_data and _checksum(mm[start : start + _padded(nbytes)]) != int(e["sum"]):
                raise CacheInvalid(f"corrupt array {e['name']} (checksum mismatch)")
            dtype = np.dtype(e["dtype"])
            arrays[e["name"]] = mm[start : start + nbytes].view(dtype).reshape(e["shape"])
        return Prepared(str(header["layout"]), dict(header["meta"]), arrays, path)
    except (KeyError, TypeError, ValueError) as exc:  # json, dtype or shape nonsense
        raise CacheInvalid(f"malformed header ({exc!r})") from exc


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``path`` (a lock file that is never removed)."""
    lock = path.with_name(path.name + ".lock")
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class WeightsCache:
    """Prepared models in one directory, one file per model sha256.

    Parameters
    ----------
    directory:
        Where the files live, usually ``$KVROUTE_HOME/weights`` (see `model_store`).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def load(
        self,
        model_sha256: str,
        form: str,
        accept: Callable[[Prepared], bool],
        recipe: Callable[[], Recipe],
    ) -> Prepared:
        """The cached model if valid and accepted, else prepare it, write it and map it.

        ``accept`` rejects a valid file the caller cannot use (e.g. an older layout). If the
        file cannot be written (read-only directory, full disk) the model is prepared in memory
        and a warning logged: the caller still gets a working model, only not a shared one.
        """
        path = cache_file(self.directory, model_sha256, form)
        if path.exists():
            found = self._try_read(path, model_sha256, accept, logger.debug)
            if found is not None:
                return found
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with locked(path):
                # Another process may have built it while we waited for the lock; if not, say
                # why the file there (if any) is not used.
                if path.exists():
                    found = self._try_read(path, model_sha256, accept, logger.warning)
                    if found is not None:
                        return found
                logger.info("preparing weights into %s", path)
                write(path, model_sha256, recipe())
                # The one file of earlier versions, named without a form: now never read. A
                # process may still map it; unlinking leaves its pages to that process.
                (self.directory / f"{model_sha256}{SUFFIX}").unlink(missing_ok=True)
            return read(path, model_sha256)
        except (OSError, CacheInvalid, TypeError, ValueError) as exc:
            # TypeError/ValueError: metadata that JSON cannot hold.
            logger.warning("weights cache %s unusable (%s); preparing in memory", path, exc)
            r = recipe()
            return Prepared(r.layout, r.meta, dict(r.arrays))

    @staticmethod
    def _try_read(
        path: Path, sha: str, accept: Callable[[Prepared], bool], log: Callable[..., None]
    ) -> Prepared | None:
        try:
            prepared = read(path, sha)
        except CacheInvalid as exc:
            log("weights cache %s is rebuilt: %s", path, exc)
            return None
        if not accept(prepared):
            log("weights cache %s has layout %s: rebuilt", path, prepared.layout)
            return None
        return prepared
