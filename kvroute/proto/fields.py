"""msgpack bodies: the one place bytes become maps, and typed, range-checked field reading.

Bodies are decoded one frame at a time with ``unpackb(raw=False, strict_map_key=True)`` and every
exception is turned into :class:`ProtocolViolation` here, at the edge. Nothing is ever unpickled;
msgpack extension types (including timestamps) decode to objects no field accepts, so they are
rejected as wrong types.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar, Self, TypeVar

import msgpack

from .errors import ErrorCode, ProtocolViolation
from .limits import MAX_BODY_BYTES

E = TypeVar("E", bound=StrEnum)

EMPTY_BODY: bytes = msgpack.packb({})
"""The body of kinds that carry no fields (CANCEL, RESET, CLOSE, PING, PONG, BUSY, RESET_OK,
CLOSE_OK and the broker's HEARTBEAT)."""

_MISSING: Any = object()


def pack(body: Mapping[str, Any]) -> bytes:
    """Encode a body map; msgpack errors become ProtocolViolation (bad_body / too_large)."""
    try:
        frame: bytes = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        raise ProtocolViolation(ErrorCode.BAD_BODY, f"cannot encode body: {exc}") from exc
    if len(frame) > MAX_BODY_BYTES:
        raise ProtocolViolation(
            ErrorCode.TOO_LARGE, f"body of {len(frame)} bytes > {MAX_BODY_BYTES}"
        )
    return frame


def unpack(frame: bytes, what: str) -> dict[str, Any]:
    """Decode a body frame that must be a msgpack map with string keys.

    Raises
    ------
    ProtocolViolation
        ``too_large`` above :data:`MAX_BODY_BYTES`; ``bad_body`` for anything undecodable
        (truncated data, trailing bytes, invalid UTF-8, non-string keys, not a map).
    """
    if len(frame) > MAX_BODY_BYTES:
        raise ProtocolViolation(
            ErrorCode.TOO_LARGE, f"{what} body of {len(frame)} bytes > {MAX_BODY_BYTES}"
        )
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except (
        Exception
    ) as exc:  # msgpack raises many types (ValueError, StackError, ...); all are ours
        raise ProtocolViolation(ErrorCode.BAD_BODY, f"{what} body is not msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolViolation(ErrorCode.BAD_BODY, f"{what} body is not a map")
    for key in obj:
        if not isinstance(key, str):  # strict_map_key still allows bytes keys
            raise ProtocolViolation(ErrorCode.BAD_BODY, f"{what} body has a non-string key")
    return obj


def _type_name(value: object) -> str:
    return "nil" if value is None else type(value).__name__


class BodyReader:
    """Reads typed fields out of a decoded body, then rejects any field nobody read.

    Every getter raises :class:`ProtocolViolation`: ``bad_body`` for a missing field or a wrong
    type, ``out_of_range`` for a value outside its bounds, ``too_large`` for text or lists over
    their limit. ``bool`` never passes for ``int`` (msgpack keeps them apart, Python does not).

    Parameters
    ----------
    body
        The decoded map (see :func:`unpack`).
    what
        Name used in messages, e.g. ``"TURN"`` or ``"END.stats"``.
    """

    def __init__(self, body: Mapping[str, Any], what: str) -> None:
        self._body = body
        self._what = what
        self._seen: set[str] = set()

    def _fail(self, code: ErrorCode, key: str, detail: str) -> ProtocolViolation:
        return ProtocolViolation(code, f"{self._what}.{key}: {detail}")

    def _get(self, key: str) -> Any:
        self._seen.add(key)
        if key not in self._body:
            raise ProtocolViolation(ErrorCode.BAD_BODY, f"{self._what}: missing field {key!r}")
        return self._body[key]

    def get_int(self, key: str, lo: int, hi: int, *, optional: bool = False) -> Any:
        """An int in [lo, hi] (or None when ``optional`` and the value is nil)."""
        value = self._get(key)
        if value is None and optional:
            return None
        if type(value) is not int:
            raise self._fail(ErrorCode.BAD_BODY, key, f"expected int, got {_type_name(value)}")
        if not lo <= value <= hi:
            raise self._fail(ErrorCode.OUT_OF_RANGE, key, f"{value} not in [{lo}, {hi}]")
        return value

    def get_float(self, key: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
        """A finite number in [lo, hi] (or (lo, hi] when ``lo_open``); ints are accepted."""
        value = self._get(key)
        if type(value) not in (float, int):
            raise self._fail(ErrorCode.BAD_BODY, key, f"expected number, got {_type_name(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise self._fail(ErrorCode.OUT_OF_RANGE, key, f"{value} is not finite")
        if value > hi or value < lo or (lo_open and value == lo):
            bounds = f"{'(' if lo_open else '['}{lo}, {hi}]"
            raise self._fail(ErrorCode.OUT_OF_RANGE, key, f"{value} not in {bounds}")
        return value

    def get_bool(self, key: str) -> bool:
        """A msgpack boolean."""
        value = self._get(key)
        if type(value) is not bool:
            raise self._fail(ErrorCode.BAD_BODY, key, f"expected bool, got {_type_name(value)}")
        return value

    def get_str(self, key: str, max_chars: int, *, min_chars: int = 0) -> str:
        """A string of min_chars..max_chars characters (UTF-8 validity is msgpack's job)."""
        value = self._get(key)
        if not isinstance(value, str):  # subclasses (StrEnum) only come from local senders
            raise self._fail(ErrorCode.BAD_BODY, key, f"expected str, got {_type_name(value)}")
        if len(value) > max_chars:
            raise self._fail(ErrorCode.TOO_LARGE, key, f"{len(value)} chars > {max_chars}")
        if len(value) < min_chars:
            raise self._fail(ErrorCode.OUT_OF_RANGE, key, f"{len(value)} chars < {min_chars}")
        return value

    def get_enum(self, key: str, enum: type[E], *, optional: bool = False) -> Any:
        """A string that is one of ``enum``'s values (or None when ``optional`` and nil)."""
        value = self._get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self._fail(ErrorCode.BAD_BODY, key, f"expected str, got {_type_name(value)}")
        try:
            return enum(value)
        except ValueError:
            allowed = ", ".join(m.value for m in enum)
            raise self._fail(
                ErrorCode.OUT_OF_RANGE, key, f"{value[:40]!r} not one of {allowed}"
            ) from None

    def get_list(self, key: str, max_len: int, *, min_len: int = 0) -> list[Any]:
        """An array of min_len..max_len items (the caller checks the items)."""
        value = self._get(key)
        if type(value) is not list:
            raise self._fail(ErrorCode.BAD_BODY, key, f"expected array, got {_type_name(value)}")
        if len(value) > max_len:
            raise self._fail(ErrorCode.TOO_LARGE, key, f"{len(value)} items > {max_len}")
        if len(value) < min_len:
            raise self._fail(ErrorCode.OUT_OF_RANGE, key, f"{len(value)} items < {min_len}")
        return value

    def get_map(self, key: str) -> BodyReader:
        """A nested map, returned as its own reader (call its :meth:`finish` too)."""
        value = self._get(key)
        return self.nested(value, f"{self._what}.{key}")

    @staticmethod
    def nested(value: object, what: str) -> BodyReader:
        """A reader over ``value``, which must be a map with string keys (e.g. a list item)."""
        if type(value) is not dict or not all(type(k) is str for k in value):
            raise ProtocolViolation(
                ErrorCode.BAD_BODY, f"{what}: expected map, got {_type_name(value)}"
            )
        return BodyReader(value, what)

    def finish(self) -> None:
        """Reject fields that were not read: a typo must not silently become a default."""
        unknown = self._body.keys() - self._seen
        if unknown:
            names = ", ".join(sorted(repr(k)[:40] for k in unknown)[:5])
            raise ProtocolViolation(ErrorCode.BAD_BODY, f"{self._what}: unknown field(s) {names}")


class Body:
    """Base of every body dataclass: one field reader, used by both encode and decode.

    Subclasses define ``WHAT`` (the name used in error messages), :meth:`to_map` and
    :meth:`read`. :meth:`encode` runs the decoder's own checks on the map before packing it, so a
    sender gets :class:`ProtocolViolation` at the call that is wrong instead of its peer
    answering ERROR later (and the rules exist once).
    """

    __slots__ = ()
    WHAT: ClassVar[str] = "body"

    def to_map(self) -> dict[str, Any]:
        """The body as a plain map of msgpack-able values."""
        raise NotImplementedError

    @classmethod
    def read(cls, r: BodyReader) -> Self:
        """Build an instance from a reader (fields only; :meth:`from_map` checks leftovers)."""
        raise NotImplementedError

    @classmethod
    def from_map(cls, body: Mapping[str, Any]) -> Self:
        """Validate a decoded map and build the instance; raises ProtocolViolation."""
        r = BodyReader(body, cls.WHAT)
        obj = cls.read(r)
        r.finish()
        return obj

    @classmethod
    def decode(cls, frame: bytes) -> Self:
        """Decode and validate a body frame; raises ProtocolViolation."""
        return cls.from_map(unpack(frame, cls.WHAT))

    def encode(self) -> bytes:
        """Validate and encode; raises ProtocolViolation if a field breaks the protocol."""
        body = self.to_map()
        self.from_map(body)
        return pack(body)


def decode_empty(frame: bytes, what: str) -> None:
    """Check the body of a kind that carries no fields (it must be an empty map)."""
    BodyReader(unpack(frame, what), what).finish()
