"""Model architectures, keyed by GGUF ``general.architecture``: one module per architecture."""

from __future__ import annotations

from ..errors import ModelLoadError
from ..gguf_file import GGUFFile
from .llama import LlamaModel

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
    """Build the model registered for the file's architecture, weights dequantised."""
    return model_class(gguf).from_gguf(gguf)
