"""The gateway's HTTP protocol: a response's head leaves in one write with its first body bytes."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from kvroute.gateway.protocol import GatewayHttpProtocol, HeadWithBodyTransport

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"


class Recorder(asyncio.Transport):
    """A transport that records each write (the socket writes a real one would make)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_a_head_is_joined_to_the_next_write() -> None:
    async def main() -> list[bytes]:
        rec = Recorder()
        t = HeadWithBodyTransport(rec)
        t.write(HEAD)
        assert rec.writes == [] and t.get_write_buffer_size() == len(HEAD)
        t.write(b"5\r\nhello\r\n")
        t.write(b"0\r\n\r\n")  # later writes go out as they come
        await asyncio.sleep(0.01)  # the cancelled flush writes nothing twice
        return rec.writes

    assert asyncio.run(main()) == [HEAD + b"5\r\nhello\r\n", b"0\r\n\r\n"]


def test_a_head_alone_leaves_at_the_next_loop_step_or_at_close() -> None:
    async def main() -> tuple[list[bytes], list[bytes], bool, bool]:
        rec = Recorder()
        t = HeadWithBodyTransport(rec)
        t.write(HEAD)
        await asyncio.sleep(0)
        alone = list(rec.writes)
        rec2 = Recorder()
        t2 = HeadWithBodyTransport(rec2)
        t2.write(HEAD)
        t2.close()  # flushed first: nothing is lost
        rec3 = Recorder()
        t3 = HeadWithBodyTransport(rec3)
        t3.write(HEAD)
        t3.abort()  # dropped, as a real abort drops unsent data
        await asyncio.sleep(0.01)
        return alone, rec2.writes, rec2.closed, bool(rec3.writes)

    alone, closed_writes, closed, aborted_wrote = asyncio.run(main())
    assert alone == [HEAD]
    assert closed_writes == [HEAD] and closed
    assert not aborted_wrote


def test_other_writes_are_not_held() -> None:
    async def main() -> list[bytes]:
        rec = Recorder()
        t = HeadWithBodyTransport(rec)
        t.write(b"data: 1\n\n")
        t.write(memoryview(b"data: 2\n\n"))
        return rec.writes

    assert asyncio.run(main()) == [b"data: 1\n\n", b"data: 2\n\n"]


def test_uvicorn_sends_the_head_with_the_first_event() -> None:
    """Through uvicorn's httptools protocol: two ASGI messages, one write; the next apart."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": False})

    async def main() -> list[bytes]:
        config = uvicorn.Config(app, http=GatewayHttpProtocol, lifespan="off", log_config=None)
        config.load()
        proto = GatewayHttpProtocol(config=config, server_state=ServerState(), app_state={})
        rec = Recorder()
        proto.connection_made(rec)
        proto.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        for _ in range(100):
            if any(w.endswith(b"0\r\n\r\n") for w in rec.writes):
                break
            await asyncio.sleep(0.01)
        proto.connection_lost(None)
        return rec.writes

    writes = asyncio.run(main())
    assert writes[0].startswith(b"HTTP/1.1 200 ")
    assert writes[0].endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n")
    assert b"data: 2" not in writes[0]
    assert b"data: 2" in b"".join(writes[1:])
