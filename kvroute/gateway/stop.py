"""Stop strings over a stream of text pieces: hold back what could start a match, cut at one.

A stop string may arrive split across pieces (``"ST"`` then ``"OP"``), so a piece is not passed
on while its tail could still become a stop string: :class:`StopMatcher` keeps back the
longest tail that is a proper prefix of some stop string and releases it once the next piece
rules the match out. The reply ends before the earliest match; the match itself is never
released. I/O-free: the gateway feeds it the library's pieces and forwards what it returns.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Cuts a streamed reply at the first occurrence of any stop string.

    Parameters
    ----------
    stops
        Non-empty stop strings; none means every piece passes through unchanged.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        assert all(stops), "stop strings are non-empty (checked at the edge)"
        self.stops: tuple[str, ...] = tuple(stops)
        self._held = ""
        self._parts: list[str] = []
        self.matched: str | None = None  # the stop string that ended the reply

    @property
    def text(self) -> str:
        """Everything released so far (the reply as the client receives it)."""
        return "".join(self._parts)

    def feed(self, piece: str) -> str:
        """Take the next piece; return the text that can be released now ('' if none).

        After a match (:attr:`matched` set), the caller must stop feeding.
        """
        assert self.matched is None, "fed after a stop string matched"
        if not self.stops:
            self._parts.append(piece)
            return piece
        text = self._held + piece
        cut, found = len(text), None
        for s in self.stops:
            i = text.find(s)
            if i != -1 and i < cut:
                cut, found = i, s
        if found is not None:
            self.matched, self._held = found, ""
            return self._release(text[:cut])
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep :]
        return self._release(text[: len(text) - keep])

    def flush(self) -> str:
        """At the end of the stream: release what was held back (it matched nothing)."""
        held, self._held = self._held, ""
        return self._release(held)

    def _release(self, out: str) -> str:
        if out:
            self._parts.append(out)
        return out

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
