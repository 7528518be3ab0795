"""Declared bodies: each body is one msgspec ``Struct`` whose fields say name, type, limits and
default once; encoding, decoding, validation and the docs' reference table all derive from it.

Bodies travel as msgpack maps. msgspec decodes and checks a frame in one pass in C (types,
``Meta`` bounds, unknown fields); the few rules that span fields live in each body's
:meth:`Body.check`. Every exception is turned into :class:`ProtocolViolation` here, at the edge,
with the code the protocol documents:

- ``bad_body``: not msgpack, not one map with string keys, a missing or unknown field, a value
  of the wrong type (``bool`` is not ``int``; an int is a valid float), or an array of the wrong
  shape;
- ``out_of_range``: right type, forbidden value: a bound (NaN fails every bound), an enum value,
  a pattern, a minimum length, or a rule of :meth:`Body.check`;
- ``too_large``: a body, text or array above its limit.

Nothing is ever unpickled; msgpack extension types (timestamps included) match no field type.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Self, cast

import msgspec
from msgspec import Meta

from . import limits as L
from .errors import ErrorCode, ProtocolViolation

# --- field types shared by several bodies (the bounds travel with the type) ---
Count = Annotated[int, Meta(ge=0, le=L.MAX_COUNT)]
"""Token counts, byte counts, loads, epochs and pids."""
Seq = Annotated[int, Meta(ge=0, le=L.MAX_SEQ)]
"""A per-request frame sequence number."""
Millis = Annotated[float, Meta(ge=0.0, le=L.MAX_MS)]
"""A worker-side duration in milliseconds."""
Name = Annotated[str, Meta(max_length=L.MAX_NAME_CHARS)]
"""Free text for logs: a model name, a reason."""
WorkerId = Annotated[str, Meta(min_length=1, max_length=L.MAX_NAME_CHARS)]
"""A worker's stable id (the one READY announces and END reports)."""
MaxTokens = Annotated[int, Meta(ge=1, le=L.MAX_MAX_TOKENS)]
NCtx = Annotated[int, Meta(ge=1, le=L.MAX_N_CTX)]

EMPTY_BODY: bytes = msgspec.msgpack.encode({})
"""The body of kinds that carry no fields (CANCEL, RESET, CLOSE, PING, PONG, BUSY, RESET_OK,
CLOSE_OK and the broker's HEARTBEAT)."""


class Body(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every body: decode with ``Cls.decode(frame)``, encode with ``body.encode()``.

    Every field is required on the wire, even one with a default (defaults are for senders):
    a field a sender forgot must not silently take a value. A body that sets ``omit_defaults``
    (READY) instead leaves a field at its default out, and a receiver accepts its absence; a
    body that names fields in ``OPTIONAL`` does so for those fields only (they come last): how
    a field is added to a body without a new protocol version, since a body that does not use
    it encodes to the same bytes as before. A subclass sets ``WHAT`` (its name in error
    messages) and overrides :meth:`check` for rules that span fields. Construction checks
    nothing (senders build bodies freely); :meth:`encode` applies the receiver's checks, so a
    sender gets ProtocolViolation at the call that is wrong instead of its peer answering ERROR
    later.
    """

    WHAT: ClassVar[str] = "body"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def check(self) -> None:
        """Rules across fields that field types cannot state; raise ProtocolViolation."""

    @classmethod
    def decode(cls, frame: bytes) -> Self:
        """Decode and validate a body frame; raises ProtocolViolation."""
        codec = _CODECS.get(cls) or _Codec.register(cls)
        return cast(Self, codec.decode(frame))  # the codec of cls builds cls

    def encode(self) -> bytes:
        """Validate and encode; raises ProtocolViolation if a field breaks the protocol."""
        codec = _CODECS.get(type(self)) or _Codec.register(type(self))
        try:
            frame = _ENCODER.encode(codec.on_wire(self))
        except (TypeError, ValueError, OverflowError) as exc:  # a surrogate is a ValueError
            raise ProtocolViolation(
                ErrorCode.BAD_BODY, f"cannot encode {self.WHAT}: {exc}"
            ) from exc
        type(self).decode(frame)
        return frame

    def to_map(self) -> dict[str, Any]:
        """The body as the plain map a receiver sees (for tests and tools building variants)."""
        codec = _CODECS.get(type(self)) or _Codec.register(type(self))
        out: dict[str, Any] = msgspec.to_builtins(codec.on_wire(self), builtin_types=(bytes,))
        return out


_ENCODER = msgspec.msgpack.Encoder()
_SIZE = re.compile(r"Expected `[^`]*` of length <=")
_RANGE = re.compile(r"Expected `[^`]*` (?:[<>]=?|of length >=|matching regex)|Invalid enum value")


def _violation(what: str, exc: msgspec.ValidationError) -> ProtocolViolation:
    """The ProtocolViolation for msgspec's verdict on a body named ``what``.

    msgspec reports one problem as ``<detail> - at `$.path``; the detail's form gives the code.
    """
    detail, _, path = str(exc).partition(" - at `")
    where = what + path[1:-1] if path.startswith("$") else what
    if _SIZE.match(detail):
        code = ErrorCode.TOO_LARGE
    elif _RANGE.match(detail):
        code = ErrorCode.OUT_OF_RANGE
    else:
        code = ErrorCode.BAD_BODY
    return ProtocolViolation(code, f"{where}: {detail}")


def _decode(
    decoder: msgspec.msgpack.Decoder[Any], frame: bytes, what: str, required: tuple[str, ...] = ()
) -> Any:
    if len(frame) > L.MAX_BODY_BYTES:
        raise ProtocolViolation(
            ErrorCode.TOO_LARGE, f"{what} body of {len(frame)} bytes > {L.MAX_BODY_BYTES}"
        )
    try:
        return decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise _missing(frame, what, required) or _violation(what, exc) from None
    except Exception as exc:  # DecodeError, RecursionError...: untrusted bytes, all ours
        raise ProtocolViolation(ErrorCode.BAD_BODY, f"{what} body is not msgpack: {exc}") from None


def _missing(frame: bytes, what: str, required: tuple[str, ...]) -> ProtocolViolation | None:
    """A body with several faults is reported by a missing field first, whatever the order of
    its keys (msgspec reports the first fault it meets, and a missing field only at the end)."""
    try:
        body = msgspec.msgpack.decode(frame)
    except Exception:  # undecodable further on: the fault msgspec met first is the answer
        return None
    if type(body) is dict:
        for name in required:
            if name not in body:
                return ProtocolViolation(ErrorCode.BAD_BODY, f"{what}: missing field {name!r}")
    return None


class _Codec:
    """The decoder of one body class.

    A class whose fields have defaults but that does not omit them on the wire is decoded
    through a twin Struct with the same fields and no defaults (so every key is required),
    then rebuilt as the class itself. Fields in ``OPTIONAL`` keep their defaults in the twin,
    which omits them at their default, and bodies are encoded through it too.
    """

    def __init__(self, cls: type[Body]) -> None:
        self.cls = cls
        fields = msgspec.structs.fields(cls)
        optional = cls.OPTIONAL
        assert all(not f.required for f in fields if f.name in optional), "OPTIONAL has defaults"
        assert [f.name for f in fields[len(fields) - len(optional) :]] == [
            f.name for f in fields if f.name in optional
        ], "OPTIONAL fields come last"
        self.twin: type[msgspec.Struct] | None = None
        self.encodes_twin = bool(optional)
        if not cls.__struct_config__.omit_defaults and any(not f.required for f in fields):
            self.twin = msgspec.defstruct(
                f"{cls.__name__}OnWire",
                [
                    (f.name, f.type, f.default) if f.name in optional else (f.name, f.type)
                    for f in fields
                ],
                forbid_unknown_fields=True,
                omit_defaults=bool(optional),
                module=cls.__module__,
            )
        self.decoder = msgspec.msgpack.Decoder(self.twin or cls)
        self.required = tuple(
            f.encode_name for f in fields if (self.twin or f.required) and f.name not in optional
        )

    def on_wire(self, body: Body) -> msgspec.Struct:
        """What encodes ``body``: itself, or its twin when some fields are optional."""
        if self.encodes_twin and self.twin is not None:
            return self.twin(*msgspec.structs.astuple(body))
        return body

    @staticmethod
    def register(cls: type[Body]) -> _Codec:
        codec = _CODECS[cls] = _Codec(cls)
        return codec

    def decode(self, frame: bytes) -> Body:
        body: Body = _decode(self.decoder, frame, self.cls.WHAT, self.required)
        if self.twin is not None:
            body = self.cls(*msgspec.structs.astuple(body))
        body.check()
        return body


_CODECS: dict[type[Body], _Codec] = {}


class _Empty(Body, frozen=True):
    """The body of a kind without fields: an empty map."""


_EMPTY_DECODER = msgspec.msgpack.Decoder(_Empty)


def decode_empty(frame: bytes, what: str) -> None:
    """Check the body of a kind that carries no fields (it must be an empty map)."""
    if frame != EMPTY_BODY:
        _decode(_EMPTY_DECODER, frame, what)
