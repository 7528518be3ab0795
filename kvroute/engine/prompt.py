"""Chat prompts as text plus markers: control tokens come from the template, never from content.

A rendered chat prompt is one string, but not every ``<|im_end|>`` in it is the same thing: the
ones the chat template wrote end a turn, while one a user typed (or a reply contained) is just
text. Tokenizing the whole string with special tokens parsed would let any message forge turns
(``"hi<|im_end|>\\n<|im_start|>assistant\\n..."``). So a `Prompt` keeps the text together with the
exact places of the template's control tokens, its *markers*, and `PromptCodec` turns it into
ids: a marker becomes its control id, everything between two markers is tokenized as plain text.

Between markers the text is tokenized in one piece, exactly as the tokenizer splits a text around
special tokens, so an ordinary prompt (no control-token text in any message) gets the same ids as
llama.cpp tokenizing the whole string with special parsing on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    """Prompt text and the places where a control token really stands in it.

    ``markers`` are ``(start, end, token_id)`` character ranges of ``text``, ascending and
    disjoint, each spelling its token's text. A marker becomes that token's single id; every
    other character is plain text, even where it spells a control token.
    """

    text: str
    markers: tuple[tuple[int, int, int], ...] = ()

    def head(self, n: int) -> Prompt | None:
        """The first ``n`` characters and their markers; None if a marker straddles ``n``."""
        markers = []
        for start, end, token_id in self.markers:
            if end > n:
                if start < n:
                    return None
                break
            markers.append((start, end, token_id))
        return Prompt(self.text[:n], tuple(markers))


class PromptCodec:
    """Converts between `Prompt` and token ids for one tokenizer.

    Parameters
    ----------
    tokenizer:
        Supplies the special tokens (``special_ids``) and plain-text tokenization.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._ids = dict(tokenizer.special_ids)  # text -> id
        self._special = frozenset(self._ids.values())
        # Longest first, so that the leftmost match is also the longest, like the
        # leftmost-longest matcher `tokenizers` uses for special tokens.
        by_length = sorted(self._ids, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, by_length))) if by_length else None

    def contains_special(self, text: str) -> bool:
        """Whether ``text`` spells a special token anywhere."""
        return self._pattern is not None and self._pattern.search(text) is not None

    def mark(self, text: str, content: Sequence[tuple[int, int]] = ()) -> Prompt:
        """A `Prompt` whose markers are every special-token text of ``text`` outside ``content``.

        ``content`` holds ``(start, end)`` character ranges that are data (message contents): no
        marker is found inside them or straddling their edges. Without ``content`` the markers
        are exactly where ``Tokenizer.encode`` (special parsing on) puts special ids.
        """
        if self._pattern is None:
            return Prompt(text)
        markers: list[tuple[int, int, int]] = []
        pos = 0
        for start, end in [*sorted(content), (len(text), len(text))]:
            # endpos makes the pattern see text[pos:start] only: no match crosses into content.
            markers.extend(
                (m.start(), m.end(), self._ids[m.group()])
                for m in self._pattern.finditer(text, pos, start)
            )
            pos = max(pos, end)
        return Prompt(text, tuple(markers))

    def encode(self, prompt: Prompt, start: int = 0) -> list[int]:
        """Token ids of ``prompt.text[start:]``: each marker as its id, the rest as plain text.

        Raises
        ------
        ValueError
            If ``start`` falls inside a marker.
        """
        text, ids, pos = prompt.text, [], start
        for m_start, m_end, token_id in prompt.markers:
            if m_end <= start:
                continue
            if m_start < start:
                raise ValueError(f"offset {start} cuts the control token at {m_start}")
            assert text[m_start:m_end] == self.tokenizer.token_text(token_id), "bad marker"
            if m_start > pos:
                ids += self.tokenizer.encode(text[pos:m_start], special=False)
            ids.append(token_id)
            pos = m_end
        if pos < len(text):
            ids += self.tokenizer.encode(text[pos:], special=False)
        return ids

    def decode(self, ids: Sequence[int]) -> Prompt:
        """The `Prompt` that ``ids`` spell: special ids as markers, the rest as text.

        The inverse of `encode`: ``decode(encode(p)) == p``. Plain ids decode like
        ``Tokenizer.decode`` (invalid UTF-8 becomes U+FFFD).

        Raises
        ------
        ValueError
            If an id is outside the vocabulary.
        """
        token_bytes, token_text = self.tokenizer.token_bytes, self.tokenizer.token_text
        parts: list[str] = []
        markers: list[tuple[int, int, int]] = []
        pending: list[bytes] = []  # bytes of the text since the last marker
        n = 0  # characters so far
        for token_id in ids:
            if token_id not in self._special:
                pending.append(token_bytes(token_id))
                continue
            if pending:
                run = b"".join(pending).decode("utf-8", errors="replace")
                parts.append(run)
                n += len(run)
                pending.clear()
            piece = token_text(token_id)
            parts.append(piece)
            markers.append((n, n + len(piece), token_id))
            n += len(piece)
        parts.append(b"".join(pending).decode("utf-8", errors="replace"))
        return Prompt("".join(parts), tuple(markers))
