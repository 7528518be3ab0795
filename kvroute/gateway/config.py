"""Gateway configuration (the CLI takes its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.client import DEFAULT_MAX_TOKENS, DEFAULT_TIMEOUT
from kvroute.proto.identity import check_owner_token

DEFAULT_HTTP_HOST: str = "127.0.0.1"
DEFAULT_HTTP_PORT: int = 8000
DEFAULT_HTTP: str = f"{DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}"


@dataclass
class GatewayConfig:
    """Where the gateway listens, which broker it fronts, and its limits.

    Raises ValueError at construction for settings that cannot work.
    """

    connect: str = "tcp://127.0.0.1:5555"  # the broker's frontend (this gateway is a client)
    host: str = DEFAULT_HTTP_HOST  # HTTP listen address
    port: int = DEFAULT_HTTP_PORT  # HTTP port; 0 = any free port (the bound one is reported)
    timeout: float = DEFAULT_TIMEOUT  # seconds to wait for each reply frame from the broker
    # Model names GET /v1/models lists and responses carry; empty: the models the live workers
    # serve are listed, and a response carries the name its request gave.
    models: tuple[str, ...] = ()
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # reply limit when a request sets none
    default_temperature: float = 1.0  # OpenAI's default when a request omits temperature
    max_in_flight: int = 256  # HTTP chat requests running at once; one more gets 429
    max_body_bytes: int = 4 << 20  # HTTP request body limit; above it: 400 too_large
    # Sessions this gateway keeps open on the broker; beyond it the least recently used idle
    # ones are closed (the broker also limits sessions per client identity, which gateways
    # sharing an owner token share: keep the sum of theirs below that).
    max_sessions: int = 2048
    health_timeout: float = 2.0  # seconds GET /health and /v1/models wait for the broker
    # Without CURVE: the owner token this gateway presents; gateways given the same one share
    # sessions, so a conversation keeps its session whichever of them its requests reach.
    # None: a random one (this gateway's sessions are its own).
    owner_token: bytes | None = None
    # CURVE towards the broker (both or neither): its public key and this gateway's key pair.
    # Gateways that share one key share sessions (the broker ties sessions to the key).
    server_key: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, not {self.port}")
        if not self.timeout > 0 or not self.health_timeout > 0:
            raise ValueError("timeouts must be positive")
        if not all(isinstance(m, str) and m for m in self.models):
            raise ValueError("model names must be non-empty strings")
        for name in ("max_in_flight", "max_body_bytes", "max_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if (self.server_key is None) != (self.key is None):
            raise ValueError("CURVE needs both server_key and key (or neither)")
        if self.owner_token is not None:
            check_owner_token(self.owner_token)
            if self.key is not None:
                raise ValueError("an owner token is for brokers without CURVE (the key owns)")

    @property
    def url(self) -> str:
        """The HTTP base URL (meaningful once the port is known)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT`` for IPv6; port 0: any free port) as ``(host, port)``.

    Raises
    ------
    ValueError
        A one-line explanation with the expected form.
    """
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad HTTP address {text!r}: use HOST:PORT, e.g. {DEFAULT_HTTP}")
    return host, int(port)
