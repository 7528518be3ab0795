"""uvicorn's httptools HTTP protocol, with each response's head sent with its first body bytes.

httptools (llhttp, in C) parses a request in a fraction of the time the pure-Python h11 takes,
which is most of what the gateway adds to a turn's time to first token besides the two writes
below.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, and the body with each ``http.response.body``: two socket writes for
the first event of a stream, and the client wakes up twice, the first time only to find
the headers. Both cost time before the client sees the first token. :class:`HeadWithBodyTransport`
holds a write that is a response head until the next write (which it joins) or, at the latest,
the end of the current event-loop step (e.g. an app that awaits something between the two
messages). Bytes always leave in the order they were written; only their grouping changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD = b"HTTP/"  # every response head uvicorn writes starts so (one write per head)


class HeadWithBodyTransport(asyncio.Transport):
    """A transport that delays a response head until the next write or the loop's next step.

    Parameters
    ----------
    transport
        The connection's transport; every other call is passed on to it.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._t = transport
        self._held = b""
        self._flush_soon: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data``, joined to a held head; a head alone is held (see the module)."""
        if self._held:
            held, self._held = self._held, b""
            self._cancel_flush()
            self._t.write(held + data)
        elif bytes(data[: len(_HEAD)]) == _HEAD and not self._t.is_closing():
            self._held = bytes(data)
            self._flush_soon = asyncio.get_running_loop().call_soon(self.flush)
        else:
            self._t.write(data)

    def flush(self) -> None:
        """Write a held head now."""
        self._cancel_flush()
        if self._held:
            held, self._held = self._held, b""
            self._t.write(held)

    def _cancel_flush(self) -> None:
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None

    def writelines(self, list_of_data: Any) -> None:
        """Write each item in order."""
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        """Flush, then close the write side."""
        self.flush()
        self._t.write_eof()

    def can_write_eof(self) -> bool:
        """Whether :meth:`write_eof` is supported."""
        return self._t.can_write_eof()

    def close(self) -> None:
        """Flush, then close (buffered data is still sent)."""
        self.flush()
        self._t.close()

    def abort(self) -> None:
        """Close at once, dropping anything unsent (a held head too)."""
        self._cancel_flush()
        self._held = b""
        self._t.abort()

    def is_closing(self) -> bool:
        """Whether the transport is closing or closed."""
        return self._t.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The underlying transport's extra info (socket, peername, ...)."""
        return self._t.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the connection to another protocol (flushing first)."""
        self.flush()
        self._t.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The protocol the transport feeds."""
        return self._t.get_protocol()

    def is_reading(self) -> bool:
        """Whether the transport is receiving."""
        return self._t.is_reading()

    def pause_reading(self) -> None:
        """Stop receiving until :meth:`resume_reading`."""
        self._t.pause_reading()

    def resume_reading(self) -> None:
        """Receive again."""
        self._t.resume_reading()

    def get_write_buffer_size(self) -> int:
        """Bytes not yet sent, a held head included."""
        return self._t.get_write_buffer_size() + len(self._held)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """The flow-control watermarks."""
        return self._t.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Set the flow-control watermarks."""
        self._t.set_write_buffer_limits(high, low)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a :class:`HeadWithBodyTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadWithBodyTransport(transport))
