"""Model architectures, keyed by GGUF ``general.architecture``: one module per architecture."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ModelLoadError
from ..gguf_file import GGUFFile
from ..matmul import load_or_measure
from ..model_store import sha256_of
from ..weights_cache import (
    CacheConfig,
    CacheInvalid,
    Prepared,
    Recipe,
    WeightsCache,
    cache_file,
    read,
)
from .llama import LlamaModel

logger = logging.getLogger(__name__)

ARCHITECTURES: dict[str, type[LlamaModel]] = {
    "llama": LlamaModel,
}


def model_class(gguf: GGUFFile) -> type[LlamaModel]:
    """The class registered for the file's architecture (ModelLoadError if none)."""
    cls = ARCHITECTURES.get(gguf.architecture)
    if cls is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(
            f"{gguf.path}: unsupported architecture {gguf.architecture!r} (supported: {known})"
        )
    return cls


def load_model(gguf: GGUFFile) -> LlamaModel:
    """Build the model registered for the file's architecture, weights dequantised in memory."""
    return model_class(gguf).from_gguf(gguf)


def open_model(path: str | Path, config: CacheConfig | None = None) -> tuple[GGUFFile, LlamaModel]:
    """Open a GGUF and its model, weights mapped from the host's weights cache.

    The first process to open a model prepares its weights and writes them to the cache (see
    `weights_cache`); later ones map that file and read the metadata from it instead of parsing
    the GGUF. Models smaller than ``config.min_model_bytes``, or all with caching disabled, are
    prepared in memory. For models above that size the matmul plan is measured on the host, or
    read from the cache directory (see `matmul`), and logged.

    Raises
    ------
    ModelLoadError
        Not GGUF, truncated, unknown architecture, missing metadata or tensors.
    """
    config = config or CacheConfig()
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    directory = config.resolved_directory()
    if path.stat().st_size < config.min_model_bytes:
        gguf = GGUFFile(path)
        return gguf, load_model(gguf)  # default matmul plan: too small to be worth timing
    if directory is None:
        gguf = GGUFFile(path)
        model = load_model(gguf)
    else:
        gguf, model = _open_cached(path, directory)
    model.mm = load_or_measure(model.matrices(), directory)
    logger.info("%s", model.mm.describe())
    return gguf, model


def _open_cached(path: Path, directory: Path) -> tuple[GGUFFile, LlamaModel]:
    def recipe() -> Recipe:
        gguf = GGUFFile(path)
        cls = model_class(gguf)
        return Recipe(cls.LAYOUT, gguf.meta, cls.prepare(gguf))

    def accept(prepared: Prepared) -> bool:
        cls = ARCHITECTURES.get(str(prepared.meta.get("general.architecture")))
        return cls is not None and prepared.layout == cls.LAYOUT

    prepared = WeightsCache(directory).load(sha256_of(path), accept, recipe)
    gguf = GGUFFile.from_meta(path, prepared.meta)
    return gguf, model_class(gguf).from_arrays(gguf, prepared.arrays)


def open_metadata(path: str | Path, config: CacheConfig | None = None) -> GGUFFile:
    """The GGUF with its metadata only: read from the weights cache if it holds this model.

    The cache's copy skips the GGUF parser, the slow part of opening a model; the arrays are
    neither checked nor read.

    Raises
    ------
    ModelLoadError
        Not GGUF, truncated, missing (when the GGUF itself has to be parsed).
    """
    path = Path(path)
    directory = (config or CacheConfig()).resolved_directory()
    if directory is not None and path.is_file():
        sha = sha256_of(path)
        try:
            prepared = read(cache_file(directory, sha), sha, verify_data=False)
        except CacheInvalid:
            pass
        else:
            return GGUFFile.from_meta(path, prepared.meta)
    return GGUFFile(path)
