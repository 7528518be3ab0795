"""ZeroMQ addresses: one parser for every command, the client library, broker and worker.

A mistyped address must fail at once with one line that says what is wrong and what is
expected, in the same words wherever it was typed; ZeroMQ's own ``ZMQError: Invalid argument``
says neither. Accepted forms:

- ``tcp://HOST:PORT``: ``HOST`` a name, an IPv4 address or a bracketed IPv6 one (``[::1]``);
  ``PORT`` 1..65535. A side that binds may also use ``*`` as host and ``0`` or ``*`` as port
  (any interface, any free port).
- ``HOST:PORT``: short for ``tcp://HOST:PORT`` (``localhost:5555`` works as users expect).
- ``ipc://PATH``: a Unix socket path (``@name`` for Linux's abstract namespace), at most
  :data:`MAX_IPC_PATH_BYTES` bytes; ``ipc://*`` (a fresh path) when binding.
- ``inproc://NAME``: within one process (tests).
"""

from __future__ import annotations

import re

MAX_IPC_PATH_BYTES: int = 107
"""Longest ipc path Linux accepts (``sun_path`` is 108 bytes with its terminating NUL)."""

FORMS = "use tcp://HOST:PORT, HOST:PORT or ipc://PATH"
"""The hint every endpoint error ends with."""

_SCHEMES = ("tcp", "ipc", "inproc")
_HOST = re.compile(r"\[[0-9A-Za-z:.%]+\]|\*|[A-Za-z0-9_.\-]+")


class EndpointError(ValueError):
    """An address that is not a usable ZeroMQ endpoint; the message is one line."""

    def __init__(self, text: str, why: str) -> None:
        self.text: str = text
        self.why: str = why
        super().__init__(f"bad address {text!r}: {why}; {FORMS}")


def parse_endpoint(text: str, *, bind: bool = False) -> str:
    """Check an address and return it as ZeroMQ takes it (``HOST:PORT`` gains ``tcp://``).

    Parameters
    ----------
    text
        What the user or caller gave.
    bind
        The address is bound (broker) rather than connected to (client, worker): wildcards
        (``*`` host, port ``0`` or ``*``, ``ipc://*``) are allowed.

    Raises
    ------
    EndpointError
        A ``ValueError`` whose message names the address, the problem and the accepted forms.
    """
    if not isinstance(text, str):
        raise EndpointError(repr(text), f"an address is a string, not {type(text).__name__}")
    raw = text.strip()
    if not raw:
        raise EndpointError(text, "empty")
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "tcp", raw
        if raw.isdigit():
            raise EndpointError(text, f"no host (for this machine: 127.0.0.1:{raw})")
        if ":" not in raw:
            raise EndpointError(text, "no port")
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        raise EndpointError(text, f"unknown scheme {scheme}://")
    if scheme == "tcp":
        return f"tcp://{_tcp(text, rest, bind)}"
    if not rest:
        raise EndpointError(text, f"no {'path' if scheme == 'ipc' else 'name'} after {scheme}://")
    if scheme == "ipc":
        if rest == "*" and not bind:
            raise EndpointError(text, "ipc://* (a fresh path) is for binding, not connecting")
        if len(rest.encode()) > MAX_IPC_PATH_BYTES:
            raise EndpointError(text, f"ipc path longer than {MAX_IPC_PATH_BYTES} bytes")
    return f"{scheme}://{rest}"


def _tcp(text: str, rest: str, bind: bool) -> str:
    host, colon, port = rest.rpartition(":")
    if not colon or not port:
        raise EndpointError(text, "no port")
    if not host:
        raise EndpointError(text, "no host")
    if not _HOST.fullmatch(host):
        why = "IPv6 addresses go in brackets, e.g. [::1]" if ":" in host else "not a host name"
        raise EndpointError(text, why)
    wildcard_port = port == "*" or (port.isascii() and port.isdigit() and int(port) == 0)
    if not bind and (host == "*" or wildcard_port):
        raise EndpointError(text, "wildcards (* host, port 0 or *) are for binding only")
    if port != "*":
        if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
            raise EndpointError(text, f"port {port!r} is not a number 1..65535")
        port = str(int(port))
    return f"{host}:{port}"
