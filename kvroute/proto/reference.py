"""The protocol reference tables, generated from the body declarations (so docs cannot drift).

    python -m kvroute.proto.reference                      # print the markdown
    python -m kvroute.proto.reference --write docs/design.md

``--write`` replaces what lies between the ``<!-- proto-reference:start -->`` and
``<!-- proto-reference:end -->`` markers of the file; a test compares that block with
:func:`reference_markdown`. Field types and limits come from msgspec's view of each ``Struct``
(:func:`msgspec.inspect.type_info`), rules across fields from the docstring of each body's
``check``.
"""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from . import kinds as K
from . import limits as L
from .control import Disconnect, ErrorReply, Heartbeat, Ready, SessionLost
from .fields import Body
from .kinds import Kind
from .messages import Overflow, Token, TurnEnd, TurnRequest
from .status import Fleet
from .transcripts import Found, Index, Lookup

START = "<!-- proto-reference:start -->"
END = "<!-- proto-reference:end -->"

BODY_TYPES: dict[Kind, type[Body]] = {
    Kind.TURN: TurnRequest,
    Kind.LOOKUP: Lookup,
    Kind.INDEX: Index,
    Kind.TOKEN: Token,
    Kind.END: TurnEnd,
    Kind.OVERFLOW: Overflow,
    Kind.ERROR: ErrorReply,
    Kind.SESSION_LOST: SessionLost,
    Kind.FOUND: Found,
    Kind.FLEET: Fleet,
    Kind.READY: Ready,
    Kind.HEARTBEAT: Heartbeat,
    Kind.DISCONNECT: Disconnect,
}
"""The body of each kind that has fields (HEARTBEAT's only from a worker); every other kind
carries an empty map."""

_HOPS: tuple[tuple[str, frozenset[Kind]], ...] = (
    ("client → broker", K.CLIENT_KINDS),
    ("broker → worker", K.FORWARDED_KINDS | K.BROKER_CONTROL_KINDS),
    ("worker → broker", K.REPLY_KINDS | K.WORKER_CONTROL_KINDS),
    ("broker → client", K.CLIENT_REPLY_KINDS),
)
_UINT64_MAX = (1 << 64) - 1  # msgpack's widest integer: the bound of an int with no upper limit


def _num(v: float) -> str:
    """A bound as people write it: 2**63 - 1 rather than 9223372036854775807."""
    if isinstance(v, int) and v >= 1 << 16:
        if v & (v - 1) == 0:
            return f"2**{v.bit_length() - 1}"
        if (v + 1) & v == 0:
            return f"2**{v.bit_length()} - 1"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e6 else re.sub(r"e\+0*", "e", f"{v:g}")
    return str(v)


def _bounds(t: Any, unit: str = "") -> str:
    """``lo ≤ x ≤ hi`` from a numeric type's gt/ge/lt/le."""
    lo = f"{_num(t.ge)} ≤ " if t.ge is not None else f"{_num(t.gt)} < " if t.gt is not None else ""
    hi = f" ≤ {_num(t.le)}" if t.le is not None else f" < {_num(t.lt)}" if t.lt is not None else ""
    if isinstance(t, mi.IntType) and not hi and (t.ge is not None or t.gt is not None):
        hi = f" ≤ {_num(_UINT64_MAX)}"  # msgspec bounds must fit int64; msgpack's are wider
    return f"{lo}x{hi}{unit}" if lo or hi else ""


def _length(t: Any, unit: str) -> str:
    lo, hi = getattr(t, "min_length", None), getattr(t, "max_length", None)
    if lo and hi:
        return f"{lo}..{_num(hi)} {unit}"
    if hi is not None:
        return f"≤ {_num(hi)} {unit}"
    return f"≥ {lo} {unit}" if lo else ""


def _describe(t: Any) -> tuple[str, str]:
    """(type, limits) of one field type, in the words of the protocol docs."""
    if isinstance(t, mi.UnionType):
        parts = [_describe(x) for x in t.types if not isinstance(x, mi.NoneType)]
        nil = " or nil" if len(parts) < len(t.types) else ""
        return " or ".join(p[0] for p in parts) + nil, "; ".join(p[1] for p in parts if p[1])
    if isinstance(t, mi.IntType | mi.FloatType):
        finite = ", finite" if isinstance(t, mi.FloatType) else ""
        name = "int" if isinstance(t, mi.IntType) else "float (an int is accepted)"
        return name, _bounds(t) + (finite if _bounds(t) else "")
    if isinstance(t, mi.StrType):
        limits = _length(t, "characters")
        if t.pattern:
            limits += f"{'; ' if limits else ''}matches `{t.pattern}`"
        return "str", limits
    if isinstance(t, mi.BytesType):
        return "bin", _length(t, "bytes")
    if isinstance(t, mi.BoolType):
        return "bool", ""
    if isinstance(t, mi.EnumType):
        return "str", "one of " + ", ".join(f"`{m.value}`" for m in t.cls)
    if isinstance(t, mi.StructType):
        return f"map {t.cls.__name__}", ""
    if isinstance(t, mi.NamedTupleType):
        return f"array {t.cls.__name__}", f"{len(t.fields)} items"
    if isinstance(t, mi.VarTupleType | mi.ListType):
        item, item_limits = _describe(t.item_type)
        limits = _length(t, "items")
        if item_limits:
            limits += f"{'; ' if limits else ''}each {item_limits}"
        return f"array of {item}", limits
    if isinstance(t, mi.DictType):
        key, key_limits = _describe(t.key_type)
        value, value_limits = _describe(t.value_type)
        limits = "; ".join(
            f"{what} {lim}" for what, lim in (("keys", key_limits), ("values", value_limits)) if lim
        )
        return f"map of {key} to {value}", limits
    raise TypeError(f"no description for field type {t!r}")  # a new kind of field: add it


def _nested(t: Any) -> Iterator[Any]:
    """Struct and NamedTuple types inside a field type (documented in tables of their own)."""
    if isinstance(t, mi.StructType | mi.NamedTupleType):
        yield t
    elif isinstance(t, mi.UnionType):
        for x in t.types:
            yield from _nested(x)
    elif isinstance(t, mi.VarTupleType | mi.ListType):
        yield from _nested(t.item_type)
    elif isinstance(t, mi.DictType):
        yield from _nested(t.value_type)


def _presence(cls: type, field: mi.Field) -> str:
    if field.required:
        return "required"
    default = msgspec.json.encode(msgspec.to_builtins(field.default)).decode()
    default = "nil" if default == "null" else default
    config = getattr(cls, "__struct_config__", None)
    optional = field.name in getattr(cls, "OPTIONAL", ())
    if optional or (config is not None and config.omit_defaults):
        return f"optional: absent means `{default}` (left out when so)"
    return f"required (senders' default `{default}`)"


def _markdown(doc: str) -> str:
    """A docstring paragraph as markdown: one line, reST roles and literals as code spans."""
    text = " ".join(doc.split())
    text = re.sub(r"``(MAX_[A-Z_]+)``", lambda m: _num(getattr(L, m.group(1))), text)
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: f"`{m.group(1).split('.')[-1]}`", text)
    return text.replace("``", "`")


def _rules(cls: type) -> str:
    """The docstring of the class's own ``check``: the rules its field types cannot state."""
    check = cls.__dict__.get("check")
    doc = getattr(check, "__doc__", None)
    return _markdown(doc) if doc else ""


def _table(title: str, info: Any) -> list[str]:
    cls = info.cls
    lines = [f"### {title}", ""]
    doc = inspect.getdoc(cls) or ""
    lines += [_markdown(doc.split("\n\n")[0]), ""]
    lines += ["| field | type | limits | presence |", "|---|---|---|---|"]
    for f in info.fields:
        kind, limits = _describe(f.type)
        lines.append(f"| `{f.encode_name}` | {kind} | {limits} | {_presence(cls, f)} |")
    rules = _rules(cls)
    if rules:
        lines += ["", f"Checked across fields: {rules}"]
    return [*lines, ""]


def reference_markdown() -> str:
    """Markdown: every kind (byte, hops, body), then a table per body and per nested type."""
    lines = [
        "Generated by `python -m kvroute.proto.reference` from the declarations in",
        "`kvroute/proto/`; do not edit by hand. Every body is one msgpack map of at most",
        f"{_num(L.MAX_BODY_BYTES)} bytes. Unknown fields are `bad_body`; so is a missing one,",
        "even where senders have a default.",
        "",
        "| kind | byte | travels | body |",
        "|---|---|---|---|",
    ]
    for kind in Kind:
        hops = ", ".join(name for name, kinds in _HOPS if kind in kinds)
        cls = BODY_TYPES.get(kind)
        body = f"{cls.__name__}" if cls is not None else "empty map"
        if kind is Kind.HEARTBEAT:
            body += " (worker → broker); empty map (broker → worker)"
        lines.append(f"| {kind.name} | `0x{kind.value:02x}` | {hops} | {body} |")
    lines.append("")
    seen: set[type] = set()
    queue: list[tuple[str, Any]] = []
    for kind, cls in BODY_TYPES.items():
        queue.append((f"{kind.name} body: {cls.__name__}", mi.type_info(cls)))
    while queue:
        title, info = queue.pop(0)
        if info.cls in seen:
            continue
        seen.add(info.cls)
        lines += _table(title, info)
        for f in info.fields:
            queue += [(t.cls.__name__, t) for t in _nested(f.type)]
    return "\n".join(lines).rstrip() + "\n"


def splice(text: str, block: str) -> str:
    """``text`` with the part between the markers replaced by ``block``."""
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"markers {START} ... {END} not found")
    return f"{head}{START}\n{block}{END}{tail}"


def current_block(text: str) -> str:
    """What lies between the markers of ``text`` (without the newline after the start one)."""
    _, _, rest = text.partition(START)
    return rest.partition(END)[0].removeprefix("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, metavar="FILE", help="Replace the block in FILE.")
    args = ap.parse_args()
    block = reference_markdown()
    if args.write is None:
        print(block, end="")
        return
    args.write.write_text(splice(args.write.read_text(), block))


if __name__ == "__main__":
    main()
