"""Byte-level BPE tokenizer built from GGUF metadata, token-for-token equal to llama.cpp.

The BPE itself is a `tokenizers` model fed the GGUF vocabulary and merges; this module only
reproduces llama.cpp's choices around it:

* the pre-tokenizer: llama.cpp picks a list of split regexes by ``tokenizer.ggml.pre``
  (``llm_tokenizer_bpe`` in ``src/llama-vocab.cpp``) and applies them one after another, which is
  exactly a `tokenizers` ``Sequence`` of ``Split(..., "isolated")`` followed by the byte mapping;
* special tokens: user-defined tokens are always matched atomically in the text before any
  splitting, control and unknown tokens only when special parsing is on (llama.cpp's
  ``parse_special``; chat prompts use it only for the template's own markers, see
  ``prompt.py``);
* detokenizing: control tokens render as nothing, user-defined tokens as their raw text, every
  other token through the GPT-2 byte table.
"""

from __future__ import annotations

import codecs
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .errors import ModelLoadError
from .gguf_file import GGUFFile
from .packed import PackedBytes

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5

# Tokens llama.cpp treats as end-of-generation by their text alone (and forces to control type),
# whatever the metadata says; see the "special_eog_ids" block of llama-vocab.cpp.
EOG_TOKEN_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
    }
)

# llama.cpp's split regexes, verbatim except that its case-folding workaround for the
# contractions is written back as the original ``(?i:...)`` (oniguruma supports it).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How llama.cpp pre-tokenizes one family of ``tokenizer.ggml.pre`` values."""

    regexes: tuple[str, ...]  # applied in order, each splitting the pieces the previous left
    ignore_merges: bool = False  # a piece that is a whole vocab entry skips the merges
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token key


_DEFAULT_PRE = PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2_PRE = PreTokenizerSpec((_GPT2,))
_DIGITS_PRE = PreTokenizerSpec((r"\p{N}", _GPT2))  # GPT-2 after splitting digits one by one
_LLAMA3_PRE = PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos=True)
_QWEN2_PRE = PreTokenizerSpec((_QWEN2,))

PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": _DEFAULT_PRE,
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe", "exaone4"), _GPT2_PRE),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        _DIGITS_PRE,
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"), _LLAMA3_PRE
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizerSpec((_LLAMA3,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), _QWEN2_PRE),
    "falcon": PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
}


def gpt2_byte_table() -> dict[str, int]:
    """Map each of GPT-2's 256 printable byte stand-ins back to the byte it encodes."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(0x100 + extra)] = b
            extra += 1
    return table


class Tokenizer:
    """A GGUF byte-level BPE vocabulary: text to token ids and back.

    Build it with `Tokenizer.from_gguf`; the constructor takes the raw metadata lists.

    Parameters
    ----------
    tokens, token_types, merges:
        ``tokenizer.ggml.tokens``, ``.token_type`` and ``.merges`` (merges as ``"a b"``).
    eos_id, bos_id:
        End- and beginning-of-sequence ids (``bos_id`` may be None).
    pre:
        ``tokenizer.ggml.pre``; an unknown value falls back to llama.cpp's ``default`` with a
        warning.
    add_bos:
        Whether prompts of this model start with BOS; None takes the pre-tokenizer's default.
    extra_eot_ids:
        Further ids that end a turn (``tokenizer.ggml.eot_token_id`` / ``eom_token_id``).

    Notes
    -----
    Encoding runs in Rust without shared mutable state, so one instance may be shared.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int] | None,
        merges: Sequence[str],
        *,
        eos_id: int,
        bos_id: int | None = None,
        pre: str = "default",
        add_bos: bool | None = None,
        extra_eot_ids: Iterable[int] = (),
    ) -> None:
        started = time.perf_counter()
        n = len(tokens)
        extra_eot_ids = tuple(extra_eot_ids)
        types = list(token_types) if token_types is not None else [TOKEN_NORMAL] * n
        assert len(types) == n, "token_types must be as long as tokens"
        for tid in (eos_id, bos_id, *extra_eot_ids):
            if tid is not None and not (isinstance(tid, int) and 0 <= tid < n):
                raise ValueError(f"special token id {tid} outside the vocabulary of {n}")
        spec = PRE_TOKENIZERS.get(pre)
        if spec is None:
            logger.warning(
                "unknown tokenizer.ggml.pre %r: using llama.cpp's 'default' regexes", pre
            )
            spec = _DEFAULT_PRE
        self.pre: str = pre
        self.vocab_size: int = n
        self.bos_id: int | None = bos_id
        self.eos_id: int = eos_id
        self.add_bos: bool = spec.add_bos if add_bos is None else add_bos

        # llama.cpp renames empty tokens so that every text maps to exactly one id.
        texts = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        vocab = {t: i for i, t in enumerate(texts)}
        if len(vocab) != n:
            raise ValueError(f"vocabulary has {n - len(vocab)} duplicate tokens")

        eog_named = {vocab[t] for t in EOG_TOKEN_TEXTS if t in vocab}
        for i in eog_named:
            if types[i] != TOKEN_CONTROL:
                # llama.cpp warns and overrides the type too, so it must also parse atomically.
                logger.warning("token %d %r ends a turn but is not control-type", i, texts[i])
                types[i] = TOKEN_CONTROL
        self._control = frozenset(i for i, t in enumerate(types) if t == TOKEN_CONTROL)
        self.eot_ids: frozenset[int] = frozenset({eos_id, *extra_eot_ids, *eog_named})
        # Text -> id of the tokens special parsing switches on and off (control and unknown:
        # those `tokenizers` holds as special).
        self.special_ids: dict[str, int] = {
            texts[i]: i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)
        }

        self._hf = self._build_hf(vocab, merges, texts, types, spec)
        # The same BPE model and pre-tokenizer (shared, not copied) behind a second front end
        # that tokenizes special-token texts as plain text; user-defined tokens stay atomic in
        # both, as in llama.cpp.
        self._hf_plain = self._wrap(
            self._hf.model, self._hf.pre_tokenizer, texts, types, special=False
        )
        # Packed: as lists of str and bytes these two cost each worker several MiB.
        self._texts = PackedBytes(t.encode("utf-8", "surrogatepass") for t in texts)
        self._pieces = PackedBytes(self._build_pieces(texts, types))
        logger.debug(
            "tokenizer: %d tokens, %d merges, pre %r, built in %.3f s",
            n,
            len(merges),
            pre,
            time.perf_counter() - started,
        )

    def _build_hf(
        self,
        vocab: dict[str, int],
        merges: Sequence[str],
        texts: Sequence[str],
        types: Sequence[int],
        spec: PreTokenizerSpec,
    ) -> HFTokenizer:
        pairs: list[tuple[str, str]] = []
        for merge in merges:
            # llama.cpp splits at the first space after the first character.
            cut = merge.find(" ", 1)
            left, right = merge[:cut], merge[cut + 1 :]
            # `tokenizers` panics (an uncatchable-by-Exception PanicException) on a merge whose
            # parts or result are not in the vocabulary; llama.cpp could never emit those tokens.
            if cut > 0 and left in vocab and right in vocab and left + right in vocab:
                pairs.append((left, right))
        if len(pairs) != len(merges):
            logger.warning("ignored %d merges outside the vocabulary", len(merges) - len(pairs))
        try:
            model = models.BPE(vocab, pairs, ignore_merges=spec.ignore_merges)
        except Exception as exc:  # tokenizers raises a bare Exception
            raise ValueError(f"cannot build the BPE model ({exc})") from exc
        pre = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), "isolated") for r in spec.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        return self._wrap(model, pre, texts, types, special=True)

    def _wrap(
        self,
        model: models.Model,
        pre: pre_tokenizers.PreTokenizer,
        texts: Sequence[str],
        types: Sequence[int],
        *,
        special: bool,
    ) -> HFTokenizer:
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre
        hf.encode_special_tokens = not special  # true: special tokens are not matched
        # Added after the model so that each keeps the id it already has in the vocabulary.
        specials, user = [], []
        for i, t in enumerate(types):
            if t in (TOKEN_CONTROL, TOKEN_UNKNOWN):
                specials.append(AddedToken(texts[i], special=True, normalized=False))
            elif t == TOKEN_USER_DEFINED:
                user.append(AddedToken(texts[i], special=False, normalized=False))
        hf.add_special_tokens(specials)
        hf.add_tokens(user)
        return hf

    @staticmethod
    def _build_pieces(texts: Sequence[str], types: Sequence[int]) -> list[bytes]:
        # str.translate + latin-1 does the byte-table lookup in C, not a Python loop per byte.
        to_bytes = {ord(ch): chr(b) for ch, b in gpt2_byte_table().items()}
        pieces: list[bytes] = []
        for text, kind in zip(texts, types, strict=True):
            if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_UNUSED):
                pieces.append(b"")
            elif kind == TOKEN_USER_DEFINED:
                pieces.append(text.encode())  # stored as raw text, as llama.cpp renders it
            else:
                try:
                    pieces.append(text.translate(to_bytes).encode("latin-1"))
                except UnicodeEncodeError:  # not byte-level text: render raw, like tokenizers
                    pieces.append(text.encode())
        return pieces

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata.

        Raises
        ------
        ModelLoadError
            If the tokenizer metadata is missing or malformed, or the tokenizer is not
            byte-level BPE (``tokenizer.ggml.model`` other than ``gpt2``).
        """
        meta = gguf.meta
        model = gguf.require("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelLoadError(
                f"{gguf.path}: tokenizer.ggml.model {model!r} is not supported "
                "(only byte-level BPE, 'gpt2')"
            )
        tokens = gguf.require("tokenizer.ggml.tokens")
        merges = gguf.require("tokenizer.ggml.merges")
        types = meta.get("tokenizer.ggml.token_type")
        eos_id = gguf.require("tokenizer.ggml.eos_token_id")
        for key, value, item in (
            ("tokens", tokens, str),
            ("merges", merges, str),
            ("token_type", types if types is not None else [], int),
        ):
            if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
                raise ModelLoadError(f"{gguf.path}: tokenizer.ggml.{key} is not a list of {item}")
        if types is not None and len(types) != len(tokens):
            raise ModelLoadError(
                f"{gguf.path}: tokenizer.ggml.token_type has {len(types)} entries "
                f"for {len(tokens)} tokens"
            )
        extra_eot = [
            meta[k]
            for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if k in meta
        ]
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        try:
            return cls(
                tokens,
                types,
                merges,
                eos_id=eos_id,
                bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                pre=meta.get("tokenizer.ggml.pre", "default"),
                add_bos=None if add_bos is None else bool(add_bos),
                extra_eot_ids=extra_eot,
            )
        except ValueError as exc:
            raise ModelLoadError(f"{gguf.path}: bad tokenizer ({exc})") from exc

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text``, no BOS added.

        With ``special`` (llama.cpp's ``parse_special``) the text of a control token becomes its
        single id; without, it is tokenized as the plain characters it is. Chat prompts go
        through ``prompt.PromptCodec``, which parses only the template's own markers.
        """
        hf = self._hf if special else self._hf_plain
        return hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], *, special: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD.

        Control tokens render as nothing unless ``special`` is true, then as their text.
        """
        if special:
            parts = [self._texts[i] if i in self._control else self.token_bytes(i) for i in ids]
        else:
            parts = [self.token_bytes(i) for i in ids]
        return b"".join(parts).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token ``token_id`` stands for (``b""`` for control tokens).

        A token can end in the middle of a multi-byte UTF-8 character.

        Raises
        ------
        ValueError
            If ``token_id`` is outside the vocabulary.
        """
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary of {self.vocab_size}")
        return self._pieces[token_id]

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` as stored in the GGUF (e.g. ``"<|im_end|>"``)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary of {self.vocab_size}")
        return self._texts[token_id].decode("utf-8", "surrogatepass")

    def is_control(self, token_id: int) -> bool:
        """Whether ``token_id`` is a control token (rendered as nothing when decoding)."""
        return token_id in self._control


class StreamDecoder:
    """Turn generated token ids into text as they come, never splitting a UTF-8 character.

    The concatenation of every `push` result and the final `flush` equals
    ``tokenizer.decode(ids)``.

    Parameters
    ----------
    tokenizer:
        The tokenizer whose ids will be pushed.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # Python's incremental decoder holds back an incomplete trailing sequence and, with
        # "replace", yields the same U+FFFD as a one-shot decode for invalid bytes.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []

    def push(self, token_id: int) -> str:
        """Add one token; return the characters it completes (maybe ``""``)."""
        chunk = self._utf8.decode(self._tokenizer.token_bytes(token_id))
        if chunk:
            self._parts.append(chunk)
        return chunk

    def flush(self) -> str:
        """Return what is still buffered, an incomplete character becoming U+FFFD.

        The decoder can keep being pushed to afterwards.
        """
        chunk = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        if chunk:
            self._parts.append(chunk)
        return chunk

    @property
    def at_boundary(self) -> bool:
        """True when no bytes of an incomplete character are held back.

        The worker commits a reply only up to such a point, so committed text and tokens agree.
        """
        return not self._utf8.getstate()[0]

    @property
    def text(self) -> str:
        """Everything returned by `push` and `flush` so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""
