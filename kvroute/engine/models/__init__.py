"""Model architectures, keyed by GGUF ``general.architecture``: one module per architecture."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ModelLoadError
from ..gguf_file import GGUFFile
from ..matmul import plan_for
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
from .llama_weights import FORMS, form_for

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


def load_model(gguf: GGUFFile, mode: str | None = None) -> LlamaModel:
    """Build the model registered for the file's architecture, weights prepared in memory for
    the kernels ``mode`` (see `quant.mode`)."""
    return model_class(gguf).from_gguf(gguf, mode)


def open_model(
    path: str | Path, config: CacheConfig | None = None, mode: str | None = None
) -> tuple[GGUFFile, LlamaModel]:
    """Open a GGUF and its model, weights mapped from the host's weights cache.

    The first process to open a model prepares its weights and writes them to the cache (see
    `weights_cache`); later ones map that file and read the metadata from it instead of parsing
    the GGUF. Models smaller than ``config.min_model_bytes``, or all with caching disabled, are
    prepared in memory. The weights are prepared in the form the kernels ``mode`` use (see
    `quant.mode`; None: float32 only), and the matmul plan of the float32 matrices among them
    measured on the host or read from the cache directory (`matmul.plan_for`; not for a small
    model), and logged.

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
    small = path.stat().st_size < config.min_model_bytes
    if small or directory is None:
        gguf = GGUFFile(path)
        model = load_model(gguf, mode)
    else:
        gguf, model = _open_cached(path, directory, mode)
    # A small model's products take microseconds: not worth timing (no directory: no measuring).
    model.mm = plan_for(model.matrices(), None if small else directory)
    if not small:
        logger.info("%s", model.mm.describe())
    return gguf, model


def _open_cached(path: Path, directory: Path, mode: str | None) -> tuple[GGUFFile, LlamaModel]:
    form = form_for(mode)

    def recipe() -> Recipe:
        gguf = GGUFFile(path)
        cls = model_class(gguf)
        return Recipe(cls.LAYOUT, gguf.meta, cls.prepare(gguf, form))

    def accept(prepared: Prepared) -> bool:
        cls = ARCHITECTURES.get(str(prepared.meta.get("general.architecture")))
        return cls is not None and prepared.layout == cls.LAYOUT

    prepared = WeightsCache(directory).load(sha256_of(path), form, accept, recipe)
    gguf = GGUFFile.from_meta(path, prepared.meta)
    return gguf, model_class(gguf).from_arrays(gguf, prepared.arrays, mode)


def open_metadata(path: str | Path, config: CacheConfig | None = None) -> GGUFFile:
    """The GGUF with its metadata only: read from the weights cache if it holds this model.

    The cache's copy (of any form) skips the GGUF parser, the slow part of opening a model; the
    arrays are neither checked nor read.

    Raises
    ------
    ModelLoadError
        Not GGUF, truncated, missing (when the GGUF itself has to be parsed).
    """
    path = Path(path)
    directory = (config or CacheConfig()).resolved_directory()
    if directory is not None and path.is_file():
        sha = sha256_of(path)
        for form in FORMS:
            try:
                prepared = read(cache_file(directory, sha, form), sha, verify_data=False)
            except CacheInvalid:
                continue
            return GGUFFile.from_meta(path, prepared.meta)
    return GGUFFile(path)
