"""The engine facade: a model, its tokenizer and chat template, and token generation.

The engine knows no sockets and no sessions. `Engine.forward` runs a ragged batch of segments
(one per sequence) so a scheduler can prefill and decode many sessions in one pass;
`Engine.generate` is the single-sequence generator the CLI uses: it yields one token at a time
and the caller decides when to stop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import quant
from .cache import KVCache
from .chat_template import ChatTemplate, validate_messages
from .errors import ContextOverflowError, EngineError, TemplateError
from .memory import release_freed
from .models import model_class, open_metadata, open_model
from .models.llama import LlamaModel
from .prompt import Prompt, PromptCodec
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer
from .weights_cache import CacheConfig

logger = logging.getLogger(__name__)

DEFAULT_N_CTX = 2048
MIN_N_CTX = 16  # fewer positions cannot hold a templated message and a reply
PREFILL_CHUNK = 512  # tokens per forward pass when prefilling a long prompt alone


@dataclass
class TokenPiece:
    """One generated token and the text it completed (may be "" mid-character).

    ``token_id`` is None for the final flush of bytes left by a token that ended generation
    mid-character (they come out as U+FFFD).
    """

    token_id: int | None
    text: str


@dataclass
class Generation:
    """Outcome of `Engine.generate`, filled in while iterating."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    first_logits: np.ndarray | None = None  # (V,) logits at the first generated position


class Engine:
    """A loaded model ready to run.

    Parameters
    ----------
    model, tokenizer, template:
        The parts, usually from `Engine.load`.
    n_ctx:
        Positions one sequence may use (prompt + generated); caches never grow past it.
    path:
        Where the model came from (for messages).
    """

    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        n_ctx: int,
        path: Path | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.prompts = PromptCodec(tokenizer)
        self.n_ctx = n_ctx
        self.path = path

    @classmethod
    def load(
        cls,
        path: str | Path,
        n_ctx: int | None = None,
        weights: CacheConfig | None = None,
        kernels: str | None = None,
    ) -> Engine:
        """Load a GGUF file, its weights mapped from the host's weights cache.

        ``n_ctx`` defaults to ``DEFAULT_N_CTX`` and is capped by the model's training context.
        ``weights`` says where prepared weights are cached (default: ``$KVROUTE_HOME/weights``;
        see `weights_cache`). ``kernels`` asks for the quantized kernels: ``auto``, ``exact``,
        ``int8`` or ``off`` (None: ``$KVROUTE_QUANT``, default ``auto``; see `quant.mode`).

        Raises
        ------
        ModelLoadError
            Not GGUF, truncated, unknown architecture, missing tokenizer metadata.
        """
        gguf, model = open_model(path, weights, quant.mode(kernels))
        tokenizer = Tokenizer.from_gguf(gguf)
        template = ChatTemplate.from_gguf(gguf, tokenizer)
        ctx = min(n_ctx or DEFAULT_N_CTX, model.args.n_ctx_train)
        logger.info(
            "loaded %s: %d layers, n_ctx %d, kernels %s",
            gguf.path,
            model.args.n_layers,
            ctx,
            model.kernels or "off",
        )
        engine = cls(model, tokenizer, template, ctx, gguf.path)
        if model.kernels is not None:
            # Compile the kernels now, not in the first turn: the first time on a host that
            # takes seconds (later, numba's disk cache makes it milliseconds), and inside a
            # worker's first step it would stall its loop long enough to be declared lost.
            engine.forward([(engine.new_cache(), [0])])
        release_freed()  # what parsing, building and compiling left behind
        return engine

    @staticmethod
    def check(path: str | Path) -> None:
        """Cheap validation of a model file without loading weights (metadata only).

        Lets a parent process fail fast with one clear line before spawning workers.

        Raises
        ------
        ModelLoadError
            Not GGUF, truncated, unknown architecture, missing tokenizer metadata.
        """
        gguf = open_metadata(path)
        model_class(gguf)
        Tokenizer.from_gguf(gguf)

    @property
    def kernels(self) -> str:
        """The quantized kernels this engine's products may take: exact, int8, or off."""
        return self.model.kernels or "off"

    @property
    def model_name(self) -> str:
        """File name of the model, for READY messages and reports."""
        return self.path.name if self.path else "model"

    @property
    def eot_ids(self) -> frozenset[int]:
        """Token ids that end an assistant turn (EOS and the template's end-of-turn)."""
        return self.tokenizer.eot_ids

    def live_kv_dtype(self, asked: str) -> str:
        """The dtype live caches use when ``asked`` (``auto``, ``f32`` or ``f16``).

        auto is f16 where the attention kernels read a float16 cache as stored (half the bytes,
        decode no slower), and f32 where numpy would widen it at every step.
        """
        if asked != "auto":
            return asked
        return "f16" if self.model.reads_half_kv else "f32"

    def new_cache(self, dtype: str = "f32") -> KVCache:
        """An empty KV cache for one sequence, limited to ``n_ctx`` positions, holding keys and
        values as ``dtype`` (``f32`` or ``f16``)."""
        return self.model.new_cache(self.n_ctx, dtype)

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """Render role/content messages with the model's chat template (generation prompt on)."""
        return self.template.render(messages, add_generation_prompt=True)

    def render_prompt(self, messages: Sequence[Mapping[str, str]]) -> Prompt:
        """Render like `render`; only the template's own control tokens become markers.

        Control-token text inside a message content stays text (see `encode_prompt`).

        Raises
        ------
        TemplateError
            If the messages are malformed or the template rejects them, or if the template
            alters contents so that they cannot be located and one spells a control token.
        """
        chat = self.template.render_spans(messages, add_generation_prompt=True)
        if chat.content is not None:
            return self.prompts.mark(chat.text, chat.content)
        # Contents are somewhere in the text, but where is unknown: safe only without any
        # control-token text in them.
        for i, m in enumerate(validate_messages(messages)):
            if self.prompts.contains_special(m["content"]):
                raise TemplateError(
                    f"messages[{i}].content contains control-token text, which this model's "
                    "chat template does not let us keep apart from the template's own"
                )
        return self.prompts.mark(chat.text)

    def encode(self, text: str) -> list[int]:
        """Token ids of raw ``text`` (special tokens parsed, no BOS)."""
        return self.tokenizer.encode(text)

    def encode_prompt(self, prompt: Prompt, start: int = 0) -> list[int]:
        """Token ids of ``prompt.text[start:]``: markers as control ids, the rest as text."""
        return self.prompts.encode(prompt, start)

    def forward(
        self, segments: Sequence[tuple[KVCache, Sequence[int]]], all_logits: bool = False
    ) -> list[np.ndarray]:
        """One batched pass over several sequences; see `LlamaModel.forward`."""
        return self.model.forward(segments, all_logits=all_logits)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise `ContextOverflowError` if ``prompt_tokens + max_tokens`` exceeds ``n_ctx``."""
        if prompt_tokens + max_tokens > self.n_ctx:
            raise ContextOverflowError(prompt_tokens, max_tokens, self.n_ctx)

    def prefill(self, cache: KVCache, ids: Sequence[int], chunk: int = PREFILL_CHUNK) -> np.ndarray:
        """Feed ``ids`` after the cache's positions in chunks; return the last position's logits."""
        assert ids, "prefill needs at least one token"
        logits = None
        for start in range(0, len(ids), chunk):
            logits = self.forward([(cache, ids[start : start + chunk])])[0]
        assert logits is not None
        return logits

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cache: KVCache | None = None,
        result: Generation | None = None,
    ) -> Iterator[TokenPiece]:
        """Prefill ``prompt_ids`` and yield generated tokens one at a time.

        The stop token is neither yielded nor fed to the model. ``result`` (if given) is filled
        with ids, text, finish reason and first-position logits as generation proceeds.

        Raises
        ------
        ContextOverflowError
            Before any work, if the prompt plus ``max_tokens`` does not fit in ``n_ctx``.
        EngineError
            If ``prompt_ids`` is empty.
        """
        cache = cache if cache is not None else self.new_cache()
        result = result if result is not None else Generation(list(prompt_ids))
        if len(prompt_ids) == 0:  # else prefill's assert: a traceback for `--raw --prompt ''`
            raise EngineError("empty prompt: there is no token to generate from")
        self.check_fits(cache.length + len(prompt_ids), params.max_tokens)
        sampler = Sampler(params)
        decoder = StreamDecoder(self.tokenizer)
        logits = self.prefill(cache, list(prompt_ids))
        result.first_logits = logits
        while True:
            if len(result.token_ids) >= params.max_tokens:
                result.finish_reason = "length"
                break
            tok = sampler(logits)
            if tok in self.eot_ids and not params.ignore_eos:
                result.finish_reason = "stop"
                break
            result.token_ids.append(tok)
            piece = decoder.push(tok)
            result.text += piece
            yield TokenPiece(tok, piece)
            if len(result.token_ids) < params.max_tokens:
                logits = self.forward([(cache, [tok])])[0]
        tail = decoder.flush()
        if tail:
            result.text += tail
            yield TokenPiece(None, tail)
