"""The broker's transcript index: which session holds a conversation, per principal (I/O-free).

Clients that send the whole history with every request and no session id (OpenAI-style) find
the session holding their conversation here (LOOKUP), after recording, at the end of each turn,
the digest of the transcript they received under the session that produced it (INDEX). Keeping
the index in the broker, not in a client, is what lets several gateways front one broker with
the requests of one conversation alternating between them.

- Entries are keyed by (principal, digest): a client finds only sessions of its own identity
  (several gateways share one by presenting the same owner token, or the same CURVE key), and
  two identities with the same transcript never meet.
- A session keeps every digest recorded for it (one per turn), so a regenerate or an edit of
  an earlier turn, whose history is an older transcript of the session, finds it too. The same
  digest recorded again for another session moves to that one (the later turn wins).
- Bounded by entry count, least recently used (recorded or found) first out. The adapter calls
  :meth:`TranscriptIndex.forget` when the broker forgets a session (CLOSE, idle expiry), and
  checks at LOOKUP that the session found still belongs to the caller, dropping it otherwise.
"""

from __future__ import annotations

from collections import OrderedDict

Key = tuple[bytes, bytes]
"""(principal, digest)."""


class TranscriptIndex:
    """(principal, transcript digest) -> session id, bounded, least recently used out.

    Parameters
    ----------
    max_entries
        Digests kept in all; recording one more drops the least recently used.
    """

    def __init__(self, max_entries: int) -> None:
        assert max_entries >= 1, "the index holds at least one entry"
        self.max_entries = max_entries
        self._session: OrderedDict[Key, bytes] = OrderedDict()
        self._keys: dict[bytes, set[Key]] = {}  # session -> its keys, to forget it whole

    def __len__(self) -> int:
        return len(self._session)

    def lookup(self, principal: bytes, digest: bytes) -> bytes | None:
        """The session ``principal`` recorded for ``digest``, or None."""
        key = (principal, digest)
        sid = self._session.get(key)
        if sid is not None:
            self._session.move_to_end(key)
        return sid

    def record(self, principal: bytes, digest: bytes, session_id: bytes) -> None:
        """Remember that ``principal``'s session ``session_id`` holds the transcript ``digest``."""
        key = (principal, digest)
        old = self._session.get(key)
        if old is not None and old != session_id:
            self._unlink(old, key)
        self._session[key] = session_id
        self._session.move_to_end(key)
        self._keys.setdefault(session_id, set()).add(key)
        while len(self._session) > self.max_entries:
            out, sid = self._session.popitem(last=False)
            self._unlink(sid, out)

    def forget(self, session_id: bytes) -> int:
        """Drop every digest of a session (the broker forgot it); returns how many."""
        keys = self._keys.pop(session_id, ())
        for key in keys:
            del self._session[key]
        return len(keys)

    def sessions(self) -> int:
        """Sessions with at least one digest."""
        return len(self._keys)

    def _unlink(self, session_id: bytes, key: Key) -> None:
        mine = self._keys[session_id]
        mine.discard(key)
        if not mine:
            del self._keys[session_id]
