"""Stop strings over streamed text: hold back what could start a match, cut at one (I/O-free).

A stop string may arrive split across tokens (``"ST"`` then ``"OP"``), so text is not released
while its tail could still become a stop string: :class:`StopMatcher` keeps back the longest
tail that is a proper prefix of some stop string and releases it once the next piece rules the
match out. Generation stops with the first piece after which a stop string occurs (later text
is never generated), and the reply ends before the earliest occurrence in the text so far; the
match itself is never released.

Why this is exact: text already released never ends with the start of a stop string (the
longest such tail was held), so a match can only start inside the held text, which is searched
together with each new piece.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Cuts streamed text at the first occurrence of any stop string.

    Parameters
    ----------
    stops
        Non-empty stop strings; none means every piece passes through unchanged.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        assert all(stops), "stop strings are non-empty (checked when the TURN was decoded)"
        self.stops: tuple[str, ...] = tuple(stops)
        self.matched: str | None = None  # the stop string that ended the text
        self._held = ""

    @property
    def held(self) -> str:
        """Text taken but not released yet (it could begin a stop string)."""
        return self._held

    def feed(self, piece: str) -> str:
        """Take the next piece; return the text that can be released now ('' if none).

        After a match (:attr:`matched` set) nothing more is released: the caller stops.
        """
        if not self.stops:
            return piece
        if self.matched is not None:
            return ""
        text = self._held + piece
        cut, found = len(text), None
        for s in self.stops:
            i = text.find(s)
            if i != -1 and i < cut:
                cut, found = i, s
        if found is not None:
            self.matched, self._held = found, ""
            return text[:cut]
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of the text: release what was held back (it matched nothing)."""
        held, self._held = self._held, ""
        return held

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            first = s[0]
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text[-n] == first and text.endswith(s[:n]):
                    best = n
                    break
        return best
