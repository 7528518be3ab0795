"""A raw protocol client for process-level tests: one DEALER, explicit frames, bounded waits."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import zmq

from kvroute.proto import (
    ChatMessage,
    ErrorCode,
    ErrorReply,
    Kind,
    Reply,
    Role,
    Token,
    TurnEnd,
    TurnRequest,
    parse_reply,
    request_frames,
)


@dataclass
class Result:
    """What came back for one request."""

    tokens: list[Token] = field(default_factory=list)
    kind: Kind | None = None  # the terminal kind, None on timeout
    body: bytes = b""

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    @property
    def end(self) -> TurnEnd:
        assert self.kind == Kind.END, (self.kind, self.body[:200])
        return TurnEnd.decode(self.body)


class WireClient:
    """A DEALER speaking kvroute frames, for tests (the library client lives in kvroute.client)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], url: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)

    def close(self) -> None:
        self.sock.close(linger=0)

    def send_turn(self, sid: bytes, rid: bytes, texts: list[str], max_tokens: int = 8) -> None:
        msgs = []
        for i, t in enumerate(texts):
            msgs.append(ChatMessage(Role.USER if i % 2 == 0 else Role.ASSISTANT, t))
        body = TurnRequest(messages=tuple(msgs), max_tokens=max_tokens).encode()
        self.sock.send_multipart(request_frames(Kind.TURN, sid, rid, body))

    def send(self, kind: Kind, sid: bytes, rid: bytes) -> None:
        self.sock.send_multipart(request_frames(kind, sid, rid))

    def recv(self, timeout: float = 10.0) -> Reply | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return parse_reply(self.sock.recv_multipart())

    def collect(
        self, rid: bytes, timeout: float = 30.0, cancelled: Collection[bytes] = ()
    ) -> Result:
        """Read replies of request ``rid`` until its terminal frame (others are an error).

        ``cancelled``: earlier requests this client cancelled. One that had ended before the
        broker read its CANCEL gets a late ERROR ``not_in_flight``; those are skipped.
        """
        res = Result()
        while True:
            r = self.recv(timeout)
            if r is None:
                return res
            if r.request_id in cancelled and r.kind == Kind.ERROR:
                assert ErrorReply.decode(r.body).code is ErrorCode.NOT_IN_FLIGHT, r.body[:200]
                continue
            assert r.request_id == rid, (r.request_id, rid)
            if r.kind == Kind.TOKEN:
                res.tokens.append(Token.decode(r.body))
                continue
            res.kind, res.body = r.kind, r.body
            return res

    def turn(
        self,
        sid: bytes,
        rid: bytes,
        texts: list[str],
        max_tokens: int = 8,
        cancelled: Collection[bytes] = (),
    ) -> Result:
        self.send_turn(sid, rid, texts, max_tokens)
        return self.collect(rid, cancelled=cancelled)
