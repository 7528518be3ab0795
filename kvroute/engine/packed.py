"""A read-only list of byte strings packed into one buffer.

A tokenizer keeps two entries per vocabulary id (its text and its bytes). As Python lists of
49,152 small objects those cost every worker process several MiB of private memory; packed, they
cost one bytes object and one offsets array.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable


class PackedBytes:
    """``items[i]`` of the byte strings given, held in one buffer."""

    __slots__ = ("_blob", "_ends")

    def __init__(self, items: Iterable[bytes]) -> None:
        parts: list[bytes] = []
        ends = array("Q")
        total = 0
        for item in items:
            parts.append(item)
            total += len(item)
            ends.append(total)
        self._blob = b"".join(parts)
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> bytes:
        """The ``i``-th string; ``i`` must lie in ``0..len-1`` (no negative indexing)."""
        if not 0 <= i < len(self._ends):
            raise IndexError(f"index {i} outside 0..{len(self._ends) - 1}")
        start = self._ends[i - 1] if i else 0
        return self._blob[start : self._ends[i]]
