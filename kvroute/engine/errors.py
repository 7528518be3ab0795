"""Errors the engine raises; each carries a one-line message fit for a user."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for every error the engine raises on bad input."""


class ModelLoadError(EngineError):
    """The model file is unusable: not GGUF, truncated, unknown architecture, missing metadata."""


class ContextOverflowError(EngineError):
    """A request needs more positions than the context holds.

    Attributes carry the numbers a caller needs to react (shorten, drop turns, lower max_tokens).
    """

    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx
        super().__init__(
            f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} exceeds the context "
            f"of {n_ctx} tokens"
        )


class TemplateError(EngineError):
    """Chat messages are malformed, or the model's chat template cannot render them."""
