"""Who a peer is: CURVE key files, and the owner token of clients that do not use CURVE.

Shared by the broker (its secret certificate, the allowed public keys), workers and clients
(the broker's public key, their own key pair). Key files are the certificates pyzmq writes
(``zmq.auth.create_certificates``, ``kvroute keys generate``): ``NAME.key`` holds a public key,
``NAME.key_secret`` the public and the secret key. Keys travel as z85 text (40 characters).

Every loader fails loudly with :class:`KeyFileError` (one line: which file, what is wrong).
pyzmq's own ``Authenticator.configure_curve`` logs an unreadable directory and carries on
refusing everyone, and a misconfigured client would wait forever on a silent handshake: both
are worse than refusing to start.

Without CURVE, a client's ZeroMQ routing id is its identity, and the library client sets it to
a random :func:`new_owner_token`: the broker binds each session to the identity that created it
(see :mod:`kvroute.proto`). This module imports pyzmq, so ``kvroute.proto`` does not import it.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

Z85_KEY_CHARS: int = 40
"""A CURVE key (32 bytes) in z85 text."""

MAX_OWNER_TOKEN_BYTES: int = 255
"""ZeroMQ's limit on a routing id, which is what carries the owner token."""

KeyPath = str | os.PathLike[str]
"""A key file on disk."""

KeyPair = tuple[bytes, bytes]
"""(public, secret), both z85."""


class KeyFileError(ValueError):
    """A CURVE key file or directory is missing, unreadable or malformed (message: one line)."""


def new_owner_token() -> bytes:
    """A fresh owner token: 128 random bits as 22 URL-safe characters.

    Printable, so it can be saved with a chat; never starts with a zero byte, which ZeroMQ
    reserves for the routing ids it generates itself.
    """
    return secrets.token_urlsafe(16).encode()


def check_owner_token(token: bytes) -> bytes:
    """Return ``token`` if it can be a routing id (1..255 bytes, first byte not zero).

    Raises
    ------
    ValueError
        Otherwise.
    """
    if not 0 < len(token) <= MAX_OWNER_TOKEN_BYTES or token[0] == 0:
        raise ValueError(
            f"owner token must be 1..{MAX_OWNER_TOKEN_BYTES} bytes not starting with a zero byte"
        )
    return token


def _z85_key(text: bytes, what: str) -> bytes:
    """``text`` if it is a z85-encoded 32-byte key, else KeyFileError."""
    try:
        ok = len(text) == Z85_KEY_CHARS and len(z85.decode(text)) == 32
    except (KeyError, ValueError, IndexError):
        ok = False
    if not ok:
        raise KeyFileError(f"{what} is not a CURVE key ({Z85_KEY_CHARS} characters of z85)")
    return text


def _read_cert(path: KeyPath) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a certificate file, errors as KeyFileError."""
    p = Path(path)
    if not p.is_file():
        raise KeyFileError(f"cannot read CURVE key file {p}: no such file")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except OSError as exc:
        raise KeyFileError(f"cannot read CURVE key file {p}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise KeyFileError(f"CURVE key file {p} holds no public key") from exc
    _z85_key(public, f"the public key in {p}")
    if secret is not None:
        _z85_key(secret, f"the secret key in {p}")
    return public, secret


def load_public_key(key: KeyPath | bytes) -> bytes:
    """A public key (z85) from a certificate file (``.key`` or ``.key_secret``) or z85 text.

    A ``str`` or path naming an existing file is read as a certificate; otherwise a 40-character
    ``str`` or ``bytes`` is taken as the key itself.

    Raises
    ------
    KeyFileError
        No such file, an unreadable or malformed one, or text that is not a key.
    """
    if isinstance(key, bytes):
        return _z85_key(key, "the given key")
    if isinstance(key, str) and len(key) == Z85_KEY_CHARS and not os.path.exists(key):
        return _z85_key(key.encode("ascii", "replace"), "the given key")
    return _read_cert(key)[0]


def load_key_pair(key: KeyPath | KeyPair) -> KeyPair:
    """A (public, secret) pair from a secret certificate (``.key_secret``), or checked as given.

    Raises
    ------
    KeyFileError
        The file is missing, unreadable, has no secret key (a public ``.key`` file), or its
        two keys do not belong together.
    """
    if isinstance(key, tuple):
        where = "the given key pair"
        if len(key) != 2 or not all(isinstance(k, bytes) for k in key):
            raise KeyFileError(f"{where} is not (public, secret) z85 bytes")
        public, secret = _z85_key(key[0], where), _z85_key(key[1], where)
    else:
        public, maybe = _read_cert(key)
        where = str(key)
        if maybe is None:
            raise KeyFileError(f"{where} holds no secret key (give the .key_secret file)")
        secret = maybe
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{where}: the public key does not match the secret key")
    return public, secret


def load_allowed_keys(directory: KeyPath) -> frozenset[bytes]:
    """The public keys (z85) of every ``*.key`` certificate in ``directory``.

    Raises
    ------
    KeyFileError
        Not a directory, a certificate that cannot be read, or no certificate at all (a broker
        that lets nobody in is a configuration mistake, not a policy).
    """
    d = Path(directory)
    if not d.is_dir():
        raise KeyFileError(f"cannot read allowed keys from {d}: not a directory")
    try:
        files = sorted(d.glob("*.key"))
    except OSError as exc:
        raise KeyFileError(f"cannot read allowed keys from {d}: {exc.strerror or exc}") from exc
    keys = frozenset(_read_cert(f)[0] for f in files)
    if not keys:
        raise KeyFileError(f"no public keys (*.key files) in {d}: nobody could connect")
    return keys


@dataclass(frozen=True, slots=True)
class CurveClient:
    """The CURVE settings of a connecting socket (a client's or a worker's DEALER).

    Attributes
    ----------
    server_key
        The broker's public key (z85).
    public, secret
        This peer's key pair (z85); the public key must be among the broker's allowed keys.
    """

    server_key: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(
        cls, server_key: KeyPath | bytes | None, key: KeyPath | KeyPair | None
    ) -> CurveClient | None:
        """Resolve ``server_key`` and ``key`` (see :func:`load_public_key`,
        :func:`load_key_pair`); None when both are None (plaintext).

        Raises
        ------
        KeyFileError
            A bad key, or only one of the two given (CURVE needs both).
        """
        if server_key is None and key is None:
            return None
        if server_key is None or key is None:
            raise KeyFileError(
                "CURVE needs both the server's public key and this peer's own key pair"
            )
        public, secret = load_key_pair(key)
        return cls(load_public_key(server_key), public, secret)

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        """Make ``sock`` a CURVE client (call before ``connect``)."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
