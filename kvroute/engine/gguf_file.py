"""Open a GGUF file: metadata as plain Python values, tensors dequantised to float32.

`gguf.GGUFReader` does the parsing and `gguf.quants.dequantize` every quantisation it knows
(F32, F16, BF16, Q4_0, Q4_1, Q5_x, Q8_0, K-quants, ...); this module only turns their failures into
one-line `ModelLoadError`s that name the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import ModelLoadError
from .quant import BLOCK_BYTES

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


class GGUFFile:
    """A parsed GGUF file.

    Parameters
    ----------
    path:
        Path of the ``.gguf`` file.

    Raises
    ------
    ModelLoadError
        If the file is missing, is not GGUF, or cannot be parsed (e.g. truncated).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader: gguf.GGUFReader | None = None
        self._tensors: dict[str, gguf.ReaderTensor] = {}
        self.meta: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.meta[key] = field.contents()
            except Exception as exc:
                raise ModelLoadError(f"{self.path}: bad metadata field {key} ({exc})") from exc

    @classmethod
    def from_meta(cls, path: str | Path, meta: dict[str, Any]) -> GGUFFile:
        """The file at ``path`` with its metadata already known (e.g. from the weights cache).

        Parsing a GGUF's metadata is the slowest part of opening it (every vocabulary entry is
        a Python object), so this skips it; the file is parsed only if a tensor is asked for.
        """
        self = cls.__new__(cls)
        self.path = Path(path)
        self._reader = None
        self._tensors = {}
        self.meta = meta
        return self

    def _open(self) -> gguf.GGUFReader:
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such model file")
        with self.path.open("rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path}: not a GGUF file (magic {magic!r})")
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
            raise ModelLoadError(
                f"{self.path}: unreadable GGUF, truncated or corrupt ({exc})"
            ) from exc
        self._tensors = {t.name: t for t in reader.tensors}
        self._check_sizes(reader)
        return reader

    @property
    def reader(self) -> gguf.GGUFReader:
        """The underlying `gguf.GGUFReader` (opened on first use after `from_meta`)."""
        if self._reader is None:
            self._reader = self._open()
        return self._reader

    def _check_sizes(self, reader: gguf.GGUFReader) -> None:
        # A truncated file can still parse (the reader memory-maps it) but its last tensors
        # then point past the end: catch it here, not as garbage logits later.
        size = self.path.stat().st_size
        for t in reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.nbytes != int(t.n_bytes):
                raise ModelLoadError(
                    f"{self.path}: truncated file (tensor {t.name} ends at byte {end}, "
                    f"file has {size})"
                )

    @property
    def architecture(self) -> str:
        """The ``general.architecture`` string, e.g. ``llama``."""
        arch = self.meta.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(f"{self.path}: missing general.architecture")
        return arch

    def require(self, key: str) -> Any:
        """Return a metadata value, raising `ModelLoadError` naming the key if it is absent."""
        if key not in self.meta:
            raise ModelLoadError(f"{self.path}: missing metadata {key}")
        return self.meta[key]

    def has_tensor(self, name: str) -> bool:
        """Whether the file holds a tensor called ``name``."""
        _ = self.reader
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape as `tensor` returns it (rows = output dim), without reading it."""
        _ = self.reader
        t = self._tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path}: missing tensor {name}")
        return tuple(int(d) for d in reversed(t.shape))

    def tensor(self, name: str) -> np.ndarray:
        """Dequantise one tensor to float32, shaped like numpy/PyTorch (rows = output dim).

        GGUF lists dimensions innermost first; the returned array has them reversed, so a
        linear layer's weight comes back as ``(out_features, in_features)``.
        """
        _ = self.reader
        t = self._tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path}: missing tensor {name}")
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise ModelLoadError(
                f"{self.path}: tensor {name} has unsupported type {t.tensor_type.name}"
            ) from exc
        return np.ascontiguousarray(data, dtype=np.float32).reshape(self.shape(name))

    def blocks(self, name: str) -> tuple[str, np.ndarray] | None:
        """A Q4_1 or Q8_0 tensor's type name and raw blocks, one ``(out_features, bytes)`` row
        per output; None for any other type (see `quant`)."""
        _ = self.reader
        t = self._tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path}: missing tensor {name}")
        kind = t.tensor_type.name
        if kind not in BLOCK_BYTES:
            return None
        data = np.asarray(t.data).view(np.uint8)
        return kind, data.reshape(int(t.shape[-1]), -1)
